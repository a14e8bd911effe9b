"""``python -m onemarket.mad``: the MAD, started as oned starts it."""

import sys

from ..madstart import main

sys.exit(main())
