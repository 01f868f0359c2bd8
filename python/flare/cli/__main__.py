"""``python -m flare.cli``: the ``flare`` command."""

import sys

from . import main

sys.exit(main())
