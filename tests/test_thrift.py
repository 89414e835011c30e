"""Thrift's compact protocol: structs read and written back byte for byte."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.protocols import thrift
from service.protocols.thrift import Field, Items, Pairs, Struct, ThriftError


def footer_of(data: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(data, sink, row_group_size=2)
    written = sink.getvalue()
    length = int.from_bytes(written[-8:-4], "little")
    return written[-8 - length : -8]


def test_a_parquet_footer_is_written_back_as_it_was_read() -> None:
    data = pa.table(
        {
            "id": pa.array([f"{i:04d}" for i in range(45)]),
            "x": pa.array([i / 3 for i in range(45)], pa.float32()),
            "flag": pa.array([i % 2 == 0 if i % 5 else None for i in range(45)]),
        }
    )
    footer = footer_of(data)
    metadata = thrift.read_struct(footer)
    assert thrift.write_struct(metadata) == footer
    assert metadata.get(3) == 45  # FileMetaData.num_rows
    groups = metadata.get(4)
    # More than 14 row groups: the list's size is a varint after its header.
    assert isinstance(groups, Items)
    assert len(groups.values) == 23


def test_every_kind_of_value_survives_a_round_trip() -> None:
    struct = Struct(
        {
            1: Field(thrift.TRUE, True),
            2: Field(thrift.TRUE, False),
            3: Field(thrift.BYTE, -7),
            4: Field(thrift.I16, -300),
            40: Field(thrift.I32, 2**31 - 1),  # a jump past 15: the long field header
            41: Field(thrift.I64, -(2**62)),
            42: Field(thrift.DOUBLE, b"\x00\x00\x00\x00\x00\x00\xf0?"),
            43: Field(thrift.BINARY, "é".encode()),
            44: Field(thrift.LIST, Items(thrift.I32, list(range(-10, 10)))),
            45: Field(thrift.SET, Items(thrift.TRUE, [True, False], thrift.SET)),
            46: Field(thrift.MAP, Pairs(thrift.BINARY, thrift.I64, [(b"a", 1), (b"b", -2)])),
            47: Field(thrift.MAP, Pairs(0, 0, [])),
            48: Field(thrift.STRUCT, Struct({1: Field(thrift.LIST, Items(thrift.STRUCT, []))})),
        }
    )
    data = thrift.write_struct(struct)
    assert thrift.read_struct(data) == struct
    assert thrift.write_struct(thrift.read_struct(data)) == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x15\x02", "ends before its last field"),
        (b"\x18\x05ab\x00", "runs past the end"),
        (b"\x1d\x00", "unknown compact type 13"),
        (b"\x15\x02\x00\x00", "bytes follow the struct"),
    ],
)
def test_bytes_that_are_not_a_struct_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ThriftError, match=message):
        thrift.read_struct(data)
