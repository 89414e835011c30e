"""V2 decoding and encoding, including the binary tensor data extension."""

import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.errors import InvalidInput, PayloadTooLarge
from service.protocols import v2
from service.protocols.v2 import (
    InferCall,
    decode_infer_request,
    encode_infer_response,
    json_array,
    select_outputs,
    tensor_buffer,
    tensor_bytes,
)
from service.server.allocator import return_large_buffers
from service.store.registry import LoadOptions, ModelVersion, load_registry
from service.store.runtimes import Prediction


@pytest.fixture(scope="module")
def iris(iris_repository: Path) -> ModelVersion:
    return load_registry(iris_repository, LoadOptions()).resolve("iris", "1")


def binary_request(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, str]:
    encoded = orjson.dumps(header)
    return encoded + b"".join(blobs), str(len(encoded))


def test_binary_input_is_read_without_copying() -> None:
    rows = np.arange(8, dtype="<f4").reshape(2, 4)
    body, length = binary_request(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 32},
                }
            ]
        },
        rows.tobytes(),
    )
    array = decode_infer_request(body, length, 1000).tensors["input"]
    np.testing.assert_array_equal(array, rows)
    assert not array.flags.owndata  # a view on the request body


def test_binary_bytes_tensor() -> None:
    words = [b"setosa", b"", "vé".encode()]
    blob = b"".join(struct.pack("<I", len(w)) + w for w in words)
    body, length = binary_request(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
        blob,
    )
    assert decode_infer_request(body, length, 1000).tensors["s"].tolist() == ["setosa", "", "vé"]


@pytest.mark.parametrize(
    ("size", "length_delta", "phrase"),
    [
        (31, 0, "does not match shape"),
        (40, 0, "past the end"),
        (32, -3, "not valid JSON"),
        (16, 0, "does not match"),
    ],
)
def test_binary_size_errors(size: int, length_delta: int, phrase: str) -> None:
    body, length = binary_request(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        },
        bytes(32),
    )
    with pytest.raises(InvalidInput, match=phrase):
        decode_infer_request(body, str(int(length) + length_delta), 1000)


def test_unclaimed_binary_bytes_are_an_error() -> None:
    body, length = binary_request(
        {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, bytes(8)
    )
    with pytest.raises(InvalidInput, match="not claimed"):
        decode_infer_request(body, length, 1000)


@pytest.mark.parametrize("length", ["abc", "-1", "999999"])
def test_bad_header_length(length: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        decode_infer_request(b"{}", length, 1000)


def test_encode_mixes_json_and_binary_outputs(iris: ModelVersion) -> None:
    request = orjson.dumps(
        {
            "id": "x",
            "inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
            ],
            "outputs": [
                {"name": "label", "parameters": {"binary_data": True}},
                {"name": "probabilities"},
            ],
        }
    )
    call = decode_infer_request(request, None, 1000)
    prediction = iris.runtime.predict({"input": call.tensors["input"].astype(np.float32)})
    body, length = encode_infer_response(iris, call, prediction, select_outputs(iris, call))
    assert length is not None
    header = orjson.loads(body[:length])
    label, probabilities = header["outputs"]
    assert header["id"] == "x"
    assert label["datatype"] == "BYTES"
    assert "data" not in label
    size = label["parameters"]["binary_data_size"]
    (first,) = struct.unpack_from("<I", body, length)
    assert body[length + 4 : length + 4 + first].decode() == prediction.outputs["label"][0]
    assert len(body) == length + size
    assert probabilities["shape"] == [1, 3]


def test_nan_outputs_become_null_not_bare_tokens(iris: ModelVersion) -> None:
    call = decode_infer_request(
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ]
            }
        ),
        None,
        1000,
    )
    prediction = Prediction(
        {
            "label": np.array(["setosa"]),
            "probabilities": np.array([[np.nan, np.inf, 0.5]], dtype=np.float32),
        }
    )
    body, _ = encode_infer_response(iris, call, prediction, select_outputs(iris, call))
    assert b"NaN" not in body
    assert b"Infinity" not in body
    assert orjson.loads(body)["outputs"][1]["data"] == [None, None, 0.5]


ROW_REQUEST = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}


@pytest.mark.parametrize("model_name", ["iris", "another_model"])
def test_model_name_from_kserve_clients_is_ignored(model_name: str) -> None:
    """KServe's InferenceRESTClient puts `model_name` in the body; the path names the model."""
    call = decode_infer_request(orjson.dumps({"model_name": model_name, **ROW_REQUEST}), None, 1000)
    np.testing.assert_array_equal(call.tensors["input"], [[1, 2, 3, 4]])


@pytest.mark.parametrize("key", ["model_version", "output", "paramters", "from_grpc"])
def test_other_unknown_fields_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput, match=f"unknown field '{key}'; allowed: id, inputs, outputs"):
        decode_infer_request(orjson.dumps({key: 1, **ROW_REQUEST}), None, 1000)


def _peak_growth(decode: Any) -> int:
    """How far this process's resident memory rises above where it stands while `decode` runs."""

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    baseline = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from VmRSS
    decode()
    return status("VmHWM") - baseline


def _json_request(rows: int) -> bytes:
    data = np.random.default_rng(0).uniform(0, 8, size=(rows, 4)).round(1).tolist()
    tensor = {"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": data}
    return orjson.dumps({"inputs": [tensor]})


@pytest.mark.parametrize("padding", range(8))
def test_a_binary_tensor_wherever_its_header_ends_reaches_the_model_aligned(padding: int) -> None:
    """The JSON header's length places the tensor in the body; one that does not start on a
    multiple of its item size is copied, so the model and the drift window read it on their
    fast paths; one that does is read in place."""
    rows = np.arange(40, dtype="<f4").reshape(10, 4)
    header = {
        "id": "x" * padding,
        "inputs": [
            {
                "name": "input",
                "shape": [10, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": rows.nbytes},
            }
        ],
    }
    body, length = binary_request(header, rows.tobytes())
    array = decode_infer_request(body, length, 1000).tensors["input"]
    np.testing.assert_array_equal(array, rows)
    assert array.flags.aligned
    raw = np.frombuffer(body, dtype=np.uint8)
    in_place = (raw.ctypes.data + int(length)) % 4 == 0
    assert np.shares_memory(array, raw) == in_place


def test_json_tensors_decode_in_twice_their_body_on_top_of_it() -> None:
    """A float64 array of four short numbers per row is 1.8 times the JSON it came from."""
    return_large_buffers()  # as the server's workers do
    decode_infer_request(_json_request(50_000), None, 1_000_000)  # the parser's one-time set-up
    body = _json_request(1_000_000)
    growth = _peak_growth(lambda: decode_infer_request(body, None, 1_000_000))
    assert growth <= 2 * len(body), f"{growth / len(body):.1f} times the body"


def test_binary_tensors_decode_without_a_copy() -> None:
    raw = np.ones((500_000, 4), dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [500_000, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    body, length = binary_request(header, raw)
    growth = _peak_growth(lambda: decode_infer_request(body, length, 1_000_000))
    assert growth <= 0.2 * len(body), f"{growth / len(body):.1f} times the body"


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).random((100_000, 3), dtype=np.float32),
        np.array([[np.nan, 1.0, np.inf]] * 40_000),
        np.arange(300_000).reshape(100_000, 3),
        np.ones((2, 3, 40_000)),
    ],
    ids=["probabilities", "non-finite", "integers", "three-dimensional"],
)
def test_large_arrays_written_by_blocks_of_rows_are_what_orjson_writes(array: np.ndarray) -> None:
    want = orjson.dumps({"p": array}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert orjson.dumps({"p": json_array(array)}, option=orjson.OPT_SERIALIZE_NUMPY) == want


def test_a_number_beyond_fp64_is_named_without_a_position_inside_its_array() -> None:
    """orjson parses the data array alone: its line and column would point nowhere in the
    request the client sent."""
    body = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[[1e400,1,1,1]]}]}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body, None, 1000)
    assert refused.value.message == "input 'input': number is infinity when parsed as double"


@pytest.mark.parametrize(
    "array",
    [
        np.array(7.0, dtype=np.float32),  # a scalar
        np.zeros((0, 3), dtype=np.float32),  # no rows: an empty view cannot be cast to bytes
        np.array([True, False]),
        np.array([1.5, -2.0], dtype=np.float16),
        np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2],  # big-endian and not contiguous
        np.array(["setosa", "versicolor"]),
    ],
    ids=lambda array: f"{array.dtype}-{array.shape}",
)
def test_a_tensors_buffer_holds_its_bytes(array: np.ndarray[Any, Any]) -> None:
    # What binary answers send from the array's memory is what a copy of it would hold.
    assert bytes(tensor_buffer(array)) == tensor_bytes(array)


def _same_call(plain: InferCall, general: InferCall) -> bool:
    return (
        plain.tensors.keys() == general.tensors.keys()
        and all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(plain.tensors.values(), general.tensors.values(), strict=True)
        )
        and (plain.id, plain.parameters, plain.outputs, plain.binary_default)
        == (general.id, general.parameters, general.outputs, general.binary_default)
    )


def _agree(body: bytes, max_rows: int = 8) -> bool | None:
    """Whether the plain decoder took `body` (None: it left it to the general one), after
    checking that whatever it took, the general decoder takes alike."""
    plain = v2._plain_small_request(body, max_rows)
    try:
        general = v2._decode_fields(body, None, max_rows, False)
    except (InvalidInput, PayloadTooLarge):
        assert plain is None, f"the plain decoder took what the general one refuses: {body!r}"
        return None
    if plain is None:
        return None
    assert _same_call(plain, general), body
    return True


@pytest.mark.parametrize(
    ("body", "taken"),
    [
        (b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[[1,2.5,-0.0,3]]}]}', 1),
        (b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP64","data":[1,2,3,4]}]}', 1),
        (
            b'{"id":"a","inputs":[{"name":"x","shape":[4,1],"datatype":"FP16","data":[[1,2],[3,4]]}]}',
            1,
        ),
        (
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[18446744073709551615]}]}',
            1,
        ),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[-0]}]}', 1),
        (
            b'{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1]},'
            b'{"name":"b","shape":[1],"datatype":"FP32","data":[2]}]}',
            1,
        ),
        # booleans, nulls and strings among numbers; ragged rows; a shape that does not match
        (b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[true,1.5]}]}', 0),
        (b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[null,1.5]}]}', 0),
        (b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":["1",1.5]}]}', 0),
        (b'{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[[1,2],[3]]}]}', 0),
        (b'{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}', 0),
        # shapes: a bool, a negative size, too many rows; names twice; other datatypes
        (b'{"inputs":[{"name":"x","shape":[true,2],"datatype":"FP32","data":[1,2]}]}', 0),
        (b'{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2]}]}', 0),
        (
            b'{"inputs":[{"name":"x","shape":[9,1],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9]}]}',
            0,
        ),
        (
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]},'
            b'{"name":"x","shape":[1],"datatype":"FP32","data":[2]}]}',
            0,
        ),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1000]}]}', None),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}', None),
        # other fields, unknown fields, a non-string id, not an object
        (
            b'{"parameters":{},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}',
            None,
        ),
        (
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{}}]}',
            None,
        ),
        (
            b'{"model_name":"m","inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}',
            None,
        ),
        (b'{"oops":1,"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}', 0),
        (b'{"id":3,"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}', 0),
        (b'[{"name":"x"}]', 0),
        (b'{"inputs":[]}', 0),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1e400]}]}', 0),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]} x', 0),
        (b'{"inputs":[{"name":"\xff","shape":[1],"datatype":"FP32","data":[1]}]}', 0),
    ],
)
def test_the_plain_decoder_takes_only_what_the_general_one_takes_alike(
    body: bytes, taken: int | None
) -> None:
    # taken: 1, the plain decoder takes it; 0, the general one refuses it; None, either.
    result = _agree(body)
    if taken == 1:
        assert result is True
    elif taken == 0:
        assert result is None


def test_the_plain_decoder_agrees_on_random_requests() -> None:
    rng = np.random.default_rng(7)
    values = ["1", "-0", "2.5", "-0.0", "1e3", "true", "null", '"s"', "[1]", "{}", "1e400"]
    fields = [
        '"name":"x"',
        '"name":"y"',
        '"name":1',
        '"datatype":"FP32"',
        '"datatype":"FP64"',
        '"datatype":"INT32"',
        '"shape":[2,2]',
        '"shape":[4]',
        '"shape":[1,4]',
        '"shape":[true]',
        '"parameters":{}',
    ]
    taken = 0
    for _ in range(3000):
        rows = [",".join(rng.choice(values, 2, p=[0.2] * 4 + [0.2 / 7] * 7)) for _ in range(2)]
        data = (
            "[" + ",".join(f"[{row}]" for row in rows) + "]" if rng.random() < 0.7 else "[1,2,3,4]"
        )
        chosen = [f for f in fields if rng.random() < 0.35] + [f'"data":{data}']
        tensor = "{" + ",".join(rng.permutation(chosen)) + "}"
        top = [f'"inputs":[{tensor}]'] + (['"id":"r"'] if rng.random() < 0.3 else [])
        taken += bool(
            _agree(("{" + ",".join(top) + "}").encode(), max_rows=1 if rng.random() < 0.1 else 8)
        )
    assert taken > 50  # the plain decoder is exercised, not only declined
