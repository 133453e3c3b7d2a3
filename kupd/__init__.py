"""kupd: KUP channels (kernel-user proxy) served to unprivileged clients.

Subpackages and modules are imported explicitly (``from kupd.channel import
Device``); importing ``kupd`` itself loads nothing else but ``kupapi``'s
package (the version is kupapi's: the distributions kupd and kupclient are
released together), so that tools which need only :mod:`kupd.errors` or
:mod:`kupd.abi` work before the C extension ``kupd._kupchan`` has been built.
"""

from __future__ import annotations

from kupapi import __version__

__all__ = ["__version__"]
