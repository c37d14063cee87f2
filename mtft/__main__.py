"""`python -m mtft ...` (and `torchrun -m mtft train ...`)."""

import sys

from mtft.commands.cli import main

sys.exit(main())
