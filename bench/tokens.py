"""CPU cost of checking a JWT bearer token per request, per algorithm.

Two figures per algorithm: the first check of a token (signature and claims verified with the
cached key), and every later check of the same token (what a client that reuses its access
token pays on each request), both through `Credentials.check_inference`, the call every front
door makes. CPU time (process_time), in microseconds.

    .venv/bin/python -m bench.tokens [--tokens 2000] [--repeats 100000]
"""

import argparse
import asyncio
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from service.server.auth import Credentials
from service.server.tokens import StaticKeys, TokenRules, TokenVerifier, keys_of_jwks

ISSUER, AUDIENCE = "https://issuer.example", "modelserve"
ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})


def _key(algorithm: str) -> tuple[Any, dict[str, Any]]:
    private: Any
    encoder: Any
    if algorithm == "RS256":
        private, encoder = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            RSAAlgorithm,
        )
    elif algorithm == "ES256":
        private, encoder = ec.generate_private_key(ec.SECP256R1()), ECAlgorithm
    else:
        private, encoder = ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm
    jwk: dict[str, Any] = encoder.to_jwk(private.public_key(), as_dict=True)
    return private, {**jwk, "kid": algorithm, "alg": algorithm}


async def measure(algorithm: str, tokens: int, repeats: int) -> tuple[float, float]:
    private, jwk = _key(algorithm)
    keys = StaticKeys(keys_of_jwks({"keys": [jwk]}, ALGORITHMS))
    verifier = TokenVerifier(TokenRules(ISSUER, AUDIENCE, 30.0, ALGORITHMS, None), keys)
    credentials = Credentials((), None, verifier)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bench",
        "exp": now + 3600,
        "scope": "modelserve:infer",
    }
    headers = [
        "Bearer " + jwt.encode({**claims, "jti": str(n)}, private, algorithm, {"kid": algorithm})
        for n in range(tokens)
    ]
    started = time.process_time()
    for header in headers:
        await credentials.check_inference(header, None, "iris")
    first = (time.process_time() - started) / tokens
    started = time.process_time()
    for _ in range(repeats):
        await credentials.check_inference(headers[0], None, "iris")
    again = (time.process_time() - started) / repeats
    return first * 1e6, again * 1e6


async def run(tokens: int, repeats: int) -> None:
    print("| algorithm | first check of a token (µs CPU) | same token again (µs CPU) |")
    print("|---|---|---|")
    for algorithm in ("RS256", "ES256", "EdDSA"):
        first, again = await measure(algorithm, tokens, repeats)
        print(f"| {algorithm} | {first:.1f} | {again:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(run(args.tokens, args.repeats))


if __name__ == "__main__":
    main()
