"""Every error class has an HTTP status, and error bodies are the V2 shape."""

import orjson
import pytest

from service import errors
from service.server.http import STATUS_CODES, error_body, error_headers, status_of


def all_error_classes() -> list[type[errors.ServiceError]]:
    found: list[type[errors.ServiceError]] = []
    pending = [errors.ServiceError]
    while pending:
        cls = pending.pop()
        found.extend(cls.__subclasses__())
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_has_a_status(cls: type[errors.ServiceError]) -> None:
    assert cls in STATUS_CODES


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_drawn_in_the_tree(cls: type[errors.ServiceError]) -> None:
    """The tree in errors.py's docstring is the map readers use: no class may be missing."""
    assert errors.__doc__ is not None
    assert f"── {cls.__name__} " in errors.__doc__


def test_statuses_and_bodies() -> None:
    assert status_of(errors.InvalidInput("bad")) == 400
    assert status_of(errors.ModelNotFound("x")) == 404
    overloaded = errors.Overloaded("busy", retry_after_s=3)
    assert status_of(overloaded) == 503
    assert (b"retry-after", b"3") in error_headers(overloaded)
    assert orjson.loads(error_body(errors.InvalidInput("say what"))) == {
        "error": "say what",
        "type": "InvalidInput",
    }
