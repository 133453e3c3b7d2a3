"""Generated gRPC stubs of the kup.v1 API (protos/kup/v1/kup.proto).

The modules under ``kupapi.kup.v1`` are produced by ``scripts/gen-proto.sh``
(run by ``make proto`` / ``make build``); this file only re-exports them.
"""

from __future__ import annotations

from kupapi.kup.v1 import kup_pb2, kup_pb2_grpc

__all__ = ["KUP_PROTO_PATH", "MAX_GRPC_MESSAGE", "kup_pb2", "kup_pb2_grpc"]

#: The largest KUP message is KUP_MAX_PAGES (1024) pages of 4 KiB = 4 MiB of
#: payload; gRPC's limits on both ends are set to that plus headroom for the
#: envelope (other fields, framing).  Larger pages (e.g. 64 KiB) would need a
#: larger limit: kupd logs a warning for a device whose max message does not fit.
MAX_GRPC_MESSAGE = 4 * 1024 * 1024 + 64 * 1024

#: The .proto file shipped with the package (for other-language clients).
KUP_PROTO_PATH = __file__.rsplit("/", 1)[0] + "/kup/v1/kup.proto"
