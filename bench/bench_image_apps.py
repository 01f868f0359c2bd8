"""Apps for bench/images.py: the same trivial function on three roots.

- ``host_app``: published with FLARE_LOCAL_PYTHON=bind: the foundation's host-environment
  root (the caller's Python dirs bound read-only from the host).
- ``captured_app``: the default: the caller's environment captured into the store and
  mounted lazily from the image file system.
- ``debian_app``: ``Image.debian_slim()``, a cached image as the whole root.
"""

from __future__ import annotations

import flare

host_app = flare.App("bench-img-host")
captured_app = flare.App("bench-img-captured")
debian_app = flare.App("bench-img-debian")

DEBIAN = flare.Image.debian_slim()


@host_app.function(scaledown_window=0)
def on_host(x: int) -> int:
    return x


@captured_app.function(scaledown_window=0)
def on_captured(x: int) -> int:
    return x


@debian_app.function(image=DEBIAN, scaledown_window=0)
def on_debian(x: int) -> int:
    return x
