"""``python -m deepsim``: the ``deepsim`` command (also under ``torchrun ... -m deepsim``)."""

import sys

from deepsim.cli import main

if __name__ == "__main__":
    sys.exit(main())
