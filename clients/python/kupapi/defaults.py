"""What kupd and its clients agree on without a configuration file.

:mod:`kupd.config` takes its defaults of these from here, and kupctl its
default ``--socket``: one value, in the package both distributions have.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SOCKET", "REQUEST_NAME_CHARS", "REQUEST_NAME_MAX", "request_name_error"]

#: kupd's socket when its configuration names none (``socket`` in
#: kupd.toml), and kupctl's when neither ``--socket`` nor $KUPD_SOCKET does.
DEFAULT_SOCKET = "/run/kupd/kupd.sock"

#: A name a client gives its request -- an Attach's ``attach_id``, a
#: Receive's ``receive_id`` and ``again_of`` (a Send's and a Pass's
#: ``again_of`` too) -- is at most this many of
#: REQUEST_NAME_CHARS: kupd refuses any other (INVALID_ARGUMENT naming the
#: field), and the clients check it before sending.
REQUEST_NAME_MAX = 64
REQUEST_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def request_name_error(name: str, field: str) -> str | None:
    """Why ``name`` is not a request name, naming ``field`` (None when it is
    one; "" is none: the field unset)."""
    if len(name) > REQUEST_NAME_MAX:
        return f"{field} of {len(name)} characters: at most {REQUEST_NAME_MAX}"
    if not REQUEST_NAME_CHARS.issuperset(name):
        return f"{field} {name[:REQUEST_NAME_MAX]!r}: only letters, digits, '_' and '-'"
    return None
