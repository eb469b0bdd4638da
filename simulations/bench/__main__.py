"""``python -m simulations.bench``: see `simulations.bench.cli`."""

from __future__ import annotations

import sys

from simulations.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
