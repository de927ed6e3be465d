"""``python -m adloop``: the same as the ``adloop`` command."""

import sys

from adloop.cli import main

sys.exit(main())
