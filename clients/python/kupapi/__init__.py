"""kupd's API, shared by the daemon and its clients (the ``kupclient``
distribution ships it; ``kupd`` depends on that).

- :mod:`kupapi.kup.v1`: the generated gRPC stubs of the kup.v1 API
  (protos/kup/v1/kup.proto), produced by ``scripts/gen_proto.py`` (``make
  proto`` / ``make build``, and the wheel's build); ``kup_pb2`` and
  ``kup_pb2_grpc`` are re-exported here, loaded on first use.
- :mod:`kupapi.errors`: the one error taxonomy (``kupd.errors`` re-exports it).
- :mod:`kupapi.abi`: the KUP shared-page ABI's constants (``kupd.abi``).
- :mod:`kupapi.wire`: protobuf wire-format readers and writers, which the
  Session codecs of kupd (``kupd.wire``) and kupclient share.
- :mod:`kupapi.defaults`: what kupd and its clients must agree on without
  a configuration (the default socket path, what a request's name --
  attach_id, receive_id, again_of -- may be).

Importing ``kupapi`` or those modules loads no stubs (and so no protobuf)
until ``kup_pb2`` / ``kup_pb2_grpc`` is used: kupd's
C extension imports the errors at load, and ``import kupd`` takes the version
from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kupapi.kup.v1 import kup_pb2, kup_pb2_grpc

__all__ = ["KUP_PROTO_PATH", "MAX_GRPC_MESSAGE", "__version__", "kup_pb2", "kup_pb2_grpc"]

#: The version of kupd and of this API (the distributions kupd and kupclient
#: are released together: kupd requires kupclient of the same version).
__version__ = "0.1.0"

#: The largest KUP message is KUP_MAX_PAGES (1024) pages of 4 KiB = 4 MiB of
#: payload; gRPC's limits on both ends are set to that plus headroom for the
#: envelope (other fields, framing).  Larger pages (e.g. 64 KiB) would need a
#: larger limit: kupd logs a warning for a device whose max message does not fit.
MAX_GRPC_MESSAGE = 4 * 1024 * 1024 + 64 * 1024

#: The .proto file shipped with the package (for other-language clients).
KUP_PROTO_PATH = __file__.rsplit("/", 1)[0] + "/kup/v1/kup.proto"

_STUBS = ("kup_pb2", "kup_pb2_grpc")


def __getattr__(name: str) -> Any:
    if name in _STUBS:
        mod = importlib.import_module(f"kupapi.kup.v1.{name}")
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'kupapi' has no attribute {name!r}")
