"""JWT bearer tokens: which keys verify which algorithms, and the claims a token must carry.

A token's `alg` header picks the kind of key, and the key picks the algorithms it may verify:
an RSA key only RS*/PS*, an EC key only the ES* of its curve, an Ed25519 key only EdDSA, and
the HMAC secret (only when configured) only HS*. So `alg: none` and HS256 signed with a public
key (key confusion) can never verify. Keys come from a `KeySource`: a static file, or the
issuer's JWKS (service/server/jwks.py).
"""

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from service.errors import InvalidToken

# Larger than any IdP's access token, smaller than what would make parsing a cost.
MAX_TOKEN_BYTES = 8192
# Verified tokens remembered, so a client's repeated token costs a lookup, not a signature.
_REMEMBERED = 4096
_HMAC = ("HS256", "HS384", "HS512")
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

Claims = Mapping[str, Any]


@dataclass(frozen=True)
class VerificationKey:
    key: Any  # a `cryptography` public key, or the HMAC secret's bytes
    algorithms: frozenset[str]


def key_algorithms(key: object, allowed: frozenset[str]) -> frozenset[str]:
    """The algorithms of `allowed` that `key` can verify: none for a key of another kind."""
    fits: tuple[str, ...] = ()
    if isinstance(key, rsa.RSAPublicKey):
        fits = _RSA
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        fits = (_CURVES[key.curve.name],)
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        fits = ("EdDSA",)
    return allowed.intersection(fits)


def keys_of_jwks(document: object, allowed: frozenset[str]) -> dict[str | None, VerificationKey]:
    """The signing keys of a JWKS document by `kid`; symmetric and encryption keys are skipped
    (an IdP never publishes a shared secret)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document: it needs a 'keys' list")
    keys: dict[str | None, VerificationKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") == "oct" or entry.get("use") == "enc":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWKError:
            continue  # a key type this server cannot use; the others still serve
        algorithms = key_algorithms(jwk.key, allowed)
        if isinstance(alg := entry.get("alg"), str):
            algorithms = algorithms & {alg}
        if algorithms:
            keys[jwk.key_id] = VerificationKey(jwk.key, algorithms)
    return keys


def keys_of_file(path: Path, allowed: frozenset[str]) -> dict[str | None, VerificationKey]:
    """A static key file: a JWKS document, or one PEM public key that verifies any `kid`."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        return keys_of_jwks(json.loads(data), allowed)
    key = load_pem_public_key(data)
    algorithms = key_algorithms(key, allowed)
    if not algorithms:
        raise ValueError(
            f"{path}: a {type(key).__name__} verifies none of the algorithms "
            f"{', '.join(sorted(allowed))} (MODELSERVE_JWT_ALGORITHMS)"
        )
    return {None: VerificationKey(key, algorithms)}


class KeySource(Protocol):
    # Changes whenever the keys do, so tokens verified with a withdrawn key are forgotten.
    generation: int

    def find(self, kid: str | None) -> VerificationKey | None: ...

    async def refresh(self) -> None:
        """Fetch the keys again if that is allowed now; returns within a bounded time."""


@dataclass
class StaticKeys:
    keys: dict[str | None, VerificationKey]
    generation: int = 0

    def find(self, kid: str | None) -> VerificationKey | None:
        if None in self.keys and len(self.keys) == 1:
            return self.keys[None]
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    async def refresh(self) -> None:
        return None


@dataclass(frozen=True)
class TokenRules:
    issuer: str
    audience: str
    leeway_s: float
    algorithms: frozenset[str]
    hmac: VerificationKey | None


class TokenVerifier:
    def __init__(self, rules: TokenRules, keys: KeySource) -> None:
        self.rules = rules
        self.keys = keys
        self._verified: dict[str, Claims] = {}
        self._generation = keys.generation

    async def verify(self, token: str) -> Claims:
        """The claims of a token signed by a trusted key, for this audience, valid now."""
        if self._generation != self.keys.generation:
            self._verified.clear()
            self._generation = self.keys.generation
        claims = self._verified.get(token)
        if claims is not None and claims["exp"] + self.rules.leeway_s > time.time():
            return claims
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken(f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes")
        algorithm, key = await self._key_for(token)
        claims = self._decode(token, algorithm, key)
        if len(self._verified) >= _REMEMBERED:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = claims
        return claims

    async def _key_for(self, token: str) -> tuple[str, VerificationKey]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"the bearer token is not a well-formed JWT: {exc}") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self.rules.algorithms:
            accepted = ", ".join(sorted(self.rules.algorithms))
            raise InvalidToken(f"the token's algorithm {algorithm!r} is not accepted ({accepted})")
        if algorithm in _HMAC:
            key = self.rules.hmac
        else:
            key = self.keys.find(kid)
            if key is None:
                # Perhaps the issuer rotated its keys: look once more (rate-limited, bounded).
                await self.keys.refresh()
                key = self.keys.find(kid)
        if key is None:
            raise InvalidToken(f"no trusted key has the token's key id {kid!r}")
        if algorithm not in key.algorithms:
            raise InvalidToken(f"the key {kid!r} does not verify {algorithm} tokens")
        return algorithm, key

    def _decode(self, token: str, algorithm: str, key: VerificationKey) -> Claims:
        rules = self.rules
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=rules.audience,
                issuer=rules.issuer,
                leeway=rules.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired; get a new one from the issuer") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("the token is not valid yet (its 'nbf' or 'iat')") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken(
                f"the token is for another audience; this server is {rules.audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise InvalidToken(
                f"the token is from another issuer; this server trusts {rules.issuer!r}"
            ) from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("the token's signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"the token is not valid: {exc}") from None
        return claims
