"""kupctl's console-script entry point.

Loading kupctl takes about a third of a second (grpc, protobuf), and a ^C
in that time used to end in a KeyboardInterrupt traceback from the import.
This module is light: it makes such a ^C exit 130 quietly, as a ^C later
does (:func:`kupclient.kupctl.main`), then loads kupctl and runs it.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["main"]


def _interrupted(signum: int, frame: FrameType | None) -> None:
    os._exit(130)


def main() -> int:
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when ^C is ignored
        signal.signal(signal.SIGINT, _interrupted)
    from kupclient.kupctl import main as kupctl_main

    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, previous)
    return kupctl_main(sys.argv[1:])
