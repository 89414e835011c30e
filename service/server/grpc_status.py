"""The one table from domain errors to gRPC status codes, as http.py's is to HTTP statuses."""

from grpc import StatusCode

from service import errors

GRPC_CODES: dict[type[errors.ServiceError], StatusCode] = {
    errors.InvalidInput: StatusCode.INVALID_ARGUMENT,
    errors.UnsupportedMediaType: StatusCode.INVALID_ARGUMENT,
    errors.Unauthorized: StatusCode.UNAUTHENTICATED,
    errors.Forbidden: StatusCode.PERMISSION_DENIED,
    errors.ModelNotFound: StatusCode.NOT_FOUND,
    errors.Conflict: StatusCode.ABORTED,
    errors.RangeNotSatisfiable: StatusCode.OUT_OF_RANGE,
    errors.StorageFull: StatusCode.RESOURCE_EXHAUSTED,
    errors.RouteNotFound: StatusCode.UNIMPLEMENTED,
    errors.MethodNotAllowed: StatusCode.UNIMPLEMENTED,
    errors.PayloadTooLarge: StatusCode.RESOURCE_EXHAUSTED,
    errors.PredictionFailed: StatusCode.INTERNAL,
    errors.ModelLoadError: StatusCode.INTERNAL,
    # Clients (and gRPC's own retry policies) retry UNAVAILABLE: right for a version that is
    # loading, a full queue and a server that is draining alike.
    errors.ModelNotReady: StatusCode.UNAVAILABLE,
    errors.Overloaded: StatusCode.UNAVAILABLE,
    # Over a client's own limit: retrying at once would not help, unlike UNAVAILABLE.
    errors.RateLimited: StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: StatusCode.DEADLINE_EXCEEDED,
    errors.HeadersTimeout: StatusCode.DEADLINE_EXCEEDED,
    errors.BodyTimeout: StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code_of(exc: errors.ServiceError) -> StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_CODES:
            return GRPC_CODES[cls]
    return StatusCode.INTERNAL
