"""The two log formats: one line per record, whatever the values hold."""

import json
import logging
import sys

import pytest

from service.observability.logs import JsonFormatter, TextFormatter


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("service.test", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_a_record_is_one_line_even_with_newlines_in_values(formatter: logging.Formatter) -> None:
    line = formatter.format(_record("request", path="/a\nb c", model="iris", rows=3))
    assert "\n" not in line
    assert "iris" in line


def test_json_lines_carry_the_extras_and_the_pid() -> None:
    entry = json.loads(JsonFormatter().format(_record("model loaded", model="iris", version=2)))
    assert entry["message"] == "model loaded"
    assert (entry["model"], entry["version"], entry["level"]) == ("iris", 2, "info")
    assert entry["pid"] > 0
    assert entry["time"].endswith("Z")


def test_json_lines_carry_the_traceback_of_an_exception() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: broken" in entry["exception"]


def test_text_lines_are_key_value_pairs_with_quotes_only_where_needed() -> None:
    line = TextFormatter().format(
        _record("request", status=200, path="/v2/models/iris/infer", model="a=b", version=None)
    )
    assert line.endswith(
        ' INFO service.test: request status=200 path=/v2/models/iris/infer model="a=b"'
    )
