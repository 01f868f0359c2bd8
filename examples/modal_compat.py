"""The hello-world app written for Modal, run unchanged on Flare: flare run examples/modal_compat.py"""

import flare as modal

app = modal.App("modal-compat")


@app.function(retries=modal.Retries(max_retries=2, initial_delay=1.0), timeout=60)
def square(x: int) -> int:
    print("computing", x)
    return x * x


@app.function()
@modal.concurrent(max_inputs=4)
def where() -> str:
    return "local" if modal.is_local() else "remote"


@app.local_entrypoint()
def main(n: int = 100) -> None:
    print(square.remote(4))
    print(sum(square.map(range(n))))
    call = square.spawn(7)
    print(call.get())
    print(where.remote())
