"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`): the command line."""

import sys

from lorakit.cli import main

sys.exit(main())
