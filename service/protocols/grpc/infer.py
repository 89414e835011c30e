"""Open Inference Protocol over gRPC: ModelInfer messages to arrays and predictions back.

Both encodings of a tensor are spoken: typed `contents` and `raw_input_contents` /
`raw_output_contents` (little-endian bytes, what `tritonclient.grpc` sends). A request decodes
to the same `InferCall` as a REST one, so outputs, parameters and the timeout mean the same.
"""

import functools
import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput, PayloadTooLarge
from service.protocols import v2
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.store.labels import ClassLabels, varint
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
# A message as the transport hands it over: its own buffer, or a view of a read.
Received = bytes | bytearray | memoryview


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


def _from_raw(
    datatype: str, raw: Received, shape: list[int], count: int, where: str
) -> NDArray[Any]:
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
    tensor: pb.ModelInferRequest.InferInputTensor, raw: Received | None, index: int, max_rows: int
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


# ModelInferRequest's raw_input_contents: field 7, length-delimited.
_RAW_INPUT_FIELD = 7
_LENGTH_DELIMITED = 2


def _varint_at(data: Received, pos: int) -> tuple[int, int]:
    """The varint at `pos` and where it ends; IndexError past the end, ValueError if longer
    than protobuf allows."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("a varint of more than ten bytes")


def split_raw_contents(data: Received) -> tuple[Received, list[Received]]:
    """A ModelInferRequest's encoding without its raw_input_contents, and those contents as
    views of `data`, in order: protobuf's parser would copy each into a bytes object (a
    10,000-row request's 160 kB, twice with the copy its field hands out), where the arrays
    need only read them. The rest of the message keeps its fields and their order, so it
    parses to what the whole message would. A message this walk cannot follow (a group, a
    truncated field) comes back whole, for protobuf's parser to refuse as it would have."""
    view = memoryview(data)
    end = len(view)
    kept: list[Received] = []
    raws: list[Received] = []
    start = pos = 0
    try:
        while pos < end:
            field_start = pos
            tag, pos = _varint_at(view, pos)
            wire = tag & 7
            if wire == _LENGTH_DELIMITED:
                length, pos = _varint_at(view, pos)
                if pos + length > end:
                    return data, []
                if tag >> 3 == _RAW_INPUT_FIELD:
                    kept.append(view[start:field_start])
                    raws.append(view[pos : pos + length])
                    start = pos + length
                pos += length
            elif wire == 0:
                pos = _varint_at(view, pos)[1]
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:  # groups, or not a wire type at all
                return data, []
    except (IndexError, ValueError):
        return data, []
    if pos != end:
        return data, []
    if not raws:
        return data, []
    kept.append(view[start:end])
    return b"".join(kept), raws


def decode_infer_request(
    request: pb.ModelInferRequest, max_rows: int, raw_contents: list[Received] | None = None
) -> v2.InferCall:
    """The request's tensors checked against their declared shapes and datatypes; a tensor of
    more than `max_rows` rows is refused. `raw_contents`, where given, are the request's
    raw_input_contents taken out of its encoding (split_raw_contents)."""
    if not request.inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    raws: list[Received | None] = [*(raw_contents or request.raw_input_contents)]
    raws = raws or [None] * len(request.inputs)
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


def wants_raw(request: pb.ModelInferRequest, call: v2.InferCall, raw_inputs: bool = False) -> bool:
    """Raw outputs answer raw inputs, or a request for binary outputs (all or none: the
    protocol forbids mixing the two encodings in one response)."""
    if raw_inputs or request.raw_input_contents or call.binary_default:
        return True
    return call.outputs is not None and any(binary for _, binary in call.outputs)


# The response is written as protobuf would write it, field by field, rather than built as a
# message: filling a message's repeated fields from Python values (a list per tensor, a
# Python object per number) cost more than the rest of a one-row answer; floats go from their
# array's bytes, labels from their class's encoding made once. Fields in field-number order,
# packed repeated scalars, empty fields left out: the bytes protobuf itself writes (tested).


_TAGS = [bytes(((number << 3) | 2,)) for number in range(16)]


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes, a message, packed scalars)."""
    return _TAGS[number] + varint(len(payload)) + payload


@functools.lru_cache(maxsize=1024)
def _named(first: str, second: str) -> bytes:
    """Fields 1 and 2, strings: a response's model name and version, a tensor's name and
    datatype; the same few on every answer."""
    return _field(1, first.encode()) + _field(2, second.encode())


# InferTensorContents' packed floats: field and little-endian dtype.
_FLOATS = {"FP32": (6, "<f4"), "FP64": (7, "<f8")}
# raw_output_contents is field 6 of ModelInferResponse, length-delimited.
_RAW_OUTPUT_TAG = bytes(((6 << 3) | 2,))


def _contents(
    datatype: str, values: NDArray[Any], by_class: tuple[ClassLabels, NDArray[np.intp]] | None
) -> bytes:
    """InferTensorContents with `values` (or, for labels by class, their positions)."""
    if by_class is not None:
        labels, index = by_class
        return labels.protobuf_elements(index)  # bytes_contents, field 8
    if datatype in _FLOATS:
        number, dtype = _FLOATS[datatype]
        data = np.ascontiguousarray(values, dtype=dtype).tobytes()
        return _field(number, data) if data else b""
    if datatype == "BYTES":
        return b"".join(
            _field(8, item if isinstance(item, bytes) else str(item).encode())
            for item in values.reshape(-1).tolist()
        )
    message = pb.InferTensorContents()  # integers and booleans: varints, protobuf's own
    getattr(message, _CONTENTS[datatype]).extend(values.reshape(-1).tolist())
    return message.SerializeToString()


def encode_infer_response(
    model: ModelVersion,
    call: v2.InferCall,
    prediction: Prediction,
    wanted: list[tuple[str, bool]],
    raw: bool,
) -> tuple[bytes | memoryview, ...]:
    """The ModelInferResponse's encoding, in pieces joined on the wire: with typed contents, or
    with `raw_output_contents` as `raw` says, each raw output a piece of its own (it is the
    message's last field), sent from its own buffer (a numeric array's own memory) instead of
    copied into the message."""
    outputs = prediction.outputs
    datatypes = [datatype_of(outputs[name].dtype) for name, _ in wanted]
    raw = raw or any(datatype not in _CONTENTS for datatype in datatypes)
    head = [_named(model.name, str(model.version))]
    if call.id:
        head.append(_field(3, call.id.encode()))
    pieces: list[bytes | memoryview] = []
    for (name, _), datatype in zip(wanted, datatypes, strict=True):
        array = outputs[name]
        by_class = (
            v2.labels_by_class(model, array, prediction.label_index) if name == "label" else None
        )
        tensor = _named(name, datatype)
        if array.ndim:
            tensor += _field(3, b"".join(varint(size) for size in array.shape))
        if raw:
            content = (
                by_class[0].bytes_elements(by_class[1]) if by_class else v2.tensor_buffer(array)
            )
            pieces += (_RAW_OUTPUT_TAG + varint(len(content)), content)
        else:
            contents = _contents(datatype, array, by_class)
            if contents:
                tensor += _field(5, contents)
        head.append(_field(5, tensor))
    return (b"".join(head), *pieces)
