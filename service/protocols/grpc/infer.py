"""Open Inference Protocol over gRPC: ModelInfer messages to arrays and predictions back.

Both encodings of a tensor are spoken: typed `contents` and `raw_input_contents` /
`raw_output_contents` (little-endian bytes, what `tritonclient.grpc` sends). A request decodes
to the same `InferCall` as a REST one, so outputs, parameters and the timeout mean the same.
"""

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput, PayloadTooLarge
from service.protocols import v2
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.store.registry import ModelVersion
from service.store.runtimes import Prediction
from service.store.tensors import DATATYPES, datatype_of

# Which repeated field of InferTensorContents holds each datatype; FP16 travels raw only.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_PARAMETER = "parameter_choice"


def _parameters(parameters: Any) -> dict[str, Any]:
    """A map of InferParameter as plain values, as the JSON protocol has them."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof(_PARAMETER)
        values[key] = None if choice is None else getattr(parameter, choice)
    return values


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, count: int, where: str
) -> NDArray[Any]:
    datatype = tensor.datatype
    wanted = _CONTENTS.get(datatype)
    given = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if wanted is None:
        raise InvalidInput(f"{where}: {datatype} tensors must be sent as raw_input_contents")
    if given and given != [wanted]:
        raise InvalidInput(
            f"{where}: a {datatype} tensor's values go in contents.{wanted}; got "
            f"{', '.join('contents.' + name for name in given)}"
        )
    values = getattr(tensor.contents, wanted)
    if len(values) != count:
        raise InvalidInput(
            f"{where}: contents.{wanted} has {len(values)} values but shape "
            f"{list(tensor.shape)} needs {count}"
        )
    if datatype == "BYTES":
        return np.asarray([value.decode("utf-8", "replace") for value in values], dtype=object)
    dtype = DATATYPES[datatype]
    try:
        return np.fromiter(values, dtype=dtype, count=count)
    except OverflowError:  # INT8 and INT16 travel in contents.int_contents, 32 bits wide
        info = np.iinfo(dtype)
        raise InvalidInput(
            f"{where}: a value is out of the range of {datatype} ({info.min} to {info.max})"
        ) from None


def _from_raw(datatype: str, raw: bytes, shape: list[int], count: int, where: str) -> NDArray[Any]:
    view = memoryview(raw)
    if datatype == "BYTES":
        return v2.decode_bytes_elements(view, count, where)
    dtype = DATATYPES[datatype]
    if len(view) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: raw_input_contents holds {len(view)} bytes; shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    return np.frombuffer(view, dtype=dtype.newbyteorder("<"), count=count)


def _decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, index: int, max_rows: int
) -> tuple[str, NDArray[Any]]:
    where = f"input {tensor.name!r}" if tensor.name else f"inputs[{index}]"
    if not tensor.name:
        raise InvalidInput(f"{where}: 'name' is missing")
    if tensor.datatype not in DATATYPES:
        raise InvalidInput(f"{where}: 'datatype' must be one of {', '.join(DATATYPES)}")
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"{where}: 'shape' must be non-negative integers, got {shape}")
    if shape and shape[0] > max_rows:  # as over REST: refused before the contents are read
        raise PayloadTooLarge(f"{where}: {shape[0]} rows is more than the limit of {max_rows}")
    count = math.prod(shape)
    if raw is None:
        array = _from_contents(tensor, count, where)
    else:
        if tensor.HasField("contents"):
            raise InvalidInput(
                f"{where}: has contents, but the request sends raw_input_contents; "
                "use one or the other for every input"
            )
        array = _from_raw(tensor.datatype, raw, shape, count, where)
    return tensor.name, array.reshape(shape)


def _requested_outputs(request: pb.ModelInferRequest) -> list[tuple[str, bool]] | None:
    if not request.outputs:
        return None
    requested = []
    for output in request.outputs:
        parameters = _parameters(output.parameters)
        if parameters.get("classification"):
            raise InvalidInput(
                f"output {output.name!r}: the classification extension is not supported; ask "
                "for the 'label' and 'probabilities' outputs instead"
            )
        requested.append((output.name, bool(parameters.get("binary_data", False))))
    return requested


def decode_infer_request(request: pb.ModelInferRequest, max_rows: int) -> v2.InferCall:
    """The request's tensors checked against their declared shapes and datatypes; a tensor of
    more than `max_rows` rows is refused."""
    if not request.inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    raws: list[bytes] | list[None] = list(request.raw_input_contents) or [None] * len(
        request.inputs
    )
    if len(raws) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of 'inputs'"
        )
    tensors: dict[str, NDArray[Any]] = {}
    for index, (tensor, raw) in enumerate(zip(request.inputs, raws, strict=True)):
        name, array = _decode_input(tensor, raw, index, max_rows)
        if name in tensors:
            raise InvalidInput(f"input {name!r} is given twice")
        tensors[name] = array
    parameters = _parameters(request.parameters)
    return v2.InferCall(
        tensors,
        request.id or None,
        parameters,
        _requested_outputs(request),
        bool(parameters.get("binary_data_output", False)),
    )


def wants_raw(request: pb.ModelInferRequest, call: v2.InferCall) -> bool:
    """Raw outputs answer raw inputs, or a request for binary outputs (all or none: the
    protocol forbids mixing the two encodings in one response)."""
    if request.raw_input_contents or call.binary_default:
        return True
    return call.outputs is not None and any(binary for _, binary in call.outputs)


def _fill_contents(
    contents: pb.InferTensorContents, datatype: str, values: NDArray[Any] | list[Any]
) -> None:
    field = _CONTENTS[datatype]
    if datatype == "BYTES":
        items = values if isinstance(values, list) else values.reshape(-1).tolist()
        contents.bytes_contents.extend(
            item if isinstance(item, bytes) else str(item).encode() for item in items
        )
    else:
        assert not isinstance(values, list)
        getattr(contents, field).extend(values.reshape(-1).tolist())


def encode_infer_response(
    model: ModelVersion,
    call: v2.InferCall,
    prediction: Prediction,
    wanted: list[tuple[str, bool]],
    raw: bool,
) -> tuple[pb.ModelInferResponse, list[bytes]]:
    """The response message, with typed contents or, as `raw` says, without its
    `raw_output_contents`: those come apart, to be sent from their own buffers (see
    `serialized`)."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=call.id or ""
    )
    outputs = prediction.outputs
    datatypes = [datatype_of(outputs[name].dtype) for name, _ in wanted]
    raw = raw or any(datatype not in _CONTENTS for datatype in datatypes)
    contents: list[bytes] = []
    for (name, _), datatype in zip(wanted, datatypes, strict=True):
        array = outputs[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        by_class = (
            v2.labels_by_class(model, array, prediction.label_index) if name == "label" else None
        )
        if raw:
            contents.append(
                by_class[0].bytes_elements(by_class[1]) if by_class else v2.tensor_bytes(array)
            )
        else:
            _fill_contents(
                tensor.contents, datatype, by_class[0].values(by_class[1]) if by_class else array
            )
    return response, contents


# raw_output_contents is field 6, length-delimited: its tag, (6 << 3) | 2.
_RAW_OUTPUT_TAG = bytes(((6 << 3) | 2,))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def serialized(response: pb.ModelInferResponse, contents: list[bytes]) -> tuple[bytes, ...]:
    """The encoding of `response` with `contents` as its raw_output_contents, in pieces, each
    raw output its own: the
    message's fields come in field order, and raw_output_contents is its last field, so the
    pieces joined are the bytes protobuf would write, without copying the outputs into them."""
    pieces = [response.SerializeToString()]
    for content in contents:
        pieces += (_RAW_OUTPUT_TAG + _varint(len(content)), content)
    return tuple(pieces)
