"""What is loaded: model versions, default versions and aliases; replaced whole on reload."""

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from service.errors import ModelLoadError, ModelNotFound, ModelNotReady
from service.store.labels import ClassLabels
from service.store.metadata import ArtifactMetadata
from service.store.repository import (
    Fingerprint,
    ModelSource,
    parse_version,
    read_verified,
    scan_model,
    scan_repository,
)
from service.store.runtimes import Arrays, Runtime, RuntimeOptions, Signature, runtime_module
from service.store.signing import TrustedKeys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    allow_unverified_pickle: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching_max_rows: int = 256
    batching_max_delay_ms: float = 0.0
    # Set: the repository folder is this one model (the layout KServe mounts at /mnt/models).
    model_name: str | None = None
    # Set: a version's signature is checked against these keys before it is unpickled.
    trusted_keys: TrustedKeys | None = None


@dataclass(eq=False)  # identity hashing: a reload makes new versions, with new batchers
class ModelVersion:
    name: str
    version: int
    runtime: Runtime
    artifact: Path
    metadata: ArtifactMetadata | None
    sha256: str
    load_seconds: float
    max_batch_rows: int
    max_delay_ms: float
    warnings: list[str] = field(default_factory=list)

    @property
    def signature(self) -> Signature:
        return self.runtime.signature

    @property
    def format(self) -> str:
        return self.runtime.format

    @cached_property
    def labels(self) -> ClassLabels | None:
        classes = self.signature.classes
        return ClassLabels(classes) if self.signature.task == "classification" and classes else None

    @property
    def batchable(self) -> bool:
        """Requests can share a call only if every tensor's first axis is the row axis."""
        tensors = [*self.signature.inputs, *self.signature.outputs]
        return self.max_batch_rows > 0 and all(t.shape and t.shape[0] == -1 for t in tensors)


@dataclass(frozen=True)
class VersionFailure:
    version: int
    reason: str
    message: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    versions: Mapping[int, ModelVersion]
    failures: Mapping[int, VersionFailure]
    default_version: int | None
    aliases: Mapping[str, int]
    config_error: str | None = None
    # What the model folder looked like when loaded; polling reloads when it changes.
    fingerprint: Fingerprint = ()

    @property
    def ready(self) -> bool:
        return self.default_version is not None


@dataclass(frozen=True)
class Registry:
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    # Models unloaded through the repository API: known, but not served until loaded again.
    unloaded: frozenset[str] = frozenset()

    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            if name in self.unloaded:
                raise ModelNotReady(
                    f"model {name!r} is unloaded; load it through the repository API"
                )
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return entry

    def resolve(self, name: str, version: str | None = None) -> ModelVersion:
        """The version a request names: a number, an alias, or (none) the default."""
        entry = self.model(name)
        if version is None or version == "":
            if entry.default_version is None:
                raise ModelNotReady(
                    f"model {name!r} has no version that loaded; see the server log"
                )
            return entry.versions[entry.default_version]
        number = parse_version(version)
        if number is None:
            number = entry.aliases.get(version)
        if number is None:
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        loaded = entry.versions.get(number)
        if loaded is not None:
            return loaded
        failure = entry.failures.get(number)
        if failure is not None:
            raise ModelNotReady(f"model {name!r} version {number} is not ready: {failure.reason}")
        raise ModelNotFound(f"model {name!r} has no version {number}")

    def with_entry(self, entry: ModelEntry) -> "Registry":
        return Registry({**self.models, entry.name: entry}, self.unloaded - {entry.name})

    def without(self, name: str) -> "Registry":
        self.model(name)
        models = {k: v for k, v in self.models.items() if k != name}
        return Registry(models, self.unloaded | {name})


def smoke_inputs(signature: Signature) -> Arrays:
    """One row of zeros per input, to prove the model answers before it is served."""
    arrays: Arrays = {}
    for spec in signature.inputs:
        shape = [1 if d < 0 else d for d in spec.shape]
        arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return arrays


def load_version(
    name: str, version: int, folder: Path, options: LoadOptions, batching: tuple[int, float]
) -> ModelVersion:
    started = time.perf_counter()
    artifact = read_verified(folder, options.allow_unverified_pickle, options.trusted_keys)
    metadata = artifact.metadata
    module = runtime_module(artifact.path)
    runtime = module.load(artifact.data, metadata, options.runtime)
    try:
        runtime.predict(smoke_inputs(runtime.signature))
    except Exception as exc:  # any failure here means the version cannot serve
        raise ModelLoadError(f"smoke prediction failed: {exc}", reason="smoke_failed") from exc
    warnings: list[str] = []
    if options.trusted_keys is not None and artifact.signer is None:
        warnings.append("not signed")
    if metadata is None:
        warnings.append("no metadata.json: signature inferred from the artifact, sha256 unverified")
    elif (made := metadata.framework.get("scikit-learn")) and runtime.format == "sklearn":
        installed = module.framework_versions().get("scikit-learn")
        if installed and installed != made:
            warnings.append(f"made with scikit-learn {made}, served with {installed}")
    return ModelVersion(
        name=name,
        version=version,
        runtime=runtime,
        artifact=artifact.path,
        metadata=metadata,
        sha256=metadata.sha256 if metadata else hashlib.sha256(artifact.data).hexdigest(),
        load_seconds=time.perf_counter() - started,
        max_batch_rows=batching[0],
        max_delay_ms=batching[1],
        warnings=warnings,
    )


def load_model(source: ModelSource, options: LoadOptions) -> ModelEntry:
    cfg = source.config.batching
    batching = (
        options.batching_max_rows if cfg.max_batch_rows is None else cfg.max_batch_rows,
        options.batching_max_delay_ms if cfg.max_delay_ms is None else cfg.max_delay_ms,
    )
    versions: dict[int, ModelVersion] = {}
    failures: dict[int, VersionFailure] = {}
    for number, folder in sorted(source.versions.items()):
        try:
            versions[number] = load_version(source.name, number, folder, options, batching)
        except ModelLoadError as exc:
            failures[number] = VersionFailure(number, exc.reason, exc.message)
            logger.error(
                "model %s version %s not loaded (%s): %s",
                source.name,
                number,
                exc.reason,
                exc.message,
                extra={"model": source.name, "version": number, "reason": exc.reason},
            )
        except Exception as exc:  # the loader boundary: a broken artifact must not stop the server
            failures[number] = VersionFailure(
                number, "corrupt_artifact", f"{type(exc).__name__}: {exc}"
            )
            logger.exception(
                "model %s version %s not loaded",
                source.name,
                number,
                extra={"model": source.name, "version": number, "reason": "corrupt_artifact"},
            )
        else:
            loaded = versions[number]
            logger.info(
                "model loaded",
                extra={
                    "model": source.name,
                    "version": number,
                    "format": loaded.format,
                    "sha256": loaded.sha256[:12],
                    "load_ms": round(loaded.load_seconds * 1000, 1),
                },
            )
    default = source.config.default_version
    if default not in versions:
        if default is not None:
            logger.warning(
                "model %s: default_version %s is not loaded; using the highest",
                source.name,
                default,
            )
        default = max(versions) if versions else None
    aliases = {a: v for a, v in source.config.aliases.items() if v in source.versions}
    return ModelEntry(
        source.name, versions, failures, default, aliases, source.config_error, source.fingerprint
    )


def load_registry(root: Path, options: LoadOptions) -> Registry:
    sources = scan_repository(root, options.model_name)
    return Registry({name: load_model(src, options) for name, src in sources.items()})


def reload_model(registry: Registry, root: Path, name: str, options: LoadOptions) -> Registry:
    return registry.with_entry(load_model(scan_model(root, name, options.model_name), options))
