"""The two log formats: one line per record, whatever the values hold."""

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from service.observability import logs
from service.observability.logs import JsonFormatter, TextFormatter
from service.server import access


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


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.access_lines = None


def _access_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    access.log_request('a"=b', "POST", "/v2/models/ir is/infer", 200, 0.00123, "iris", "2", "v2", 1)
    access.log_request("id2", "GET", "/x", 404, 0.5, error="ModelNotFound")
    # The same fields but the id and time again: a line built from parts kept from the first.
    access.log_request("id3", "POST", "/v2/models/ir is/infer", 200, 0.25, "iris", "2", "v2", 1)
    if logs.access_lines is not None:
        logs.access_lines.flush()
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_lines_written_directly_read_as_the_formatter_writes_them(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure_logging("info", fmt)
    assert logs.access_lines is not None
    assert logs.access_lines.active()
    direct = _access_lines(capsys)
    logs.access_lines = None  # the standard path: a LogRecord through the handler
    standard = _access_lines(capsys)
    assert len(direct) == len(standard) == 3

    def without_time(line: str) -> object:
        if fmt == "text":
            return line.split(" ", 1)[1]
        entry = json.loads(line)
        del entry["time"]
        return entry

    assert [without_time(line) for line in direct] == [without_time(line) for line in standard]


def test_a_handler_added_later_sees_every_access_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure_logging("info", "text")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logging.getLogger("service.access").addHandler(handler)
    try:
        lines = _access_lines(capsys)
    finally:
        logging.getLogger("service.access").removeHandler(handler)
    assert [record.status for record in seen] == [200, 404, 200]  # type: ignore[attr-defined]
    assert len(lines) == 3  # and the server's own handler still writes them
