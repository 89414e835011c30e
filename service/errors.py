"""The one exception tree of the service.

    ServiceError
    ├── ModelNotFound        unknown model, version or alias
    ├── RouteNotFound        a path that no endpoint serves
    ├── ModelNotReady        known version that did not load or was unloaded
    ├── InvalidInput         malformed or invalid request data
    │   └── ClientLeft       a client that left before sending its whole body
    ├── UnsupportedMediaType a body in a format the endpoint does not speak
    ├── MethodNotAllowed     a method the path does not serve
    ├── PayloadTooLarge      body or batch above the configured limits
    │   └── HeadersTooLarge  a request head above the configured limit
    ├── Unauthorized         missing credentials
    │   └── InvalidToken     a bearer token that is malformed, untrusted or not valid now
    ├── Forbidden            wrong credentials, or an endpoint that is switched off
    ├── Conflict             a change based on a state that has moved on
    ├── Overloaded           queue full; retry later
    │   └── RateLimited      a client over its rate limit; retry later
    ├── RangeNotSatisfiable  a Range header past the end of what it asks for
    ├── StorageFull          a job's files would take disk use past its limit
    ├── DeadlineExceeded     the request's deadline passed
    ├── HeadersTimeout       a request head not received in time
    ├── BodyTimeout          an upload whose body stopped arriving
    ├── PredictionFailed     the model raised while predicting
    └── ModelLoadError       an artifact that cannot be served

Domain code raises these; the HTTP layer maps each class to a status code in one table.
"""


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(ServiceError):
    pass


class RouteNotFound(ServiceError):
    pass


class ModelNotReady(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass


class MethodNotAllowed(ServiceError):
    pass


class UnsupportedMediaType(ServiceError):
    pass


class PayloadTooLarge(ServiceError):
    pass


class HeadersTooLarge(PayloadTooLarge):
    pass


class Unauthorized(ServiceError):
    def __init__(self, message: str, challenge: str | None = None) -> None:
        super().__init__(message)
        # RFC 6750's error code for the client ("invalid_token"); None when nothing was sent.
        self.challenge = challenge


class InvalidToken(Unauthorized):
    def __init__(self, message: str) -> None:
        super().__init__(message, challenge="invalid_token")


class Forbidden(ServiceError):
    def __init__(self, message: str, scope: str | None = None) -> None:
        super().__init__(message)
        # The scope a valid token lacks, named to the client (RFC 6750 insufficient_scope).
        self.scope = scope


class Conflict(ServiceError):
    pass


class Overloaded(ServiceError):
    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(Overloaded):
    pass


class RangeNotSatisfiable(ServiceError):
    def __init__(self, message: str, size: int | None = None) -> None:
        super().__init__(message)
        self.size = size  # of the whole resource: the answer's `Content-Range: bytes */size`


class ClientLeft(InvalidInput):
    """Counted and logged as 499, as proxies do: no one is left to answer, and the client's
    leaving is no invalid input to count among the 4xx."""


class StorageFull(ServiceError):
    pass


class DeadlineExceeded(ServiceError):
    pass


class HeadersTimeout(ServiceError):
    pass


class BodyTimeout(ServiceError):
    pass


class PredictionFailed(ServiceError):
    pass


class ModelLoadError(ServiceError):
    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        # A short, bounded token for metrics labels (e.g. "hash_mismatch").
        self.reason = reason
