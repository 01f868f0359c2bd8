"""Apps for bench/snapshots.py: the same heavy-start class with and without a memory snapshot.

- ``HeavySnap`` / ``HeavyCold``: on ``Image.debian_slim().pip_install("numpy", "pandas",
  "scikit-learn")``; ``@enter(snap=True)`` imports numpy, pandas and scikit-learn and fits
  a small random forest (>= 1 s on the 2-core dev machine).
- ``HostSnap`` / ``HostCold``: the same idea on the host Python (no image): imports a set
  of stdlib packages and big pure-Python packages from the host's site-packages (sympy,
  networkx, boto3, pydantic, jinja2, pygments; 0.5 s in a container here, 1.1 s on the
  loaded host) and builds a 1.5M-entry index in pure Python (~1 s): 1.4-2.1 s of init in
  a first container.

Each pair differs only in ``enable_memory_snapshot``; both have ``scaledown_window=2`` so a
container exits 2 s after its last input, and the bench waits for zero containers before
each timed call. This module imports nothing but ``flare`` at import time (the client has
no numpy); the heavy imports happen inside the hooks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flare

heavy_app = flare.App("bench-snap-heavy")
host_app = flare.App("bench-snap-host")

HOST_ENTRIES = 1_500_000

HEAVY_IMAGE = flare.Image.debian_slim().pip_install("numpy", "pandas", "scikit-learn")


def _heavy_init(obj: Any) -> None:
    t0 = time.perf_counter()
    import numpy as np
    import pandas as pd
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    obj.import_s = time.perf_counter() - t0
    X, y = make_classification(n_samples=3000, n_features=20, random_state=0)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(20)])
    obj.model = RandomForestClassifier(n_estimators=60, random_state=0, n_jobs=1).fit(df.values, y)
    obj.row = np.asarray(df.values[:1])
    obj.init_s = time.perf_counter() - t0


def _heavy_call(obj: Any, x: int) -> dict[str, Any]:
    return {
        "x": x,
        "y": int(obj.model.predict(obj.row)[0]),
        "snapshot": os.environ.get("FLARE_SNAPSHOT", ""),
        "import_s": obj.import_s,
        "init_s": obj.init_s,
        "pid": os.getpid(),
    }


def _host_init(obj: Any) -> None:
    t0 = time.perf_counter()
    import asyncio  # noqa: F401
    import decimal  # noqa: F401
    import email.mime.multipart  # noqa: F401
    import http.server  # noqa: F401
    import json
    import sqlite3  # noqa: F401
    import unittest  # noqa: F401
    import xml.etree.ElementTree  # noqa: F401

    # Big pure-Python packages from the host Python's site-packages (pyenv 3.11.7 here).
    import boto3  # noqa: F401
    import jinja2  # noqa: F401
    import networkx  # noqa: F401
    import pydantic  # noqa: F401
    import pygments.lexers  # noqa: F401
    import sympy  # noqa: F401

    obj.import_s = time.perf_counter() - t0
    # Pure-Python work standing in for loading a model: >= 1 s here.
    index = {f"key-{i}": (i * 2654435761) % 1000003 for i in range(HOST_ENTRIES)}
    obj.top = sorted(index.values())[-10:]
    obj.blob = json.dumps(obj.top)
    obj.index = index
    obj.init_s = time.perf_counter() - t0


def _host_call(obj: Any, x: int) -> dict[str, Any]:
    return {
        "x": x,
        "y": obj.index[f"key-{x}"],
        "snapshot": os.environ.get("FLARE_SNAPSHOT", ""),
        "import_s": obj.import_s,
        "init_s": obj.init_s,
        "pid": os.getpid(),
    }


@heavy_app.cls(image=HEAVY_IMAGE, enable_memory_snapshot=True, scaledown_window=2, timeout=300)
class HeavySnap:
    @flare.enter(snap=True)
    def load(self) -> None:
        _heavy_init(self)

    @flare.method()
    def predict(self, x: int) -> dict[str, Any]:
        return _heavy_call(self, x)


@heavy_app.cls(image=HEAVY_IMAGE, enable_memory_snapshot=False, scaledown_window=2, timeout=300)
class HeavyCold:
    @flare.enter(snap=True)
    def load(self) -> None:
        _heavy_init(self)

    @flare.method()
    def predict(self, x: int) -> dict[str, Any]:
        return _heavy_call(self, x)


@host_app.cls(enable_memory_snapshot=True, scaledown_window=2, timeout=300)
class HostSnap:
    @flare.enter(snap=True)
    def load(self) -> None:
        _host_init(self)

    @flare.method()
    def predict(self, x: int) -> dict[str, Any]:
        return _host_call(self, x)


@host_app.cls(enable_memory_snapshot=False, scaledown_window=2, timeout=300)
class HostCold:
    @flare.enter(snap=True)
    def load(self) -> None:
        _host_init(self)

    @flare.method()
    def predict(self, x: int) -> dict[str, Any]:
        return _host_call(self, x)
