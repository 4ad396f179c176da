"""``python -m moodguard ...`` = the ``moodguard`` console script."""
import sys

from .cli import main

sys.exit(main())
