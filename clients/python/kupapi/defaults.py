"""What kupd and its clients agree on without a configuration file.

:mod:`kupd.config` takes its defaults of these from here, and kupctl its
default ``--socket``: one value, in the package both distributions have.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SOCKET"]

#: kupd's socket when its configuration names none (``socket`` in
#: kupd.toml), and kupctl's when neither ``--socket`` nor $KUPD_SOCKET does.
DEFAULT_SOCKET = "/run/kupd/kupd.sock"
