"""kupd's error taxonomy: :mod:`kupapi.errors`, re-exported.

The classes live in ``kupapi`` (the ``kupclient`` distribution, which kupd
depends on), so that kupd and kupclient raise the same objects:
``except kupd.errors.NotYourTurn`` catches what kupclient raises, and
either distribution can be uninstalled without taking the other's files.
This module defines nothing of its own.
"""

from __future__ import annotations

# every public name of kupapi.errors (its __all__), as the same objects
from kupapi.errors import *  # noqa: F403
from kupapi.errors import __all__ as __all__
