"""flare run examples/batching.py

Dynamic batching: callers call with single values; the container groups the inputs that
arrive within ``wait_ms`` (up to ``max_batch_size``) into one call that takes and
returns lists. Each caller gets its own result.
"""

import flare

app = flare.App("batching")


@app.function()
@flare.batched(max_batch_size=8, wait_ms=200)
def square(xs: list[int]) -> list[int]:
    print("a batch of", len(xs))
    return [x * x for x in xs]


@app.cls()
class Embedder:
    dim: int = flare.parameter(default=4)

    @flare.enter()
    def load(self) -> None:
        self.scale = 1.0 / self.dim

    @flare.batched(max_batch_size=16, wait_ms=100)
    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[len(t) * self.scale] * self.dim for t in texts]


@app.local_entrypoint()
def main() -> None:
    print(sum(square.map(range(100))))  # 328350
    print(square.remote(12))  # 144
    print(Embedder().embed.remote("hello"))  # [1.25, 1.25, 1.25, 1.25]
    print(len(list(Embedder.with_batching(max_batch_size=4, wait_ms=50)(dim=2).embed.map(["a", "bb", "ccc"]))))  # 3
