"""``python -m kfx``: the ``kfx`` command line (see :mod:`kfx.cli`)."""

import sys

from kfx.cli import main

if __name__ == "__main__":
    sys.exit(main())
