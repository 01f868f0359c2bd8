"""The container's entry point (see ``runner.py``): the worker starts it as
``python -c "import flare._runtime.__main__"``; ``python -m flare._runtime`` does the same.

Not ``-m`` for the worker: ``-m`` runs the module through ``runpy``, whose imports
(``importlib.util``, ``contextlib``, ``functools``, ``collections``, ...) cost ~3.7 ms
of every cold start, more than the runner itself. ``-c`` puts ``""`` first on
``sys.path`` where ``-m`` puts the working dir's absolute path; the absolute path is
restored here, so user code sees the same ``sys.path`` either way.
"""

import sys

if __name__ != "__main__" and sys.path and sys.path[0] == "" and not getattr(sys.flags, "safe_path", False):
    import os

    sys.path[0] = os.getcwd()

from .runner import main

sys.exit(main())
