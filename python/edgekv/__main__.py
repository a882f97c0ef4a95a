"""``python -m edgekv``: the same command line as the ``edgekv`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
