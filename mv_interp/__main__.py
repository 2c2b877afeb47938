"""``python -m mv_interp …`` is the ``mv-interp`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
