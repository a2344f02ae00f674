#!/usr/bin/env bash
# Regenerate the Python modules of src/trustmesh/proto/*.proto (committed; never edited
# by hand). tests/unit/test_generated_protos.py checks they are current.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PATH="$(dirname "$PY"):$PATH"  # protoc plugins live beside the interpreter
"$PY" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
  src/trustmesh/proto/agent.proto
"$PY" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpclib_python_out=src \
  src/trustmesh/proto/workloadapi.proto
