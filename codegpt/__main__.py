"""``python -m codegpt``: the same as the ``codegpt`` command (and what `accelerate launch -m codegpt` runs)."""

import sys

from .cli import main

sys.exit(main())
