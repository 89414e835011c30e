"""JSON tensor data: numpy's chunked parse gives exactly the arrays that Python lists gave."""

import json
import math
import time
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import InvalidInput
from service.protocols.arrays import array_from_json, parse_numbers


def lists_decoder(text: bytes) -> np.ndarray:
    """The decoder the chunked parse replaces: orjson's Python lists, then numpy."""
    return np.asarray(orjson.loads(text))


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    # Bit for bit, so that -0.0 and 0.0 differ.
    assert got.tobytes() == want.tobytes()


FLOATS = st.floats(allow_nan=False, allow_infinity=False)
INTEGERS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def number_texts(draw: st.DrawFn) -> str:
    """One JSON number, written in any of the forms clients write."""
    kind = draw(st.sampled_from(["int", "float", "exponent", "short", "zero"]))
    if kind == "int":
        return str(draw(INTEGERS | st.integers(-1000, 1000)))
    if kind == "zero":
        return draw(st.sampled_from(["0", "-0", "0.0", "-0.0", "0e0", "-0E-0", "0.000"]))
    value = draw(FLOATS)
    if kind == "float":
        return repr(value) if "e" not in repr(value) else f"{value:.17g}"
    if kind == "exponent":
        form = draw(st.sampled_from(["{:e}", "{:E}", "{:.3e}", "{:.17e}"]))
        return form.format(value).replace("e+", draw(st.sampled_from(["e+", "e"])))
    return f"{value:.4g}" if "inf" not in f"{value:.4g}" else "1.5"


def _join(items: list[str], spaces: str) -> str:
    return "[" + ("," + spaces).join(items) + "]"


@st.composite
def arrays_as_json(draw: st.DrawFn) -> bytes:
    """Rectangular nested lists (rank 1 to 3) of numbers, with optional whitespace."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    spaces = draw(st.sampled_from(["", " ", "\n  "]))
    count = int(np.prod(shape))
    numbers = draw(st.lists(number_texts(), min_size=count, max_size=count))
    if draw(st.booleans()):
        numbers = [n if "." in n or "e" in n.lower() else n + ".5" for n in numbers]

    def nest(items: list[str], dims: list[int]) -> str:
        if len(dims) == 1:
            return _join(items, spaces)
        step = len(items) // dims[0]
        return _join(
            [nest(items[i * step : (i + 1) * step], dims[1:]) for i in range(dims[0])], spaces
        )

    return nest(numbers, shape).encode()


@given(text=arrays_as_json(), chunk=st.integers(1, 64))
@settings(max_examples=400, deadline=None)
def test_the_chunked_parse_equals_python_lists(text: bytes, chunk: int) -> None:
    try:
        want = lists_decoder(text)
    except orjson.JSONDecodeError:  # a number beyond FP64, which both refuse
        with pytest.raises(InvalidInput):
            parse_numbers(memoryview(text), "input", chunk_bytes=chunk)
        return
    assert_identical(parse_numbers(memoryview(text), "input", chunk_bytes=chunk), want)


@pytest.mark.parametrize(
    "text",
    [
        b"[1,2,3]",
        b"[[1,2],[3,4]]",
        b"[[-0, 1.5]]",
        b"[-0.0, 0]",
        b"[[1e5, 2E-3], [-1.25e+2, 7]]",
        b"[]",
        b"[[], []]",
        b"[[[1], [2]], [[3], [4]]]",
        b"[9223372036854775807, -9223372036854775808]",
        b"[9223372036854775808]",
        b"[18446744073709551616, 1]",
        b"[[ 1 ,\n 2 ]\t, [3, 4] ]",
    ],
)
def test_edge_forms_equal_python_lists(text: bytes) -> None:
    for chunk in (1, 3, 1 << 20):
        assert_identical(
            parse_numbers(memoryview(text), "input", chunk_bytes=chunk), lists_decoder(text)
        )
    assert_identical(array_from_json(text, "FP32", "input"), lists_decoder(text))


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (b"[true, 3.5, 1.4, 0.2]", "got booleans"),
        (b"[[5.1, false, 1.4, 0.2]]", "got booleans"),
        (b"[[5.1, null, 1.4, 0.2]]", "null values"),
        (b'[[5.1, "3.5", 1.4, 0.2]]', "found strings"),
        (b'[{"a": 1}]', "found objects"),
        (b"[[1, 2], [3]]", "ragged"),
        (b"[[1, 2], [3], [4, 5, 6]]", "ragged"),
        (b"[[1, 2], 3]", "ragged"),
        (b"[1, [2, 3]]", "ragged"),
        (b"[[1], []]", "ragged"),
        (b"[[], [1]]", "ragged"),
        (b"[[[1, 2], [3, 4]], [[5, 6]]]", "ragged"),
        (b"[[[1, 2]], [[3], [4]]]", "ragged"),
        (b"[1e400, 1.5]", "range"),
        (b"[" + b"1" * 5000 + b".5]", "range"),
    ],
)
def test_what_is_not_a_rectangle_of_numbers_is_named(text: bytes, phrase: str) -> None:
    for chunk in (1, 5, 1 << 20):
        with pytest.raises(InvalidInput, match=phrase):
            parse_numbers(memoryview(text), "input", chunk_bytes=chunk)
    with pytest.raises(InvalidInput, match=phrase.replace("range", "infinity|range")):
        array_from_json(text, "FP32", "input")


def test_the_shape_is_checked_before_the_numbers_are_parsed() -> None:
    seen: list[tuple[int, ...]] = []

    def refuse(shape: tuple[int, ...]) -> None:
        seen.append(shape)
        raise InvalidInput("too many")

    with pytest.raises(InvalidInput, match="too many"):
        parse_numbers(memoryview(b"[" + b"[1, 2, 3], " * 5 + b"[4, 5, 6]]"), "input", refuse)
    assert seen == [(6, 3)]


def test_a_large_array_is_parsed_without_python_numbers() -> None:
    rows = np.random.default_rng(0).normal(size=(100_000, 4)).round(3)
    text = orjson.dumps(rows.tolist())
    assert len(text) > 1 << 20  # more than one chunk
    array: Any = array_from_json(text, "FP32", "input")
    assert_identical(array, lists_decoder(text))


def _best_seconds(decoders: list[Any], text: bytes, rounds: int = 9) -> list[float]:
    """The best CPU time of each decoder on `text`, the decoders taking turns: CPU time, as
    wall time counts the turns a busy machine gives other processes, and taking turns so that
    what remains of that load (caches, frequency) falls on all of them alike."""
    best = [math.inf] * len(decoders)
    for _ in range(rounds):
        for i, decode in enumerate(decoders):
            started = time.thread_time()
            decode(text)
            best[i] = min(best[i], time.thread_time() - started)
    return best


def test_float32_rows_written_in_full_parse_no_slower_than_python_lists() -> None:
    """What json.dumps makes of a float32 array's tolist: 17 digits a value, negatives below
    one among them. Checks that scanned for digit runs and minus zeros at every digit once made
    their parse six times slower than the Python lists the parse replaces."""
    rows = np.random.default_rng(0).uniform(-4, 4, size=(10_000, 4)).astype(np.float32)
    text = json.dumps(rows.tolist()).encode()
    assert b"-0." in text
    # Best of 25: the parse is four calls, each of which a busy machine may preempt.
    parsed, lists = _best_seconds(
        [lambda t: parse_numbers(memoryview(t), "input"), lists_decoder], text, rounds=25
    )
    assert parsed / lists < 3, f"{parsed / lists:.1f} times the time of Python lists"
