"""Signed model versions: an Ed25519 signature over a version's `metadata.json`, checked against
trusted public keys before anything is unpickled.

`metadata.json` carries the artifact's sha256, so the signature covers the artifact's bytes too:
whoever can write the repository can replace the artifact *and* its sha256, but not sign them.
The signature lives beside it in `signature.json`:

    {"algorithm": "Ed25519", "key_id": "<16 hex digits>", "signature": "<base64>"}
"""

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ModelLoadError

# cryptography is imported where keys are read or a signature checked: every model load passes
# through here, and most repositories are not signed (it costs 12 ms of a command's start).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE_FILE = "signature.json"
# The load failure reasons that a signature check gives.
SIGNATURE_FAILURES = frozenset({"unsigned", "bad_signature", "untrusted_signer"})
# Bound to its purpose, so a signature over these bytes means nothing elsewhere.
_CONTEXT = b"modelserve version signature v1\n"


def key_id(key: "Ed25519PublicKey") -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key(path: Path, private: bool) -> "Ed25519PublicKey | Ed25519PrivateKey":
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key,
        load_pem_public_key,
    )

    data = path.read_bytes()
    kind = "private" if private else "public"
    try:
        key = load_pem_private_key(data, password=None) if private else load_pem_public_key(data)
    except (ValueError, TypeError):  # another kind of key, a passphrase, not PEM at all
        other = "public" if private else "private"
        hint = (
            f" (it holds a {other} key)" if f"{other.upper()} KEY" in data.decode("latin-1") else ""
        )
        raise ValueError(
            f"{path}: not an unencrypted PEM {kind} key{hint}; "
            + (
                "sign with the private key, e.g. from "
                "`openssl genpkey -algorithm ed25519 -out signing.pem`"
                if private
                else "trust the public key, from `openssl pkey -in signing.pem -pubout`"
            )
        ) from None
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise ValueError(
            f"{path}: not an Ed25519 {kind} key; make one with "
            "`openssl genpkey -algorithm ed25519 -out signing.pem`"
        )
    return key


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys whose signatures are trusted, and whether a version must be signed."""

    keys: dict[str, "Ed25519PublicKey"]
    required: bool = False

    @classmethod
    def read(cls, paths: list[Path], required: bool) -> "TrustedKeys":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        keys: dict[str, Ed25519PublicKey] = {}
        for path in paths:
            key = _read_key(path, private=False)
            assert isinstance(key, Ed25519PublicKey)
            keys[key_id(key)] = key
        return cls(keys, required)

    def check(self, version_dir: Path, metadata: bytes | None) -> str | None:
        """The signer's key id, or None for an unsigned version that may load; raises unless the
        version is signed by a trusted key (or unsigned, when signatures are not required)."""
        signature_path = version_dir / SIGNATURE_FILE
        if metadata is None or not signature_path.is_file():
            if self.required:
                raise ModelLoadError(
                    f"{version_dir}: not signed, and MODELSERVE_REQUIRE_SIGNATURES is true; sign "
                    "it with `modelserve sign MODEL:VERSION --key KEY.pem` (metadata.json and "
                    f"{SIGNATURE_FILE} are needed)",
                    reason="unsigned",
                )
            return None
        try:
            document = json.loads(signature_path.read_bytes())
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            if document.get("algorithm") != "Ed25519":
                raise ValueError(f"algorithm {document.get('algorithm')!r}, not 'Ed25519'")
            signer = str(document["key_id"])
            signature = base64.b64decode(document["signature"], validate=True)
        except KeyError as exc:
            raise ModelLoadError(
                f"{signature_path}: not a signature file (no {exc}); not loaded",
                reason="bad_signature",
            ) from None
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"{signature_path}: not a signature file ({exc}); not loaded",
                reason="bad_signature",
            ) from None
        key = self.keys.get(signer)
        if key is None:
            raise ModelLoadError(
                f"{signature_path}: signed by key {signer}, which is not in "
                "MODELSERVE_TRUSTED_KEYS; not loaded",
                reason="untrusted_signer",
            )
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(signature, _CONTEXT + metadata)
        except InvalidSignature:
            raise ModelLoadError(
                f"{signature_path}: the signature by key {signer} does not match metadata.json "
                "(the version was changed after it was signed); not loaded",
                reason="bad_signature",
            ) from None
        return signer


def sign_version(version_dir: Path, private_key_file: Path) -> str:
    """Write `signature.json` for the version's `metadata.json`; returns the key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _read_key(private_key_file, private=True)
    assert isinstance(key, Ed25519PrivateKey)
    metadata = (version_dir / "metadata.json").read_bytes()
    document = {
        "algorithm": "Ed25519",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(_CONTEXT + metadata)).decode(),
    }
    (version_dir / SIGNATURE_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document["key_id"]
