"""JSON tensor data decoded into numpy arrays without a Python object per number.

As Python lists, a million rows of four floats cost twenty times their 17 MB of JSON. Here a
large array is read in two passes over chunks of its text: the first checks that it holds only
numbers and learns its shape from its brackets and commas (`skeleton`), the second parses the
numbers with Arrow's CSV reader into the one array, allocated once its size is known and
accepted. Small arrays (single rows) go through orjson, which is quicker at that size; both give
the same arrays.

The text has already been checked to be valid JSON (the envelope decoder skips over it), so
only numbers, brackets, commas and whitespace can pass the check here.
"""

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from numpy.typing import NDArray
from pyarrow import csv as arrow_csv

from service.errors import InvalidInput
from service.protocols.skeleton import Skeleton, ragged

# Called with the data's shape before its numbers are parsed, to refuse it before it costs memory.
ShapeCheck = Callable[[tuple[int, ...]], None]

CHUNK_BYTES = 1 << 18
# Below this, orjson's lists are quicker than numpy's two passes, and cost little.
SMALL_BYTES = 4096
# Integers of this many digits may not fit INT64; they are decoded as Python ints, as before.
LONG_INTEGER_LIMIT_BYTES = 1 << 20

_OPENING_BRACKET = ord("[")
# What a refusal of JSON nulls says: a model that takes missing values decodes them instead.
NULL_VALUES = "null values"
# What numbers, their lists and whitespace are written with; deleted, they leave what is not.
# Such checks use translate and plain searches: Python's regular expressions try a pattern that
# begins with a lookbehind or a character class at every byte, a digit count at every digit.
_NUMBER_TEXT = b"0123456789eE.+-[],\x20\t\n\r\x0b\x0c"
_SEPARATOR = re.compile(rb"[\[\],\s]")
_DIGIT = re.compile(rb"[0-9]")
_FLOATING = re.compile(rb"[.eE]")
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"0" * 9)
_LONG_INTEGER = b"0" * 19
_MINUS_ZERO = re.compile(rb"-0(?![0-9.eE])")
_EXPONENT = frozenset(b"eE")
_TO_LINES = bytes.maketrans(b"[], \t\r", b"\n" * 6)
_NUMBER_BYTES = b"0123456789+-.eE \t\n\r"
_LINES = arrow_csv.ReadOptions(column_names=["value"], use_threads=False)
_NO_QUOTES = arrow_csv.ParseOptions(delimiter="\x01", quote_char=False)
_FLOATS, _INTEGERS = (
    arrow_csv.ConvertOptions(
        column_types={"value": kind}, null_values=[], quoted_strings_can_be_null=False
    )
    for kind in (pa.float64(), pa.int64())
)
_FOUND = {
    ord('"'): "values must be numbers; found strings",
    ord("t"): "values must be numbers, got booleans",
    ord("f"): "values must be numbers, got booleans",
    ord("n"): f"{NULL_VALUES}; expected a rectangle of numbers",
}


def array_from_json(
    raw: bytes | memoryview, datatype: str | None, where: str, check: ShapeCheck | None = None
) -> NDArray[Any]:
    """A JSON array (nested or flat) of the given V2 datatype (None: any numbers) as an ndarray."""
    view = memoryview(raw)
    if not view or view[0] != _OPENING_BRACKET:
        raise InvalidInput(f"{where}: 'data' must be a list")
    if datatype in ("BYTES", "BOOL") or len(view) <= SMALL_BYTES:
        text = bytes(view)
        if datatype not in ("BYTES", "BOOL"):
            _check_numbers(text, where)
        array = array_from_values(_loads(text, where), datatype, where)
        if check is not None:
            check(array.shape)
        return array
    return parse_numbers(view, where, check)


def array_with_nulls(
    raw: bytes | memoryview, where: str, check: ShapeCheck | None = None
) -> NDArray[np.float64]:
    """A JSON array of numbers whose nulls are missing values (NaN), for a model that takes
    them: JSON has no NaN. Read through Python lists, as only such requests come this way."""
    text = bytes(raw)
    if not text or text[0] != _OPENING_BRACKET:
        raise InvalidInput(f"{where}: 'data' must be a list")
    other = text.translate(None, _NUMBER_TEXT + b"nul")
    if other:
        problem = _FOUND.get(other[0], "values must be numbers; found objects")
        raise InvalidInput(f"{where}: {problem}")
    return values_with_nulls(_loads(text, where), where, check)


def values_with_nulls(
    values: Any, where: str, check: ShapeCheck | None = None
) -> NDArray[np.float64]:
    """Decoded JSON numbers and nulls (nested lists) as float64, each null a NaN."""
    try:
        array = np.asarray(values, dtype=np.float64)  # None becomes NaN
    except (ValueError, TypeError):
        raise ragged(where) from None
    if check is not None:
        check(array.shape)
    return array


def array_from_values(values: Any, datatype: str | None, where: str) -> NDArray[Any]:
    """A decoded JSON list (nested or flat) as an ndarray; rejects ragged rows and non-numbers."""
    if datatype == "BYTES":
        try:
            return np.asarray(values, dtype=object)
        except ValueError as exc:
            raise InvalidInput(f"{where}: ragged or malformed BYTES data: {exc}") from None
    try:
        array = np.asarray(values)
    except ValueError:
        raise ragged(where) from None
    if array.dtype.kind not in "biuf":
        if array.dtype.kind == "O":
            raise InvalidInput(
                f"{where}: ragged rows or {NULL_VALUES}; expected a rectangle of numbers"
            )
        raise InvalidInput(f"{where}: values must be numbers; found strings")
    if array.dtype.kind == "b" and datatype not in (None, "BOOL"):
        raise InvalidInput(f"{where}: values must be numbers, got booleans")
    return array


def parse_numbers(
    view: memoryview,
    where: str,
    check: ShapeCheck | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> NDArray[Any]:
    """A JSON array of numbers as int64 (when all are integers) or float64, as numpy makes it
    from the same values as Python lists; parsed in chunks, without Python objects."""
    chunks = list(_chunks(view, chunk_bytes))
    skeleton = Skeleton(where)
    floating = long_integers = has_numbers = False
    for start, end in chunks:
        text = bytes(view[start:end])
        _check_numbers(text, where)
        floating = floating or _FLOATING.search(text) is not None
        # Only integers are parsed as such: among floats, long digit runs are of no concern.
        long_integers = long_integers or (not floating and _has_long_integer(text))
        has_numbers = has_numbers or _DIGIT.search(text) is not None
        skeleton.feed(text.translate(None, _NUMBER_BYTES))
    shape = skeleton.shape(has_numbers)
    if check is not None:
        check(shape)
    if long_integers and not floating:
        if len(view) > LONG_INTEGER_LIMIT_BYTES:
            raise InvalidInput(
                f"{where}: integers of 19 or more digits are accepted in at most "
                f"{LONG_INTEGER_LIMIT_BYTES} bytes of data; send them as floating point (1e19)"
            )
        return array_from_values(_loads(view, where), None, where).reshape(shape)
    # numpy makes float64 of no numbers at all, as of any float among integers.
    dtype = np.dtype(np.float64 if floating or not has_numbers else np.int64)
    out = np.empty(math.prod(shape), dtype=dtype)
    filled = 0
    for start, end in chunks:
        text = bytes(view[start:end]).translate(_TO_LINES)
        if _DIGIT.search(text) is None:
            continue
        if floating and b"-0" in text:
            text = _plain_zeros(text)
        values = _parse_lines(text, dtype, where)
        if filled + values.size > out.size:
            raise ragged(where)
        out[filled : filled + values.size] = values
        filled += values.size
    if filled != out.size:
        raise ragged(where)
    return out.reshape(shape)


def _parse_lines(text: bytes, dtype: np.dtype[Any], where: str) -> NDArray[Any]:
    """Numbers one per line (blank lines between them) with Arrow's CSV reader, which parses
    them in C++ several times faster than numpy's text parser, rounding exactly as orjson."""
    options = _INTEGERS if dtype.kind == "i" else _FLOATS
    try:
        table = arrow_csv.read_csv(
            pa.py_buffer(text),
            read_options=_LINES,
            parse_options=_NO_QUOTES,
            convert_options=options,
            # Arrow's default pool keeps what it frees for reuse; malloc's gives it back.
            memory_pool=pa.system_memory_pool(),
        )
    except pa.ArrowInvalid:  # not expected of checked JSON numbers; still the client's input
        raise InvalidInput(f"{where}: values must be numbers") from None
    # The values' buffers as they are: Arrow's own to_numpy imports pandas, 50 MB of it.
    chunks = [
        np.frombuffer(chunk.buffers()[1], dtype=dtype)[chunk.offset : chunk.offset + len(chunk)]
        for chunk in table.column(0).chunks
        if len(chunk)
    ]
    values: NDArray[Any] = np.concatenate(chunks) if chunks else np.empty(0, dtype)
    if dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidInput(f"{where}: a number is out of the range of FP64")
    return values


def _loads(view: bytes | memoryview, where: str) -> Any:
    try:
        return orjson.loads(view)
    except orjson.JSONDecodeError as exc:  # numbers beyond FP64, for one
        # Its position is within this array, not within the request body: left out.
        raise InvalidInput(f"{where}: {exc.msg}") from None


def _check_numbers(text: bytes, where: str) -> None:
    other = text.translate(None, _NUMBER_TEXT)
    if other:
        problem = _FOUND.get(other[0], "values must be numbers; found objects")
        raise InvalidInput(f"{where}: {problem}")


def _has_long_integer(text: bytes) -> bool:
    """Whether a run of 19 or more digits is in `text` (such integers may not fit INT64)."""
    return _LONG_INTEGER in text.translate(_DIGITS_AS_ZEROS)


def _plain_zeros(text: bytes) -> bytes:
    """An integer minus zero among floats as a plain zero, as Python's int makes it; the minus
    zero of an exponent (1e-0) stays."""

    def plain(match: re.Match[bytes]) -> bytes:
        start = match.start()
        return match.group() if start and text[start - 1] in _EXPONENT else b"\n0"

    return _MINUS_ZERO.sub(plain, text)


def _chunks(view: memoryview, size: int) -> Iterator[tuple[int, int]]:
    """Spans of about `size` bytes that end between two numbers, never inside one."""
    start = 0
    while start < len(view):
        boundary = _SEPARATOR.search(view, min(start + size, len(view)))
        end = len(view) if boundary is None else boundary.end()
        yield start, end
        start = end
