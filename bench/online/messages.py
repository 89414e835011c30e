"""What the benchmark sends over gRPC: ModelInfer messages, framed as on the wire, and answers.

A gRPC unary call is an HTTP/2 POST whose body is one length-prefixed message: a compressed
flag (0) and the message's length (4 bytes, big-endian) before the serialized message. h2load
posts that body as it is; the same message goes through grpcio to check the answers.
"""

import struct
from typing import Any, Literal

import grpc
import numpy as np
from numpy.typing import NDArray

from bench.online.workload import Answer, Artifact, Kind
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.protocols.grpc import open_inference_grpc_pb2_grpc as pb_grpc
from service.store.tensors import DATATYPES

# Typed `contents` (the analogue of REST JSON) or `raw_input_contents` (of the binary extension).
Contents = Literal["contents", "raw"]
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
# Output names per server kind: label, probabilities.
OUTPUTS = {"mlserver": ("predict", "predict_proba")}
DEFAULT_OUTPUTS = ("label", "probabilities")
_TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents"}
_TYPED |= {"INT32": "int_contents", "BYTES": "bytes_contents"}


def frame(message: bytes) -> bytes:
    """The body of a gRPC call carrying `message`, uncompressed."""
    return struct.pack(">BI", 0, len(message)) + message


def infer_request(
    kind: Kind, artifact: Artifact, rows: NDArray[np.float32], contents: Contents
) -> pb.ModelInferRequest:
    """The ModelInferRequest a client of `kind` sends for `rows`."""
    request = pb.ModelInferRequest(model_name=artifact.model)
    if kind == "mlserver":  # one version per name, the input named as mlserver-sklearn's docs
        tensor = request.inputs.add(name="input-0", datatype="FP32", shape=rows.shape)
        for name in OUTPUTS["mlserver"]:
            request.outputs.add(name=name)
    else:
        request.model_version = str(artifact.version)
        tensor = request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    if contents == "raw":
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    return request


def _output(
    response: pb.ModelInferResponse, index: int, output: pb.ModelInferResponse.InferOutputTensor
) -> NDArray[Any]:
    if not response.raw_output_contents:
        values = getattr(output.contents, _TYPED[output.datatype])
        if output.datatype == "BYTES":
            return np.asarray([value.decode() for value in values], dtype=object)
        return np.asarray(values)
    raw = response.raw_output_contents[index]
    if output.datatype != "BYTES":
        dtype = DATATYPES[output.datatype].newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).reshape(list(output.shape))
    items, at = [], 0
    while at < len(raw):
        (length,) = struct.unpack_from("<I", raw, at)
        items.append(raw[at + 4 : at + 4 + length].decode())
        at += 4 + length
    return np.asarray(items, dtype=object)


def decode_response(kind: Kind, response: pb.ModelInferResponse, n_classes: int) -> Answer:
    """Labels and probabilities from a ModelInferResponse, typed or raw."""
    label, probabilities = OUTPUTS.get(kind, DEFAULT_OUTPUTS)
    arrays = {o.name: _output(response, i, o) for i, o in enumerate(response.outputs)}
    return Answer(
        [str(v) for v in arrays[label].reshape(-1)],
        np.asarray(arrays[probabilities], dtype=float).reshape(-1, n_classes),
    )


def call(
    target: str, request: pb.ModelInferRequest, timeout: float = 60.0
) -> pb.ModelInferResponse:
    """One ModelInfer call through grpcio, with no message size limits."""
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=timeout)
        return response
