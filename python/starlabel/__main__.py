"""``python -m starlabel`` and the ``starlabel`` console script; the commands live in cli.py."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
