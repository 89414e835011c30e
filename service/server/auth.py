"""Credentials: API keys for inference and the admin token, compared in constant time.

No credentials at all is 401 (with `WWW-Authenticate`); credentials that do not match are 403.
"""

import hmac
from dataclasses import dataclass

from service.config import Settings
from service.errors import Forbidden, Unauthorized


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what was sent."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str, secrets: tuple[bytes, ...]) -> bool:
    # Every secret is compared, so the time taken says nothing about which one (if any) matched.
    candidate = given.encode()
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(candidate, secret)
    return found


@dataclass(frozen=True)
class Credentials:
    api_keys: tuple[bytes, ...]
    admin_token: bytes | None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Credentials":
        token = settings.admin_token
        return cls(
            tuple(key.encode() for key in settings.api_key_list()),
            token.get_secret_value().encode() if token is not None else None,
        )

    def check_api_key(self, authorization: str | None, api_key: str | None) -> None:
        """Raise unless inference is open or the request carries one of the API keys."""
        if not self.api_keys:
            return
        given = api_key if api_key is not None else bearer_token(authorization)
        if given is None:
            raise Unauthorized(
                "this server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
            )
        if not _matches(given, self.api_keys):
            raise Forbidden("the API key is not valid")

    def check_admin(self, authorization: str | None) -> None:
        if self.admin_token is None:
            raise Forbidden(
                "repository endpoints are disabled; set MODELSERVE_ADMIN_TOKEN to enable them"
            )
        given = bearer_token(authorization)
        if given is None:
            raise Unauthorized("repository endpoints need 'Authorization: Bearer <admin token>'")
        if not _matches(given, (self.admin_token,)):
            raise Forbidden("the admin token is not valid")

    def check_any(self, authorization: str | None, api_key: str | None) -> None:
        """An API key or the admin token; with neither configured, nobody gets in."""
        secrets = (*self.api_keys, *((self.admin_token,) if self.admin_token else ()))
        if not secrets:
            raise Forbidden(
                "this endpoint is protected but no MODELSERVE_API_KEYS or "
                "MODELSERVE_ADMIN_TOKEN is set"
            )
        given = api_key if api_key is not None else bearer_token(authorization)
        if given is None:
            raise Unauthorized("send 'Authorization: Bearer <key>' or 'X-API-Key'")
        if not _matches(given, secrets):
            raise Forbidden("the credentials are not valid")
