"""``python -m mmafm ...`` is the ``mmafm`` command."""

import sys

from mmafm.cli import main

sys.exit(main())
