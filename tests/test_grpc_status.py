"""Every error of the tree has a gRPC status code, and the table says what the protocol means."""

import grpc
import pytest

from service import errors
from service.server.grpc_status import GRPC_CODES, grpc_code_of


def _tree(cls: type[errors.ServiceError]) -> list[type[errors.ServiceError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _tree(child))]


@pytest.mark.parametrize("cls", _tree(errors.ServiceError)[1:], ids=lambda cls: cls.__name__)
def test_every_error_has_a_code(cls: type[errors.ServiceError]) -> None:
    assert any(base in GRPC_CODES for base in cls.__mro__), f"{cls.__name__} has no gRPC code"
    assert grpc_code_of(cls("x")) not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.ModelNotReady("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Overloaded("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unauthorized("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.Forbidden("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.HeadersTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.PredictionFailed("x"), grpc.StatusCode.INTERNAL),
        (errors.ServiceError("x"), grpc.StatusCode.INTERNAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_codes(error: errors.ServiceError, code: grpc.StatusCode) -> None:
    assert grpc_code_of(error) is code
