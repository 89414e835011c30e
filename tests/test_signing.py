"""Signed versions: `modelserve sign`, and loading refused before unpickling when a signature is
missing (if required), bad, or by an untrusted key."""

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from service.cli import main
from service.store.registry import LoadOptions, load_registry
from service.store.signing import TrustedKeys
from tests.serving import run_server
from tests.test_faults import INFER, JSON, infer_body


class MarkerPayload:
    """What an attacker puts in a pickle: unpickling it creates the marker (a folder)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _write_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture
def signed(iris_repository: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of iris with both versions signed: (repository, private key, public key)."""
    root = tmp_path / "models"
    shutil.copytree(iris_repository, root)
    private, public = _write_key_pair(tmp_path, "release")
    for version in ("1", "2"):
        assert (
            main(
                ["sign", f"iris:{version}", "--key", str(private), "--model-repository", str(root)]
            )
            == 0
        )
    return root, private, public


def _failures(root: Path, trusted: TrustedKeys | None) -> dict[int, str]:
    entry = load_registry(root, LoadOptions(trusted_keys=trusted)).model("iris")
    return {number: f"{f.reason}: {f.message}" for number, f in entry.failures.items()}


def test_a_rewritten_pickle_and_sha256_is_refused_before_unpickling(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, _, public = signed
    marker = tmp_path / "pwned"
    version = root / "iris" / "1"
    payload = pickle.dumps(MarkerPayload(marker))
    (version / "model.joblib").write_bytes(payload)
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["sha256"] = hashlib.sha256(payload).hexdigest()
    (version / "metadata.json").write_text(json.dumps(metadata))

    trusted = TrustedKeys.read([public], required=True)
    failures = _failures(root, trusted)
    assert list(failures) == [1]
    assert failures[1].startswith("bad_signature: ")
    assert "changed after it was signed" in failures[1]
    assert not marker.exists()
    # The sha256 alone does not stop it: without signatures the payload runs.
    assert "1" in str(_failures(root, None))
    assert marker.exists()


def test_unsigned_untrusted_and_garbled_versions_are_refused(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, _, public = signed
    other_private, _ = _write_key_pair(tmp_path, "other")
    assert (
        main(["sign", "iris:2", "--key", str(other_private), "--model-repository", str(root)]) == 0
    )
    trusted = TrustedKeys.read([public], required=True)
    assert _failures(root, trusted)[2].startswith("untrusted_signer: ")

    (root / "iris" / "2" / "signature.json").write_text('{"key_id": "x", "signature": "%%"}')
    assert _failures(root, trusted)[2].startswith("bad_signature: ")
    # A garbled file is said to be one, in words (not the reader's internals, nor "changed
    # after it was signed" for a signature that claims no algorithm).
    signed_by = json.loads((root / "iris" / "1" / "signature.json").read_text())
    for garbled, reason in (
        ("[1]", "(not a JSON object)"),
        (json.dumps({**signed_by, "algorithm": "none"}), "(algorithm 'none', not 'Ed25519')"),
        (json.dumps({"algorithm": "Ed25519", "key_id": "x"}), "(no 'signature')"),
    ):
        (root / "iris" / "2" / "signature.json").write_text(garbled)
        failure = _failures(root, trusted)[2]
        assert failure.startswith("bad_signature: "), failure
        assert f"not a signature file {reason}; not loaded" in failure, failure

    (root / "iris" / "2" / "signature.json").unlink()
    failures = _failures(root, trusted)
    assert failures[2].startswith("unsigned: ")
    assert "modelserve sign MODEL:VERSION" in failures[2]
    assert 1 not in failures
    # Without MODELSERVE_REQUIRE_SIGNATURES an unsigned version loads, with a warning.
    lenient = load_registry(root, LoadOptions(trusted_keys=TrustedKeys.read([public], False)))
    assert lenient.resolve("iris", "2").warnings == ["not signed"]
    assert lenient.resolve("iris", "1").warnings == []


def test_sign_needs_an_ed25519_key(
    signed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, public = signed
    assert main(["sign", "iris:1", "--key", str(public), "--model-repository", str(root)]) == 1
    said = capsys.readouterr().err
    assert f"{public}: not an unencrypted PEM private key (it holds a public key)" in said, said
    assert main(["sign", "iris", "--key", str(public), "--model-repository", str(root)]) == 1


@pytest.mark.e2e
def test_the_server_reports_the_refused_version_and_serves_the_other(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, _, public = signed
    (root / "iris" / "2" / "signature.json").unlink()
    env = {
        "MODELSERVE_TRUSTED_KEYS": str(public),
        "MODELSERVE_REQUIRE_SIGNATURES": "true",
        "MODELSERVE_ADMIN_TOKEN": "admin",
    }
    with run_server(root, tmp_path, env=env) as server:
        index = httpx.post(
            server.url + "/v2/repository/index", headers={"Authorization": "Bearer admin"}
        ).json()
        refused = [e for e in index if e["version"] == "2"]
        assert refused[0]["state"] == "UNAVAILABLE"
        assert refused[0]["reason"].startswith("unsigned: ")
        metrics = httpx.get(server.url + "/metrics").text
        assert 'modelserve_model_load_failures_total{model="iris",reason="unsigned"} 1.0' in metrics
        # iris pins default_version = 2, which did not load: unversioned requests say so, and
        # version 1 serves when asked for.
        pinned = httpx.post(server.url + INFER, content=infer_body(), headers=JSON)
        assert pinned.status_code == 503
        assert "version 2" in pinned.json()["error"]
        one = INFER.replace("/infer", "/versions/1/infer")
        served = httpx.post(server.url + one, content=infer_body(), headers=JSON)
        assert served.status_code == 200
        assert served.json()["model_version"] == "1"
        assert "not loaded (unsigned)" in server.output()


def test_a_signature_failure_is_an_audit_line(
    signed: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, _, public = signed
    (root / "iris" / "2" / "signature.json").unlink()
    with caplog.at_level(logging.INFO, logger="service.audit"):
        _failures(root, TrustedKeys.read([public], required=True))
    [record] = [r for r in caplog.records if r.name == "service.audit"]
    assert vars(record)["action"] == "signature_check"
    assert (vars(record)["model"], vars(record)["version"]) == ("iris", 2)
    assert vars(record)["result"].startswith("unsigned: ")
    assert vars(record)["who"] == "loader"
