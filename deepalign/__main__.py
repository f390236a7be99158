"""``python -m deepalign`` is the ``deepalign`` command."""

import sys

from deepalign.cli import main

sys.exit(main())
