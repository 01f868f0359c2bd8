"""flare run examples/hello_world.py --n 500"""

import flare

app = flare.App("hello")


@app.function()
def square(x: int) -> int:
    print("computing", x)  # shows up in the caller's terminal
    return x * x


@app.local_entrypoint()
def main(n: int = 1000) -> None:
    print(square.remote(4))
    print(sum(square.map(range(n))))
