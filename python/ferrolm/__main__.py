"""``python -m ferrolm``: the same command line as ``ferrolm``."""

import sys

from .cli import main

sys.exit(main())
