"""`python -m cxrfusion.cli` (as torchrun starts it): the `cxrfusion` command."""

import sys

from cxrfusion.cli import main

sys.exit(main())
