"""Open Inference Protocol (V2) inference: JSON tensors and the binary tensor data extension."""

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import orjson
from numpy.typing import NDArray

from service.errors import InvalidInput, PayloadTooLarge
from service.protocols import envelope
from service.protocols.arrays import SMALL_BYTES, array_from_json, array_with_nulls
from service.store.labels import ClassLabels
from service.store.registry import ModelVersion
from service.store.runtimes import Prediction
from service.store.tensors import DATATYPES, datatype_of

HEADER_LENGTH = "inference-header-content-length"
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
# KServe's client (InferenceRESTClient with an InferRequest) adds `model_name` to the body. The
# path names the model, so it is ignored, as KServe's own server does; a body forwarded to
# several models (an inference graph) may name another one. tritonclient adds nothing.
_IGNORED_REQUEST_KEYS = frozenset({"model_name"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})


@dataclass
class InferCall:
    """A decoded V2 request: tensors as arrays plus what the client wants back."""

    tensors: dict[str, NDArray[Any]]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # (name, binary) per requested output; None means every output.
    outputs: list[tuple[str, bool]] | None = None
    binary_default: bool = False


def requested_timeout_s(call: "InferCall") -> float | None:
    """The request's own deadline: `parameters.timeout` in microseconds, as tritonclient sends."""
    value = call.parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput("parameters.timeout must be a non-negative integer of microseconds")
    return value / 1_000_000 if value > 0 else None


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def _check_keys(
    obj: dict[str, Any], allowed: frozenset[str], where: str, ignored: frozenset[str] = frozenset()
) -> None:
    """Refuses unknown keys: a misspelt `outputs` or `parameters` would otherwise be dropped in
    silence, and the client answered with what it did not ask for."""
    for key in obj:
        if key not in allowed and key not in ignored:
            raise InvalidInput(
                f"{where}: unknown field {key!r}; allowed: {', '.join(sorted(allowed))}"
            )


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    return value


def decode_bytes_elements(raw: memoryview, count: int, where: str) -> NDArray[Any]:
    """BYTES tensors in binary form: each element is a 4-byte little-endian length, then bytes."""
    items: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: truncated BYTES element")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"{where}: truncated BYTES element")
        items.append(bytes(raw[offset : offset + size]).decode("utf-8", "replace"))
        offset += size
    if len(items) != count:
        raise InvalidInput(f"{where}: {len(items)} BYTES elements for a shape of {count}")
    return np.asarray(items, dtype=object)


def _field(fields: Mapping[str, envelope.Field], key: str, default: Any = None) -> Any:
    raw = fields.get(key)
    return default if raw is None else envelope.value(raw)


def _decode_input(
    tensor: dict[str, msgspec.Raw],
    binary: memoryview,
    offset: int,
    index: int,
    max_rows: int,
    nulls: bool = False,
) -> tuple[str, NDArray[Any], int]:
    where = f"inputs[{index}]"
    _check_keys(tensor, _INPUT_KEYS, where)
    name = _field(tensor, "name")
    if not isinstance(name, str):
        raise InvalidInput(f"{where}: 'name' must be a string")
    where = f"input {name!r}"
    datatype = _field(tensor, "datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where}: 'datatype' must be one of {', '.join(DATATYPES)}")
    shape = _shape(_field(tensor, "shape"), where)
    if shape and shape[0] > max_rows:
        # Refused before its data is decoded: a row count is cheap to claim, costly to parse.
        raise PayloadTooLarge(f"{where}: {shape[0]} rows is more than the limit of {max_rows}")
    count = math.prod(shape)
    parameters = _dict(_field(tensor, "parameters", {}), f"{where}: 'parameters'")
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise InvalidInput(f"{where}: give either 'data' or 'binary_data_size', not both")
        array, offset = _binary_input(binary, offset, size, datatype, shape, where)
        return name, array, offset
    if "data" not in tensor:
        raise InvalidInput(f"{where}: 'data' is missing")

    def check(dims: tuple[int, ...]) -> None:
        if (values := math.prod(dims)) != count:
            raise InvalidInput(
                f"{where}: 'data' has {values} values but shape {shape} needs {count}"
            )

    if nulls and datatype.startswith("FP"):
        array = array_with_nulls(memoryview(tensor["data"]), where, check)
    else:
        array = array_from_json(memoryview(tensor["data"]), datatype, where, check)
    if datatype[0] in "IU":
        _check_integer_range(array, datatype, where)
    return name, array.reshape(shape), offset


def _check_integer_range(array: NDArray[Any], datatype: str, where: str) -> None:
    """JSON values of an integer datatype must be integers it can hold: they are taken as
    given, and a 1000 declared INT8 (or a -1 declared UINT8) says the client meant otherwise."""
    if not array.size:
        return
    info = np.iinfo(DATATYPES[datatype])
    low, high = array.min(), array.max()
    if array.dtype.kind == "f" and not np.array_equal(array, np.trunc(array)):
        raise InvalidInput(f"{where}: datatype {datatype} takes integers; 'data' has fractions")
    if low < info.min or high > info.max:
        raise InvalidInput(
            f"{where}: {high if high > info.max else low} is out of the range of {datatype} "
            f"({info.min} to {info.max})"
        )


def _binary_input(
    binary: memoryview, offset: int, size: Any, datatype: str, shape: list[int], where: str
) -> tuple[NDArray[Any], int]:
    """The tensor at `offset` of the binary part, and the offset of the next one."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}: 'binary_data_size' must be a non-negative integer")
    if offset + size > len(binary):
        raise InvalidInput(f"{where}: binary_data_size {size} runs past the end of the body")
    raw = binary[offset : offset + size]
    count = math.prod(shape)
    if datatype == "BYTES":
        array = decode_bytes_elements(raw, count, where)
    else:
        dtype = DATATYPES[datatype]
        if size != count * dtype.itemsize:
            raise InvalidInput(
                f"{where}: binary_data_size {size} does not match shape {shape} "
                f"of {datatype} ({count * dtype.itemsize} bytes)"
            )
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count)
        if not array.flags.aligned:
            # The tensor starts wherever the JSON header's length puts it. Unaligned, every
            # pass over it takes a slow path (a model call and the drift window each about a
            # sixth longer on 10,000 rows): one copy costs a tenth of that.
            array = array.copy()
    return array.reshape(shape), offset + size


def _requested_outputs(value: Any) -> list[tuple[str, bool]]:
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    requested: list[tuple[str, bool]] = []
    for index, obj in enumerate(value):
        where = f"outputs[{index}]"
        item = _dict(obj, where)
        _check_keys(item, _OUTPUT_KEYS, where)
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"{where}: 'name' must be a string")
        parameters = _dict(item.get("parameters", {}), f"{where}: 'parameters'")
        requested.append((name, bool(parameters.get("binary_data", False))))
    return requested


def decode_infer_request(
    body: bytes | bytearray, header_length: str | None, max_rows: int, nulls: bool = False
) -> InferCall:
    """The request's tensors and options; a tensor of more than `max_rows` rows is refused
    before its data is decoded. With `nulls`, a null in a floating-point tensor's JSON data is
    a missing value (NaN)."""
    if header_length is None and len(body) <= SMALL_BYTES:
        call = _plain_small_request(body, max_rows)
        if call is not None:
            return call
    return _decode_fields(body, header_length, max_rows, nulls)


def _decode_fields(
    body: bytes | bytearray, header_length: str | None, max_rows: int, nulls: bool
) -> InferCall:
    """The general decoder: the body's fields one by one, each checked, its tensors' data
    decoded only once the request around them is known to be sound."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        try:
            split = int(header_length)
        except ValueError:
            raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= split <= len(view):
            raise InvalidInput(
                f"Inference-Header-Content-Length {split} is outside the body of {len(view)} bytes"
            )
        json_part, binary = view[:split], view[split:]
    request = envelope.fields_and_objects(json_part, "the request body must be a JSON object")
    _check_keys(request, _REQUEST_KEYS, "request", _IGNORED_REQUEST_KEYS)
    inputs = request.get("inputs")
    if isinstance(inputs, msgspec.Raw):
        inputs = envelope.objects(inputs, "inputs")
    if not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    tensors: dict[str, NDArray[Any]] = {}
    offset = 0
    for index, tensor in enumerate(inputs):
        name, array, offset = _decode_input(tensor, binary, offset, index, max_rows, nulls)
        if name in tensors:
            raise InvalidInput(f"input {name!r} is given twice")
        tensors[name] = array
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any "
            "input's binary_data_size"
        )
    request_id = _field(request, "id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = _dict(_field(request, "parameters", {}), "'parameters'")
    outputs = _requested_outputs(_field(request, "outputs")) if "outputs" in request else None
    return InferCall(
        tensors, request_id, parameters, outputs, bool(parameters.get("binary_data_output", False))
    )


_PLAIN_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data"})
_PLAIN_DATATYPES = frozenset({"FP16", "FP32", "FP64"})


def _plain_small_request(body: bytes | bytearray, max_rows: int) -> InferCall | None:
    """A small JSON request of the plainest kind decoded in one pass, or None for the general
    decoder: the same tensors it makes, from the same parser, at a fraction of the cost of
    decoding field by field (on single rows, decoding cost more than the model call).

    Plain: only `inputs` and `id`; each input with exactly name, shape, datatype (floating
    point) and data, within the row limit; numbers only in its data. Anything else (and every
    error) is left to the general decoder, which says what is wrong.
    """
    if b"true" in body or b"false" in body:  # a boolean among numbers would read as 1 or 0
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict or not request.keys() <= {"inputs", "id"}:
        return None
    inputs, request_id = request.get("inputs"), request.get("id")
    if (
        type(inputs) is not list
        or not inputs
        or not (request_id is None or type(request_id) is str)
    ):
        return None
    tensors: dict[str, NDArray[Any]] = {}
    for tensor in inputs:
        plain = _plain_tensor(tensor, max_rows)
        if plain is None or plain[0] in tensors:
            return None
        tensors[plain[0]] = plain[1]
    return InferCall(tensors, request_id)


def _plain_tensor(tensor: Any, max_rows: int) -> tuple[str, NDArray[Any]] | None:
    """A plain input's name and array, as the general decoder makes them; None if not plain."""
    if type(tensor) is not dict or tensor.keys() != _PLAIN_INPUT_KEYS:
        return None
    name, shape, data = tensor["name"], tensor["shape"], tensor["data"]
    if (
        type(name) is not str
        or tensor["datatype"] not in _PLAIN_DATATYPES
        or type(data) is not list
        or type(shape) is not list
    ):
        return None
    for size in shape:
        if type(size) is not int or size < 0:  # a bool is not an int here
            return None
    if shape and shape[0] > max_rows:
        return None
    try:
        array = np.asarray(data)  # as the general decoder makes it from the same values
    except ValueError:  # ragged
        return None
    if array.dtype.kind not in "iuf" or array.size != math.prod(shape):
        return None
    return name, array.reshape(shape)


def select_outputs(model: ModelVersion, call: InferCall) -> list[tuple[str, bool]]:
    known = [spec.name for spec in model.signature.outputs]
    if call.outputs is None:
        return [(name, call.binary_default) for name in known]
    asked: set[str] = set()
    for name, _ in call.outputs:
        if name not in known:
            raise InvalidInput(
                f"model {model.name!r} has no output {name!r}; it has "
                f"{', '.join(repr(k) for k in known)}"
            )
        if name in asked:  # answered once per name: a response names each output once
            raise InvalidInput(f"output {name!r} is asked for twice")
        asked.add(name)
    return call.outputs


def _ascii_elements(array: NDArray[np.str_]) -> bytes | None:
    """BYTES elements of an ASCII string array, built with array operations; None if not ASCII.

    Class labels make most string outputs, thousands per response: a Python loop over them
    would cost more than the model call.
    """
    count = array.size
    codes = np.ascontiguousarray(array.reshape(-1)).view(np.uint32).reshape(count, -1)
    width = codes.shape[1]
    if width == 0 or codes.max() >= 128:
        return None
    # numpy pads strings with NULs at the end; a NUL inside a string takes the general path.
    used = codes != 0
    if (used[:, 1:] & ~used[:, :-1]).any():
        return None
    table = np.empty((count, 4 + width), dtype=np.uint8)
    table[:, :4] = used.sum(axis=1, dtype="<u4").view(np.uint8).reshape(count, 4)
    table[:, 4:] = codes
    keep = np.ones((count, 4 + width), dtype=bool)
    keep[:, 4:] = used
    return table[keep].tobytes()


def tensor_bytes(array: NDArray[Any]) -> bytes:
    if array.dtype.kind in "OUS":
        if array.dtype.kind == "U" and array.size:
            fast = _ascii_elements(array)
            if fast is not None:
                return fast
        parts = []
        for item in array.reshape(-1).tolist():
            encoded = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def tensor_buffer(array: NDArray[Any]) -> bytes | memoryview:
    """What `tensor_bytes` gives, as the memory of a little-endian array when the tensor holds
    numbers: joined into the response as it is, not copied once more before."""
    if array.dtype.kind in "OUS" or not array.size:  # an empty view cannot be cast to bytes
        return tensor_bytes(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data.cast("B")


# Values per block when a large array of several dimensions is written block by block.
_BLOCK_VALUES = 1 << 16


def json_array(array: NDArray[Any]) -> Any:
    """An array in a form orjson writes: natively for numbers (NaN and Infinity become null)."""
    if array.dtype.kind in "OUS" or array.dtype == np.float16:
        return array.tolist()
    if array.ndim > 1 and array.size > _BLOCK_VALUES:
        return _written_by_rows(array)
    return np.ascontiguousarray(array)


def _written_by_rows(array: NDArray[Any]) -> orjson.Fragment:
    """orjson writes an array of several dimensions through a buffer four times the size of
    its text; written in blocks of rows and spliced in, it costs its text once more."""
    rows = max(1, _BLOCK_VALUES * len(array) // array.size)
    pieces = [b"["]
    for start in range(0, len(array), rows):
        block = np.ascontiguousarray(array[start : start + rows])
        pieces += [orjson.dumps(block, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1], b","]
    pieces[-1] = b"]"
    return orjson.Fragment(b"".join(pieces))


def labels_by_class(
    model: ModelVersion, label: NDArray[Any], index: NDArray[np.intp] | None
) -> tuple[ClassLabels, NDArray[np.intp]] | None:
    """The model's classes and each label's position, when string labels go per class."""
    if index is None or model.labels is None or label.dtype.kind not in "OUS":
        return None
    return model.labels, index


def encode_infer_response(
    model: ModelVersion,
    call: InferCall,
    prediction: Prediction,
    wanted: list[tuple[str, bool]],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    parts, json_length = encode_infer_response_parts(model, call, prediction, wanted)
    return b"".join(parts), json_length


def encode_infer_response_parts(
    model: ModelVersion,
    call: InferCall,
    prediction: Prediction,
    wanted: list[tuple[str, bool]],
) -> tuple[list[bytes | memoryview], int | None]:
    """The response body in pieces (the JSON header, then each binary output's bytes, the
    arrays' own memory where it can be), and the JSON header's length when binary outputs
    follow it. A connection writes the pieces as they are, without joining them first.

    String labels are encoded per class when the prediction carries their class positions.
    """
    outputs, label_index = prediction.outputs, prediction.label_index
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, binary in wanted:
        array = outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        by_class = labels_by_class(model, array, label_index) if name == "label" else None
        if binary:
            raw = by_class[0].bytes_elements(by_class[1]) if by_class else tensor_buffer(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif by_class:
            entry["data"] = by_class[0].values(by_class[1])
        else:
            entry["data"] = json_array(array.reshape(-1))
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if call.id is not None:
        response["id"] = call.id
    response["outputs"] = tensors
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return [header], None
    return [header, *chunks], len(header)
