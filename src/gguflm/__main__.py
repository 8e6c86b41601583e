"""`python -m gguflm`: the gguflm command."""

import sys

from gguflm.cli import main

sys.exit(main())
