"""Unit tests import the SDK of this checkout (python/), whatever else is installed."""

from __future__ import annotations

import sys
from pathlib import Path

_PYTHON_DIR = str(Path(__file__).resolve().parents[1])
if _PYTHON_DIR not in sys.path:
    sys.path.insert(0, _PYTHON_DIR)
