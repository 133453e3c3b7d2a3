"""kupd: KUP channels (kernel-user proxy) served to unprivileged clients.

Subpackages and modules are imported explicitly (``from kupd.channel import
Device``); importing ``kupd`` itself loads nothing else, so that tools which
need only :mod:`kupd.errors` or :mod:`kupd.abi` work before the C extension
``kupd._kupchan`` has been built.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
