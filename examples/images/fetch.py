"""Run a function on a custom image: Debian, apt and pip packages, env, local source.

    flare run examples/images/fetch.py

The first run builds the image (each step's output is streamed); the second finds every
layer cached and starts at once.
"""

import flare

app = flare.App("images-example")

image = (
    flare.Image.debian_slim()
    .apt_install("curl")
    .pip_install("requests==2.32.3")
    .env({"MODE": "prod"})
    .add_local_python_source("mylib")
)


@app.function(image=image)
def fetch() -> dict:
    import os
    import shutil
    import sys

    import mylib
    import requests

    return {
        "greeting": mylib.greeting("images"),
        "requests": requests.__version__,
        "curl": shutil.which("curl"),
        "mode": os.environ.get("MODE"),
        "python": sys.version.split()[0],
        "os": open("/etc/os-release").read().splitlines()[0],
    }


@app.local_entrypoint()
def main() -> None:
    print(fetch.remote())
