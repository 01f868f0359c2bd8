"""``python -m flare._runtime``: the container's entry point (see ``runner.py``)."""

import sys

from .runner import main

sys.exit(main())
