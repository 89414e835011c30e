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
# The messages go to a descriptor pool of their own, not protobuf's default one: the clients of
# the same protocol (tritonclient.grpc, kserve) register the same `inference.*` names there, and
# a process that imports one of them beside modelserve would fail with "duplicate symbol".
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(/' \
  service/protocols/grpc/open_inference_grpc_pb2.py
sed -i 's/^DESCRIPTOR: _descriptor.FileDescriptor$/from google.protobuf import descriptor_pool as _descriptor_pool\nPOOL: _descriptor_pool.DescriptorPool\nDESCRIPTOR: _descriptor.FileDescriptor/' \
  service/protocols/grpc/open_inference_grpc_pb2.pyi
