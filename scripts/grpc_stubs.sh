#!/usr/bin/env bash
# Regenerates the committed gRPC stubs in service/protocols/grpc/ from the vendored .proto
# (messages, the service, and .pyi files for mypy). Run after changing the .proto or the
# grpcio-tools pin; the stubs are committed so that installing modelserve needs no compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # protoc finds the mypy plugins (protoc-gen-mypy) here
python -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  service/protocols/grpc/open_inference_grpc.proto
