"""``python -m leadkd.cli`` (and ``torchrun -m leadkd.cli``): the `leadkd` command."""

import sys

from . import main

sys.exit(main())
