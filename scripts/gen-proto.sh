#!/usr/bin/env bash
# Generate the Python gRPC stubs (and mypy stubs) for protos/kup/v1/kup.proto
# into the package clients/python/kupapi/ (files ignored by git: every
# `make build` regenerates them).  Usage: scripts/gen-proto.sh [PYTHON]
set -euo pipefail
PY=${1:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/clients/python/kupapi"
BIN=$(dirname "$PY")
mkdir -p "$OUT/kup/v1"
# protoc-gen-mypy / protoc-gen-mypy_grpc live next to the interpreter.
PATH="$BIN:$PATH" "$PY" -m grpc_tools.protoc \
	-I "$ROOT/protos" \
	--python_out="$OUT" \
	--grpc_python_out="$OUT" \
	--mypy_out="$OUT" \
	--mypy_grpc_out="$OUT" \
	"$ROOT/protos/kup/v1/kup.proto"
# protoc writes absolute imports rooted at the proto path ("from kup.v1 import
# kup_pb2"); the stubs live inside the kupapi package.
for f in "$OUT"/kup/v1/kup_pb2_grpc.py "$OUT"/kup/v1/kup_pb2_grpc.pyi "$OUT"/kup/v1/kup_pb2.pyi; do
	[ -f "$f" ] && sed -i -e 's/^from kup\.v1 import/from kupapi.kup.v1 import/' \
		-e 's/^import kup\.v1\.kup_pb2/import kupapi.kup.v1.kup_pb2/' "$f"
done
touch "$OUT/kup/__init__.py" "$OUT/kup/v1/__init__.py"
# The .proto travels with the package so tools (and reflection users) can load it.
cp "$ROOT/protos/kup/v1/kup.proto" "$OUT/kup/v1/kup.proto"
