"""Cutting CSV and NDJSON streams into blocks of whole lines, with a limit on one line."""

from typing import Any

import pytest

from service.errors import InvalidInput
from service.protocols.lines import BLOCK_BYTES, LineChunks, quotes_span_lines

CSV = b"a,b\n1,2\n3,4\n5,6\n7,8\n9,10"


def cut(
    pieces: list[bytes],
    header: bool = False,
    first_row: int = 0,
    rows: int = 3,
    block_bytes: int = BLOCK_BYTES,
) -> tuple[list[bytes], bytes | None]:
    lines = LineChunks(rows, 10, header=header, first_row=first_row, block_bytes=block_bytes)
    blocks = [block for piece in pieces for block in lines.feed(piece)]
    return [*blocks, lines.finish()], lines.header


@pytest.mark.parametrize("size", [1, 3, 64])
def test_blocks_hold_whole_lines_however_the_bytes_arrive(size: int) -> None:
    pieces = [CSV[i : i + size] for i in range(0, len(CSV), size)]
    assert cut(pieces, header=True) == ([b"1,2\n3,4\n5,6\n", b"7,8\n9,10"], b"a,b\n")


def test_wide_rows_are_cut_by_bytes_before_the_row_count() -> None:
    blocks, _ = cut([b"123456789\n" * 3, b"1\n"], rows=1000, block_bytes=20)
    assert blocks == [b"123456789\n" * 3, b"1\n"]


@pytest.mark.parametrize(
    ("pieces", "options", "message"),
    [
        ([b"a,b,c,d,e,f,g"], {"header": True}, "the header line is longer than 10 bytes"),
        ([b"a,b\n1,2\n", b"12345", b"678901"], {"header": True}, "row 2 is longer"),
        ([b"a,b\n1,2\n12345678901\n3,4\n"], {"header": True}, "row 2 is longer"),
        ([b"1,2\n12345678901\n"], {"first_row": 100}, "row 102 is longer than 10 bytes"),
    ],
)
def test_a_line_past_the_limit_is_refused_naming_its_row(
    pieces: list[bytes], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as refused:
        cut(pieces, **options)
    assert "MODELSERVE_MAX_ROW_BYTES" in refused.value.message


def test_a_line_of_exactly_the_limit_passes() -> None:
    assert cut([b"a\n", b"12345", b"67890\n"], header=True) == ([b"1234567890\n"], b"a\n")


@pytest.mark.parametrize(
    ("block", "rows", "spans"),
    [
        (b"1,a\n2,b\n", 2, False),  # no quotes: answered without looking at lines
        (b'1,"a, b"\n2,"c ""d"""\n', 2, False),  # quoted, on one line each
        (b'1,"a\nb"\n2,c\n', 2, True),  # a quoted value holds a newline
        (b'1,"a\n', 1, True),  # a block cut inside a quoted value
        (b'1,a"b\n', 1, True),  # a literal quote: not a row end, but lines may not be rows
        (b'1,"a"\n\n\r\n2,"b"\r\n', 2, False),  # empty lines are not rows
        (b'x"a,"b\nc",d"e\n', 1, True),  # two lines that the parser reads as one row
    ],
)
def test_a_block_tells_whether_quoted_values_may_span_lines(
    block: bytes, rows: int, spans: bool
) -> None:
    assert quotes_span_lines(block, rows) is spans
