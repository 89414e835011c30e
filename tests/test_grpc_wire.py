"""The gRPC transport's encodings, checked against the libraries that define them."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hpack import Decoder

from service.protocols import v2
from service.protocols.grpc import infer
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.server.grpc_wire import _percent_encoded, _timeout_s, literal
from service.store.registry import LoadOptions, ModelVersion, load_registry
from service.store.runtimes import Prediction
from service.store.tensors import datatype_of


def _protobufs_own(
    model: ModelVersion,
    call: v2.InferCall,
    prediction: Prediction,
    wanted: list[tuple[str, bool]],
    raw: bool,
) -> bytes:
    """The response built as a message and serialized by protobuf."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=call.id or ""
    )
    for name, _ in wanted:
        array = prediction.outputs[name]
        datatype = datatype_of(array.dtype)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(v2.tensor_bytes(array))
            continue
        values = array.reshape(-1).tolist()
        field = getattr(tensor.contents, FIELDS[datatype])
        field.extend([str(v).encode() for v in values] if datatype == "BYTES" else values)
    return response.SerializeToString()


FIELDS = {
    "BOOL": "bool_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@pytest.fixture(scope="module")
def iris_versions(iris_repository: Path) -> list[ModelVersion]:
    registry = load_registry(iris_repository, LoadOptions())
    return [registry.resolve("iris", "1"), registry.resolve("iris", "2")]


@pytest.mark.parametrize("rows", [1, 7, 1000])
@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("request_id", ["", "call-1"])
def test_answers_are_the_bytes_protobuf_writes(
    iris_versions: list[ModelVersion], rows: int, raw: bool, request_id: str
) -> None:
    features = np.random.default_rng(rows).normal(4, 2, size=(rows, 4)).astype(np.float32)
    for model in iris_versions:
        prediction = model.runtime.predict({"input": features})
        assert prediction.label_index is not None  # labels go by class
        call = v2.InferCall({"input": features}, id=request_id or None)
        wanted = [("label", raw), ("probabilities", raw)]
        pieces = infer.encode_infer_response(model, call, prediction, wanted, raw)
        expected = _protobufs_own(model, call, prediction, wanted, raw)
        assert b"".join(pieces) == expected
        assert len(pieces) == (5 if raw else 1)  # raw outputs travel as pieces of their own


@pytest.mark.parametrize(
    "array",
    [
        np.array([[1.5, -0.0], [np.nan, np.inf]], dtype=np.float32),
        np.array([1e300, -2.5], dtype=np.float64),
        np.array([[0, -1, 2**40]], dtype=np.int64),
        np.array([-(2**31), 7], dtype=np.int32),
        np.array([2**32 - 1, 0], dtype=np.uint32),
        np.array([2**64 - 1], dtype=np.uint64),
        np.array([True, False, True]),
        np.array(["a", "sétosa", "x" * 300]),
        np.array(7.0, dtype=np.float32),  # a scalar: no shape field
    ],
    ids=lambda array: f"{array.dtype}-{array.shape}",
)
def test_typed_contents_of_every_type_are_the_bytes_protobuf_writes(
    iris_versions: list[ModelVersion], array: np.ndarray[Any, Any]
) -> None:
    model = iris_versions[0]
    prediction = Prediction({"output": array})
    call = v2.InferCall({}, id="typed")
    pieces = infer.encode_infer_response(model, call, prediction, [("output", False)], False)
    assert b"".join(pieces) == _protobufs_own(model, call, prediction, [("output", False)], False)


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 300, 70_000])
def test_header_fields_we_write_are_read_by_an_hpack_decoder(length: int) -> None:
    value = b"v" * length
    block = literal(b"grpc-message", value) + literal(b"x-request-id", b"abc")
    decoder = Decoder()
    decoder.max_header_list_size = 1 << 20
    assert decoder.decode(block, raw=True) == [(b"grpc-message", value), (b"x-request-id", b"abc")]
    # Literals without indexing leave the client's table as it was.
    assert not decoder.header_table.dynamic_entries


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0),
        (b"250m", 0.25),
        (b"3M", 180.0),
        (b"2H", 7200.0),
        (b"500u", 0.0005),
        (b"100n", 1e-7),
        (b"99999999S", 99999999.0),
        (b"123456789S", None),  # gRPC allows 8 digits
        (b"10", None),
        (b"S", None),
        (b"-1S", None),
        (b"1s", None),
    ],
)
def test_grpc_timeout(value: bytes, seconds: float | None) -> None:
    assert _timeout_s(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_grpc_message_is_percent_encoded() -> None:
    assert _percent_encoded("plain text: 4 < 5") == b"plain text: 4 < 5"
    assert _percent_encoded("100% sure") == b"100%25 sure"
    assert _percent_encoded("naïve\n") == b"na%C3%AFve%0A"


def _request_with_raw_contents() -> Any:
    message = pb.ModelInferRequest(model_name="iris", model_version="2", id="split")
    message.parameters["binary_data_output"].bool_param = True
    for name, rows in (("a", 3), ("b", 200)):
        message.inputs.add(name=name, datatype="FP32", shape=[rows, 4])
        message.raw_input_contents.append(np.arange(rows * 4, dtype="<f4").tobytes())
    message.outputs.add(name="label")
    return message


@pytest.mark.parametrize("container", [bytes, bytearray, memoryview])
def test_raw_contents_split_out_parse_as_protobuf_parses_them(container: type) -> None:
    """The message without its raw contents parses to the message without them, the contents
    come out in order and unchanged, wherever the fields lie among the others (protobuf
    merges a message sent in parts: raw contents may come before, between or after them)."""
    message = _request_with_raw_contents()
    without = pb.ModelInferRequest()
    without.CopyFrom(message)
    del without.raw_input_contents[:]
    head = without.SerializeToString()
    raws = [bytes(r) for r in message.raw_input_contents]
    raw_fields = [pb.ModelInferRequest(raw_input_contents=[r]).SerializeToString() for r in raws]
    middle = len(head) // 2
    while True:  # a point between two of the head's fields
        try:
            pb.ModelInferRequest.FromString(head[:middle])
            break
        except Exception:
            middle += 1
    for encoding in (
        message.SerializeToString(),
        raw_fields[0] + head + raw_fields[1],
        head[:middle] + raw_fields[0] + head[middle:] + raw_fields[1],
    ):
        rest, split = infer.split_raw_contents(container(encoding))
        assert [bytes(r) for r in split] == raws
        assert pb.ModelInferRequest.FromString(bytes(rest)) == without
        whole = pb.ModelInferRequest.FromString(encoding)
        assert list(whole.raw_input_contents) == raws


@pytest.mark.parametrize(
    "encoding",
    [
        b"",  # an empty message: nothing to split
        b"\x0a\x04iris",  # no raw contents
        b"\x3a\x10abc",  # raw contents longer than the message
        b"\x0a\x04iris\x3a",  # a field cut after its tag
        b"\x0b\x0c",  # a group
        b"\x3a" + b"\xff" * 11,  # a varint past ten bytes
    ],
)
def test_messages_the_split_cannot_follow_come_back_whole(encoding: bytes) -> None:
    """For protobuf's parser to take or refuse as it would have."""
    rest, raws = infer.split_raw_contents(encoding)
    assert rest is encoding
    assert raws == []
