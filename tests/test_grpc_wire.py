"""The gRPC transport's encodings, checked against the libraries that define them."""

import pytest
from hpack import Decoder

from service.protocols.grpc import infer
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.server.grpc_wire import _percent_encoded, _timeout_s, literal


@pytest.mark.parametrize("sizes", [[0], [5, 300], [127, 128, 16_383, 16_384, 2_000_000]])
def test_a_response_in_pieces_is_protobufs_own_encoding(sizes: list[int]) -> None:
    response = pb.ModelInferResponse(model_name="iris", model_version="2", id="call-1")
    response.outputs.add(name="label", datatype="BYTES", shape=[3])
    response.parameters["sequence_id"].int64_param = 7
    contents = [bytes([index % 251]) * size for index, size in enumerate(sizes)]
    pieces = infer.serialized(response, contents)
    response.raw_output_contents.extend(contents)
    assert b"".join(pieces) == response.SerializeToString()
    assert pb.ModelInferResponse.FromString(b"".join(pieces)) == response


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
