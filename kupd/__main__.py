"""``python -m kupd``: the same program as the ``kupd`` console script
(kupd.daemon's main, with its arguments and exit status)."""

from __future__ import annotations

import sys

# kupd.daemon holds SIGHUP as it loads, before grpc is imported (see
# kupd.daemon._hold_sighup): nothing else is imported here before it
from kupd.daemon import main

if __name__ == "__main__":
    sys.exit(main())
