"""Ways to break a version folder of a trained repository, as operators and attackers do."""

import hashlib
import json
from pathlib import Path


def rewrite_sha256(version_dir: Path) -> None:
    """Make metadata.json agree with whatever the artifact now holds."""
    metadata_path = version_dir / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    artifact = version_dir / metadata["artifact"]
    metadata["sha256"] = hashlib.sha256(artifact.read_bytes()).hexdigest()
    metadata_path.write_text(json.dumps(metadata))


def tamper(version_dir: Path) -> None:
    """Change the artifact after packaging, so its sha256 no longer matches (hash_mismatch)."""
    artifact = next(version_dir.glob("model.*"))
    artifact.write_bytes(artifact.read_bytes() + b"tampered")


def truncate(artifact: Path, keep: float = 0.5) -> None:
    data = artifact.read_bytes()
    artifact.write_bytes(data[: int(len(data) * keep)])


def set_framework_version(version_dir: Path, package: str, version: str) -> None:
    metadata_path = version_dir / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["framework"][package] = version
    metadata_path.write_text(json.dumps(metadata))
