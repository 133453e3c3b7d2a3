#!/usr/bin/env bash
# Generate the Python gRPC stubs (and mypy stubs) for protos/kup/v1/kup.proto
# into the package clients/python/kupapi/ (files ignored by git: every
# `make build` regenerates them).  Usage: scripts/gen-proto.sh [PYTHON]
#
# The work is scripts/gen_proto.py's, which clients/python/setup.py runs too
# when pip builds kupclient, the distribution that ships kupapi (an
# installed kupd needs the stubs as much as a checkout does).
set -euo pipefail
PY=${1:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec "$PY" "$ROOT/scripts/gen_proto.py" --mypy required
