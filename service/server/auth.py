"""Credentials and what they allow: API keys, the admin token and JWT bearer tokens.

Every front door asks the same three questions here: `check_inference` (a model's inference and
metadata; `check_caller` and `require_inference` for batch jobs, whose models are known later),
`check_admin` (the repository endpoints) and `check_any` (protected metrics). No
credentials at all is 401 (with `WWW-Authenticate: Bearer`); a token that does not verify is 401
with `error="invalid_token"`; a key or admin token that does not match is 403; a valid token
without the scope needed is 403 naming the scope. Secrets are compared in constant time.
"""

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from service.config import Settings
from service.errors import Forbidden, Unauthorized
from service.server.jwks import RemoteKeys
from service.server.tokens import (
    Claims,
    KeySource,
    StaticKeys,
    TokenRules,
    TokenVerifier,
    VerificationKey,
    keys_of_file,
)
from service.store.repository import is_model_name

INFER_SCOPE = "modelserve:infer"
ADMIN_SCOPE = "modelserve:admin"
MODEL_SCOPE_PREFIX = "infer:"  # infer:<model>, or a glob such as infer:fraud-*


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
class Identity:
    """Who sent a request, as logs, audit lines and rate limits name it: never a secret."""

    kind: Literal["anonymous", "api_key", "admin_token", "token"]
    subject: str
    scopes: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.subject}"

    def may_infer(self, model: str | None) -> bool:
        if self.kind != "token":
            return self.kind in ("anonymous", "api_key")
        if INFER_SCOPE in self.scopes:
            return True
        return model is not None and any(
            scope.startswith(MODEL_SCOPE_PREFIX)
            and fnmatchcase(model, scope.removeprefix(MODEL_SCOPE_PREFIX))
            for scope in self.scopes
        )

    def may_admin(self) -> bool:
        return self.kind == "admin_token" or (self.kind == "token" and ADMIN_SCOPE in self.scopes)


ANONYMOUS = Identity("anonymous", "anonymous")


def require_inference(identity: Identity, model: str | None) -> None:
    """Raise unless `identity` may call `model` (None: every model)."""
    if identity.may_infer(model):
        return
    if model is None or not is_model_name(model):
        raise Forbidden(f"the token lacks the scope {INFER_SCOPE!r}", scope=INFER_SCOPE)
    scope = MODEL_SCOPE_PREFIX + model
    raise Forbidden(
        f"the token lacks the scope {scope!r} (or {INFER_SCOPE!r}) to call model {model!r}",
        scope=scope,
    )


def key_id(key: str) -> str:
    """A short name for an API key in logs and metrics, from which the key cannot be found."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _scopes(claims: Claims, claim: str) -> frozenset[str]:
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()


def token_verifier(settings: Settings) -> TokenVerifier | None:
    """The verifier the settings describe, or None when tokens are not accepted."""
    if not settings.tokens_enabled():
        return None
    algorithms = settings.jwt_algorithm_set()
    assert settings.oidc_issuer is not None
    assert settings.oidc_audience is not None
    keys: KeySource
    if settings.jwt_public_key_file is not None:
        keys = StaticKeys(keys_of_file(Path(settings.jwt_public_key_file), algorithms))
    elif settings.oidc_jwks_url is not None or settings.jwt_hmac_secret is None:
        keys = RemoteKeys(
            settings.oidc_issuer,
            settings.oidc_jwks_url,
            algorithms,
            settings.oidc_timeout_s,
            settings.oidc_refresh_interval_s,
            settings.oidc_cache_s,
        )
    else:
        keys = StaticKeys({})
    secret = settings.jwt_hmac_secret
    hmac_key = None
    if secret is not None:
        hmac_key = VerificationKey(
            secret.get_secret_value().encode(), frozenset(a for a in algorithms if a[:2] == "HS")
        )
    rules = TokenRules(
        settings.oidc_issuer, settings.oidc_audience, settings.jwt_leeway_s, algorithms, hmac_key
    )
    return TokenVerifier(rules, keys)


@dataclass(frozen=True)
class Credentials:
    api_keys: tuple[bytes, ...]
    admin_token: bytes | None
    tokens: TokenVerifier | None = None
    scope_claim: str = "scope"

    @classmethod
    def from_settings(cls, settings: Settings) -> "Credentials":
        token = settings.admin_token
        return cls(
            tuple(key.encode() for key in settings.api_key_list()),
            token.get_secret_value().encode() if token is not None else None,
            token_verifier(settings),
            settings.jwt_scope_claim,
        )

    async def prepare(self) -> None:
        """Fetch the issuer's keys before the first request (within the fetch timeout)."""
        if self.tokens is not None:
            await self.tokens.keys.refresh()

    async def check_inference(
        self, authorization: str | None, api_key: str | None, model: str | None
    ) -> Identity:
        """Who may call `model` (None: every model); raises unless they may. Inference is open
        when neither API keys nor tokens are configured."""
        identity = await self.check_caller(authorization, api_key)
        require_inference(identity, model)
        return identity

    async def check_caller(self, authorization: str | None, api_key: str | None) -> Identity:
        """Who sent a request that names its models later (a batch job): valid credentials of
        an inference caller, whatever the models they may call."""
        if not self.api_keys and self.tokens is None:
            return ANONYMOUS
        given = api_key if api_key is not None else bearer_token(authorization)
        if given is None:
            what = "an API key or a bearer token" if self.tokens else "an API key"
            raise Unauthorized(
                f"this server needs {what}: send 'Authorization: Bearer <key>' or 'X-API-Key'"
            )
        identity = await self._identify(given, self.api_keys, jwt=api_key is None)
        if identity is None:
            raise Forbidden("the API key is not valid")
        return identity

    async def check_admin(self, authorization: str | None) -> Identity:
        if self.admin_token is None and self.tokens is None:
            raise Forbidden(
                "repository endpoints are disabled; set MODELSERVE_ADMIN_TOKEN (or configure "
                "bearer tokens, MODELSERVE_OIDC_ISSUER) to enable them"
            )
        given = bearer_token(authorization)
        if given is None:
            raise Unauthorized("repository endpoints need 'Authorization: Bearer <admin token>'")
        admin = (self.admin_token,) if self.admin_token is not None else ()
        identity = await self._identify(given, admin, jwt=True)
        if identity is None:
            raise Forbidden("the admin token is not valid")
        if not identity.may_admin():
            raise Forbidden(
                f"the token lacks the scope {ADMIN_SCOPE!r} for repository endpoints",
                scope=ADMIN_SCOPE,
            )
        return identity

    async def check_any(self, authorization: str | None, api_key: str | None) -> Identity:
        """An API key, the admin token or a valid token; with none configured, nobody gets in."""
        secrets = (*self.api_keys, *((self.admin_token,) if self.admin_token else ()))
        if not secrets and self.tokens is None:
            raise Forbidden(
                "this endpoint is protected but no MODELSERVE_API_KEYS or "
                "MODELSERVE_ADMIN_TOKEN is set"
            )
        given = api_key if api_key is not None else bearer_token(authorization)
        if given is None:
            raise Unauthorized("send 'Authorization: Bearer <key>' or 'X-API-Key'")
        identity = await self._identify(given, secrets, jwt=api_key is None)
        if identity is None:
            raise Forbidden("the credentials are not valid")
        return identity

    async def _identify(
        self, given: str, secrets: tuple[bytes, ...], *, jwt: bool
    ) -> Identity | None:
        """Whose `given` is among `secrets` or, as a JWT, verified; None if no one's."""
        if secrets and _matches(given, secrets):
            admin = self.admin_token
            if admin is not None and hmac.compare_digest(given.encode(), admin):
                return Identity("admin_token", "admin")
            return Identity("api_key", key_id(given))
        # A JWT is three base64url parts; anything else is a key that did not match.
        if jwt and self.tokens is not None and given.count(".") == 2:
            claims = await self.tokens.verify(given)
            subject = claims.get("sub")
            return Identity(
                "token",
                subject if isinstance(subject, str) else "unknown",
                _scopes(claims, self.scope_claim),
            )
        return None
