"""``python -m pocketlm``: the ``pocketlm`` command (torchrun launches it this way too)."""

import sys

from pocketlm.cli import main

sys.exit(main())
