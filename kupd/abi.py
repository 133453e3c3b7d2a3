"""The KUP shared-page ABI's constants: :mod:`kupapi.abi`, re-exported.

They live in ``kupapi`` (the ``kupclient`` distribution, which kupd depends
on) because the client needs some of them; this module defines nothing of
its own (``tests/kupd/test_abi.py`` checks the values against the C header).
"""

from __future__ import annotations

# every public name of kupapi.abi (its __all__), as the same objects
from kupapi.abi import *  # noqa: F403
from kupapi.abi import __all__ as __all__
