"""`python -m mtft ...` (and `torchrun -m mtft train ...`)."""

import sys

from mtft.cli import main

sys.exit(main())
