"""flare run examples/classes.py

A class whose methods share containers: each container loads its state once
(``@flare.enter``), serves any method, and cleans up when it stops (``@flare.exit``).
Each set of parameter values gets its own pool of containers.
"""

import flare

app = flare.App("classes")


@app.cls(cpu=1, memory=512, scaledown_window=60)
class Model:
    size: int = flare.parameter(default=3)

    @flare.enter()
    def load(self) -> None:
        print("loading weights of size", self.size)
        self.w = [1] * self.size

    @flare.method()
    def predict(self, x: int) -> int:
        return sum(self.w) * x

    @flare.method()
    def stream(self, n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    @flare.exit()
    def close(self) -> None:
        print("bye")


@app.local_entrypoint()
def main() -> None:
    print(Model().predict.remote(2))  # 6
    print(sum(Model(size=8).predict.map(range(100))))  # another pool: 8 * 4950
    print(list(Model().stream.remote_gen(3)))  # [0, 1, 2]
    print(Model.with_options(cpu=0.5)().predict.spawn(1).get())  # 3
