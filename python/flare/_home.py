"""The flare home: the directory where the client keeps its state (``$FLARE_HOME``,
default ``~/.flare``): the embedded server's home, the hash and bytecode caches."""

from __future__ import annotations

import os


def flare_home() -> str:
    return os.environ.get("FLARE_HOME") or os.path.join(os.path.expanduser("~"), ".flare")
