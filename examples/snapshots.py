"""flare run examples/snapshots.py

The class from issue 11: its model is loaded once, before a memory snapshot
(``@flare.enter(snap=True)``); later cold starts restore the snapshot instead of
importing numpy and loading again, then run the ``snap=False`` hook. See docs/SNAPSHOTS.md.
"""

import time

import flare

app = flare.App("snapshots")
image = flare.Image.debian_slim().pip_install("numpy")


@app.cls(image=image, cpu=2, memory=2048, scaledown_window=120, enable_memory_snapshot=True)
class Model:
    size: int = flare.parameter(default=3)

    @flare.enter(snap=True)
    def load(self) -> None:  # runs before the snapshot: imports, weights into CPU memory
        import numpy as np

        self.w = np.ones((self.size, self.size))

    @flare.enter(snap=False)
    def after_restore(self) -> None:  # runs in every container after start or restore
        self.started = time.time()

    @flare.method()
    def predict(self, x: float) -> float:
        return float((self.w * x).sum())

    @flare.method()
    def stream(self, n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    @flare.exit()
    def close(self) -> None:
        print("bye")


@app.local_entrypoint()
def main() -> None:
    print(Model().predict.remote(2))  # 18.0
    print(sum(Model(size=8).predict.map(range(100))))  # another pool: 64 * 4950
    print(list(Model().stream.remote_gen(3)))  # [0, 1, 2]
    print(Model.with_options(cpu=1)().predict.spawn(1).get())  # 9.0
