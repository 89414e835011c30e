"""The issuer's keys, fetched from its JWKS URL (or found through its OIDC discovery document).

Fetched at startup, again in the background once older than MODELSERVE_OIDC_CACHE_S, and when a
token names a key id not in the cache (a rotation) — at most once per
MODELSERVE_OIDC_REFRESH_INTERVAL_S, so a flood of made-up key ids cannot make the server hammer
the issuer. Every fetch runs in a worker thread with a timeout, one at a time; a request waits
for it at most MODELSERVE_OIDC_TIMEOUT_S. When the issuer is slow or down, the cached keys keep
working and a token with an unknown key is refused within that bound.
"""

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from service.server.tokens import VerificationKey, keys_of_jwks

logger = logging.getLogger(__name__)

_MAX_DOCUMENT_BYTES = 1024 * 1024
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_url(url: str) -> None:
    # Keys fetched in clear text could be swapped on the way; loopback is for tests and sidecars.
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        raise ValueError(f"{url!r}: the issuer's keys are fetched over https only")


def _fetch_json(url: str, timeout_s: float) -> Any:
    _check_url(url)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data = response.read(_MAX_DOCUMENT_BYTES + 1)
    if len(data) > _MAX_DOCUMENT_BYTES:
        raise ValueError(f"{url}: the document is larger than {_MAX_DOCUMENT_BYTES} bytes")
    return json.loads(data)


def discover_jwks_url(issuer: str, timeout_s: float) -> str:
    """The `jwks_uri` of the issuer's discovery document, which must name the same issuer."""
    document = _fetch_json(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout_s)
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise ValueError(f"the discovery document of {issuer!r} names another issuer")
    url = document.get("jwks_uri")
    if not isinstance(url, str):
        raise ValueError(f"the discovery document of {issuer!r} has no jwks_uri")
    return url


class RemoteKeys:
    """A `KeySource` over an issuer's JWKS URL, with the cache and refresh rules above."""

    def __init__(
        self,
        issuer: str,
        jwks_url: str | None,
        allowed: frozenset[str],
        timeout_s: float,
        refresh_interval_s: float,
        cache_s: float,
    ) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.allowed = allowed
        self.timeout_s = timeout_s
        self.refresh_interval_s = refresh_interval_s
        self.cache_s = cache_s
        self.generation = 0
        self._keys: dict[str | None, VerificationKey] = {}
        self._fetched_at = -float("inf")
        self._attempted_at = -float("inf")
        self._fetch: asyncio.Task[None] | None = None

    def find(self, kid: str | None) -> VerificationKey | None:
        if time.monotonic() - self._fetched_at > self.cache_s:
            self._start_fetch(time.monotonic())  # in the background; these keys serve meanwhile
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def refresh(self) -> None:
        self._start_fetch(time.monotonic())
        if self._fetch is not None and not self._fetch.done():
            # Shielded: a request that stops waiting leaves the fetch running for the next one.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._fetch), self.timeout_s)

    def _start_fetch(self, now: float) -> None:
        if self._fetch is not None and not self._fetch.done():
            return
        if now - self._attempted_at < self.refresh_interval_s:
            return
        self._attempted_at = now
        self._fetch = asyncio.get_running_loop().create_task(self._fetch_keys())

    async def _fetch_keys(self) -> None:
        try:
            keys = await asyncio.to_thread(self._download)
        except Exception as exc:  # the issuer's boundary: whatever it does, cached keys serve on
            logger.warning("could not fetch the keys of %s: %s", self.issuer, exc)
            return
        if keys != self._keys:
            logger.info("token keys of %s: %s", self.issuer, ", ".join(map(str, keys)) or "none")
            self._keys = keys
            self.generation += 1
        self._fetched_at = time.monotonic()

    def _download(self) -> dict[str | None, VerificationKey]:
        if self.jwks_url is None:
            self.jwks_url = discover_jwks_url(self.issuer, self.timeout_s)
        return keys_of_jwks(_fetch_json(self.jwks_url, self.timeout_s), self.allowed)
