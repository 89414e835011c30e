"""The Open Inference Protocol's gRPC messages and service: the vendored .proto, its generated
stubs (committed; scripts/grpc_stubs.sh makes them) and the ModelInfer codec."""
