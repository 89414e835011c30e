"""A test OIDC issuer on loopback: a discovery document and a JWKS over real HTTP, its own keys,
key rotation, a stall switch, and a count of the requests it answered."""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

AUDIENCE = "modelserve-test"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: PrivateKeyTypes

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        encoder: Any = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[
            self.algorithm
        ]
        jwk: dict[str, Any] = encoder.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def new_key(kid: str, algorithm: str = "RS256") -> SigningKey:
    private: PrivateKeyTypes
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return SigningKey(kid, algorithm, private)


@dataclass
class Issuer:
    """What the test changes while the issuer runs: its keys, a stall, and what it counts."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    stall_s: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def jwks_requests(self) -> int:
        with self.lock:
            return self.requests.get("/jwks", 0)

    def token(
        self,
        scope: str = "modelserve:infer",
        key: SigningKey | None = None,
        lifetime_s: float = 300,
        **claims: Any,
    ) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        payload = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime_s),
            "scope": scope,
            **claims,
        }
        return jwt.encode(payload, key.private, key.algorithm, headers={"kid": key.kid})  # type: ignore[arg-type]


def _handler(issuer: Issuer) -> type[BaseHTTPRequestHandler]:
    class IssuerHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with issuer.lock:
                issuer.requests[self.path] = issuer.requests.get(self.path, 0) + 1
            if issuer.stall_s:
                time.sleep(issuer.stall_s)
            if self.path == "/.well-known/openid-configuration":
                body: object = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
            elif self.path == "/jwks":
                body = {"keys": [key.public_jwk() for key in issuer.keys]}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return IssuerHandler


@contextmanager
def run_issuer(keys: list[SigningKey]) -> Iterator[Issuer]:
    issuer = Issuer(keys=keys)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(issuer))
    server.daemon_threads = True
    issuer.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        server.shutdown()
        server.server_close()
