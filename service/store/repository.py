"""The on-disk model repository: names, versions, model.toml, metadata and sha256 checks."""

import functools
import hashlib
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelLoadError, ModelNotFound
from service.store.metadata import ArtifactMetadata
from service.store.signing import TrustedKeys

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Positive integers without leading zeros, so "01" and "1" never name the same folder.
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")
ARTIFACT_NAMES = ("model.onnx", "model.joblib", "model.pkl")
PICKLE_SUFFIXES = (".joblib", ".pkl")


def is_model_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None and ".." not in name


@functools.lru_cache(maxsize=1024)  # every request that names a version asks again
def parse_version(text: str) -> int | None:
    return int(text) if VERSION_RE.fullmatch(text) else None


def model_dir(root: Path, name: str) -> Path:
    """The folder of a model; refuses any name that could leave the repository."""
    if not is_model_name(name):
        raise ModelNotFound(f"model name {name!r} is not valid: use letters, digits, '_', '.', '-'")
    return root / name


class VersionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(None, ge=1)
    all: bool | None = None
    specific: list[int] | None = None

    def select(self, versions: list[int]) -> list[int]:
        if self.specific is not None:
            return [v for v in versions if v in self.specific]
        if self.latest is not None:
            return sorted(versions)[-self.latest :]
        return versions


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_rows: int | None = Field(None, ge=0)
    max_delay_ms: float | None = Field(None, ge=0)


class PayloadLogConfig(BaseModel):
    """This model's share of requests in the payload log, instead of MODELSERVE_PAYLOAD_LOG_RATE."""

    model_config = ConfigDict(extra="forbid")

    rate: float | None = Field(None, ge=0, le=1)


class ShadowConfig(BaseModel):
    """Mirror a fraction of one version's traffic to another, off the response path."""

    model_config = ConfigDict(extra="forbid")

    source: int = Field(ge=1)
    target: int = Field(ge=1)
    fraction: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _two_versions(self) -> "ShadowConfig":
        if self.source == self.target:
            raise ValueError("shadow source and target must be different versions")
        return self


class ModelConfig(BaseModel):
    """The optional model.toml of a model: the desired state every worker and replica applies."""

    model_config = ConfigDict(extra="forbid")

    default_version: int | None = Field(None, ge=1)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    aliases: dict[str, int] = Field(default_factory=dict)
    # Version -> weight of the unversioned requests it answers; empty: the default answers all.
    traffic: dict[int, float] = Field(default_factory=dict)
    shadow: ShadowConfig | None = None
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    payload_log: PayloadLogConfig = Field(default_factory=PayloadLogConfig)
    # Unloaded through the repository API: known, not served until loaded again.
    unloaded: bool = False
    # Bumped by every change made through the API, so that each change is one new state.
    revision: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _aliases_are_not_numbers(self) -> "ModelConfig":
        for alias in self.aliases:
            if alias.isdigit():
                raise ValueError(f"alias {alias!r} must be a name, not a number")
            if not is_model_name(alias):
                raise ValueError(
                    f"alias {alias!r} must be a name of letters, digits, '_', '.' and '-' "
                    "(64 at most), starting with a letter or digit"
                )
        return self

    @model_validator(mode="after")
    def _traffic_is_a_split(self) -> "ModelConfig":
        if any(weight < 0 for weight in self.traffic.values()):
            raise ValueError("traffic weights must not be negative")
        if self.traffic and sum(self.traffic.values()) <= 0:
            raise ValueError("traffic weights must add up to more than 0")
        if any(version < 1 for version in self.traffic):
            raise ValueError("traffic keys are version numbers")
        return self


Fingerprint = tuple[tuple[str, int, int], ...]
Stamp = tuple[int, int, int]
CONFIG_NAME = "model.toml"


def config_stamp(folder: Path) -> Stamp | None:
    """What identifies one state of model.toml: a rename gives the file a new inode."""
    try:
        stat = (folder / CONFIG_NAME).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def fingerprint(folder: Path) -> Fingerprint:
    """Path, size and modification time of every file below a model folder."""
    entries = []
    for path in sorted(folder.rglob("*")):
        # Dot files are temporary (model.toml is written to one, then renamed).
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            stat = path.stat()
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


@dataclass(frozen=True)
class ModelSource:
    """A model folder as found on disk: its config and the versions the policy selects."""

    name: str
    config: ModelConfig
    versions: dict[int, Path]
    config_error: str | None = None
    ignored: list[str] = field(default_factory=list)
    fingerprint: Fingerprint = ()
    stamp: Stamp | None = None
    # Version folders that are there but that the version policy leaves out.
    unselected: list[int] = field(default_factory=list)

    def absence(self, version: int) -> str:
        """Why `version` is not among the versions to load."""
        if version in self.unselected:
            return f"the version policy in model.toml leaves version {version} out"
        return f"there is no version folder {version}"


def scan_repository(root: Path, model_name: str | None = None) -> dict[str, ModelSource]:
    """Every model folder under root; with model_name, root is that one model (see below)."""
    if not root.is_dir():
        raise ModelLoadError(f"model repository {root} is not a folder", reason="no_repository")
    if model_name is not None:
        return {model_name: scan_single_model(root, model_name)}
    sources: dict[str, ModelSource] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and is_model_name(entry.name) and not entry.is_symlink():
            sources[entry.name] = scan_model(root, entry.name)
    if _holds_artifact(root) or (sources and all(parse_version(n) for n in sources)):
        logger.warning(
            "%s looks like a single model, not a repository of model folders; "
            "set MODELSERVE_MODEL_NAME to serve it under that name",
            root,
        )
    return sources


def scan_model(root: Path, name: str, model_name: str | None = None) -> ModelSource:
    if model_name is not None:
        if name != model_name:
            raise ModelNotFound(f"model {name!r} is not served here; only {model_name!r} is")
        return scan_single_model(root, name)
    folder = model_dir(root, name)
    if not folder.is_dir():
        raise ModelNotFound(f"model {name!r} is not in the repository")
    return scan_model_folder(folder, name)


def scan_single_model(root: Path, name: str) -> ModelSource:
    """The folder KServe mounts at /mnt/models: one model's folder, or one version's folder.

    A model folder holds version folders (and model.toml); a version folder holds the artifact
    and metadata.json directly, and serves as the version its metadata names (else 1).
    """
    if not is_model_name(name):
        raise ModelLoadError(
            f"model name {name!r} is not valid: use letters, digits, '_', '.', '-'",
            reason="bad_model_name",
        )
    if not _holds_artifact(root):
        source = scan_model_folder(root, name)
        if not source.versions:
            logger.error("%s holds no version folder and no artifact for model %s", root, name)
        return source
    before = fingerprint(root)
    versions = [e.name for e in root.iterdir() if e.is_dir() and parse_version(e.name)]
    if versions:
        raise ModelLoadError(
            f"{root} holds both an artifact and version folders ({', '.join(sorted(versions))}); "
            "keep one layout",
            reason="ambiguous_layout",
        )
    stamp = config_stamp(root)
    config, error = read_model_config(root / CONFIG_NAME)
    return ModelSource(name, config, {_declared_version(root): root}, error, [], before, stamp)


def scan_model_folder(folder: Path, name: str) -> ModelSource:
    # Taken before reading anything, so a change made during the load is seen by the next poll.
    before = fingerprint(folder)
    stamp = config_stamp(folder)
    config, error = read_model_config(folder / CONFIG_NAME)
    found: dict[int, Path] = {}
    ignored: list[str] = []
    for entry in folder.iterdir():
        if not entry.is_dir():
            continue
        version = parse_version(entry.name)
        if version is None or entry.is_symlink():
            ignored.append(entry.name)
        else:
            found[version] = entry
    for folder_name in ignored:
        logger.warning(
            "model %s: ignoring folder %r (versions are positive integers)", name, folder_name
        )
    selected = config.version_policy.select(sorted(found))
    unselected = sorted(set(found) - set(selected))
    versions = {v: found[v] for v in selected}
    return ModelSource(name, config, versions, error, ignored, before, stamp, unselected)


def _holds_artifact(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ARTIFACT_NAMES)


def _declared_version(version_dir: Path) -> int:
    """The version metadata.json names; 1 if it is missing or unreadable (loading reports why)."""
    try:
        return max(1, ArtifactMetadata.read(version_dir / "metadata.json").version)
    except (ValidationError, OSError, UnicodeDecodeError):
        return 1


def read_model_config(path: Path) -> tuple[ModelConfig, str | None]:
    if not path.is_file():
        return ModelConfig(), None
    try:
        return ModelConfig.model_validate(tomllib.loads(path.read_text())), None
    except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError) as exc:
        message = f"{path}: {exc}"
        logger.error("invalid model.toml, using defaults: %s", message)
        return ModelConfig(), message


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact's bytes, read once: what was hashed is exactly what gets deserialised."""

    path: Path
    data: bytes
    metadata: ArtifactMetadata | None
    signer: str | None = None  # the trusted key that signed metadata.json


def find_artifact(version_dir: Path) -> Path:
    present = [version_dir / n for n in ARTIFACT_NAMES if (version_dir / n).is_file()]
    if not present:
        raise ModelLoadError(
            f"{version_dir}: no artifact (expected one of {', '.join(ARTIFACT_NAMES)})",
            reason="missing_artifact",
        )
    if len(present) > 1:
        raise ModelLoadError(
            f"{version_dir}: several artifacts ({', '.join(p.name for p in present)}); keep one",
            reason="ambiguous_artifact",
        )
    return present[0]


def read_verified(
    version_dir: Path, allow_unverified_pickle: bool, trusted: TrustedKeys | None = None
) -> VerifiedArtifact:
    """Read the artifact and check it against metadata.json (and metadata.json against its
    signature, with trusted keys) before anything deserialises it."""
    artifact = find_artifact(version_dir)
    metadata_path = version_dir / "metadata.json"
    is_pickle = artifact.suffix in PICKLE_SUFFIXES
    try:
        signed = metadata_path.read_bytes() if metadata_path.is_file() else None
    except OSError as exc:
        raise ModelLoadError(f"{metadata_path}: {exc}", reason="bad_metadata") from exc
    signer = trusted.check(version_dir, signed) if trusted is not None else None
    if signed is None:
        if is_pickle and not allow_unverified_pickle:
            raise ModelLoadError(
                f"{artifact}: no metadata.json, so its sha256 cannot be verified and unpickling "
                "could run arbitrary code; run `modelserve package` to add it, or set "
                "MODELSERVE_ALLOW_UNVERIFIED_PICKLE=true",
                reason="unverified_pickle",
            )
        return VerifiedArtifact(artifact, artifact.read_bytes(), None)
    try:
        metadata = ArtifactMetadata.model_validate_json(signed)
    except ValidationError as exc:
        raise ModelLoadError(
            f"{metadata_path}: invalid metadata: {exc}", reason="bad_metadata"
        ) from exc
    if metadata.artifact != artifact.name:
        raise ModelLoadError(
            f"{metadata_path} names artifact {metadata.artifact!r}, "
            f"but the folder holds {artifact.name!r}",
            reason="bad_metadata",
        )
    data = artifact.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != metadata.sha256.lower():
        raise ModelLoadError(
            f"{artifact}: sha256 {actual[:12]}… does not match metadata.json "
            f"({metadata.sha256[:12]}…); the artifact was changed or corrupted; not loaded",
            reason="hash_mismatch",
        )
    return VerifiedArtifact(artifact, data, metadata, signer)
