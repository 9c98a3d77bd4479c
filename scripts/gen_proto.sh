#!/usr/bin/env bash
# Regenerate schemas/tinker_wire_pb2.py from schemas/tinker_wire.proto.
#
# grpcio-tools (which bundles protoc) is a test-only dependency; the server needs only the
# protobuf runtime, which must be at least as new as the protoc that generated the file
# (the generated module checks this at import time).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo_root/.venv/bin/python}"

cd "$repo_root/schemas"
"$python" -m grpc_tools.protoc --proto_path=. --python_out=. tinker_wire.proto
echo "generated schemas/tinker_wire_pb2.py with $("$python" -m grpc_tools.protoc --version)"
