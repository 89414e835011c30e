"""What is loaded: model versions, default versions and aliases; replaced whole on reload."""

import hashlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from service.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady
from service.store.labels import ClassLabels
from service.store.metadata import ArtifactMetadata
from service.store.profiles import Profile, read_profile
from service.store.repository import (
    Fingerprint,
    ModelConfig,
    ModelSource,
    ShadowConfig,
    Stamp,
    fingerprint,
    parse_version,
    read_verified,
    scan_model,
    scan_repository,
)
from service.store.routing import pick_version, split_point
from service.store.runtimes import Arrays, Runtime, RuntimeOptions, Signature, runtime_module
from service.store.signing import SIGNATURE_FAILURES, TrustedKeys

logger = logging.getLogger(__name__)
# The admin actions' log (service/server/audit.py); named here, as the store sits below it.
audit_logger = logging.getLogger("service.audit")


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
    # The training distribution live drift is measured against; None: no drift for it.
    profile: Profile | None = None
    # The version folder as loaded: a reload keeps this object (and its batcher) while it holds.
    fingerprint: Fingerprint = ()

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
    def allow_nan(self) -> bool:
        """Whether the model takes missing and infinite values (its metadata says so)."""
        return self.metadata is not None and self.metadata.allow_nan

    @cached_property
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
    # The version unversioned requests get; None when no version can take them (see `unready`).
    default_version: int | None
    aliases: Mapping[str, int]
    config_error: str | None = None
    # What the model folder looked like when loaded; polling reloads when it changes.
    fingerprint: Fingerprint = ()
    # Version -> weight of unversioned requests (only loaded versions); empty: the default.
    traffic: Mapping[int, float] = field(default_factory=dict)
    shadow: ShadowConfig | None = None
    config: ModelConfig = field(default_factory=ModelConfig)
    # Which state of model.toml this entry applies; the routing sync reloads when it changes.
    stamp: Stamp | None = None
    # Versions still served from their previous artifact because the new one did not load.
    stale: Mapping[int, VersionFailure] = field(default_factory=dict)
    # Why unversioned requests cannot be served: no versions, a pinned default_version that is
    # not loaded, or no version that loaded.
    unready: str | None = None

    @property
    def ready(self) -> bool:
        return self.default_version is not None

    def pick(self, routing_key: str | None) -> int | None:
        """The version an unversioned request goes to: the traffic split, else the default."""
        if not self.traffic:
            return self.default_version
        point = random.random() if routing_key is None else split_point(routing_key)
        return pick_version(self.traffic, point)


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

    def resolve(
        self, name: str, version: str | None = None, routing_key: str | None = None
    ) -> ModelVersion:
        """The version a request names: a number, an alias, or (none) the split or default.

        Explicit versions and aliases bypass a traffic split; a routing key always lands on
        the same version of a split.
        """
        entry = self.model(name)
        if version is None or version == "":
            picked = entry.pick(routing_key)
            if picked is None:
                raise ModelNotReady(f"model {name!r} is not ready: {entry.unready}")
            return entry.versions[picked]
        number = parse_version(version)
        if number is None:
            number = entry.aliases.get(version)
        if number is None:
            named = entry.config.aliases.get(version)
            if named is not None:  # in model.toml, on a version that did not load or is left out
                raise ModelNotFound(
                    f"model {name!r}: alias {version!r} names version {named}, which does not serve"
                )
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

    def forget(self, name: str) -> "Registry":
        """The registry without any trace of `name`, whose folder left the repository."""
        models = {k: v for k, v in self.models.items() if k != name}
        return Registry(models, self.unloaded - {name})

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


def warm_up(runtime: Runtime) -> None:
    """Predictions before the version takes traffic: one row three times, then a batch.

    The first calls of a session allocate and pick kernels; a request should not pay for them.
    """
    signature = runtime.signature
    single = smoke_inputs(signature)
    for _ in range(3):
        runtime.predict(single)
    if all(spec.shape and spec.shape[0] == -1 for spec in signature.inputs):
        runtime.predict({name: np.repeat(array, 64, axis=0) for name, array in single.items()})


def load_version(
    name: str, version: int, folder: Path, options: LoadOptions, batching: tuple[int, float]
) -> ModelVersion:
    started = time.perf_counter()
    # Taken first, so a file changed during the load makes the next scan load it again.
    before = fingerprint(folder)
    artifact = read_verified(folder, options.allow_unverified_pickle, options.trusted_keys)
    metadata = artifact.metadata
    module = runtime_module(artifact.path)
    runtime = module.load(artifact.data, metadata, replace(options.runtime, model=(name, version)))
    try:
        warm_up(runtime)
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
    profile = None
    if metadata is not None:
        try:
            profile = read_profile(folder, metadata)
        except InvalidInput as exc:  # the model still serves; only its drift is unknown
            warnings.append(f"reference profile not used: {exc.message}")
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
        profile=profile,
        fingerprint=before,
    )


def _load_logged(
    source: ModelSource, number: int, options: LoadOptions, batching: tuple[int, float]
) -> ModelVersion | VersionFailure:
    """One version loaded, or why not; the loader boundary: nothing here stops the server."""
    try:
        loaded = load_version(source.name, number, source.versions[number], options, batching)
    except ModelLoadError as exc:
        logger.error(
            "model %s version %s not loaded (%s): %s",
            source.name,
            number,
            exc.reason,
            exc.message,
            extra={"model": source.name, "version": number, "reason": exc.reason},
        )
        if exc.reason in SIGNATURE_FAILURES:
            # Someone may have tampered with the repository: an audit line too (the store knows
            # no requests, so no one is named; an API load has its own line with its caller).
            audit_logger.warning(
                "audit: signature check of %s version %s failed: %s",
                source.name,
                number,
                exc.reason,
                extra={
                    "who": "loader",
                    "action": "signature_check",
                    "model": source.name,
                    "version": number,
                    "result": f"{exc.reason}: {exc.message}",
                },
            )
        return VersionFailure(number, exc.reason, exc.message)
    except Exception as exc:  # a broken artifact must not stop the server
        logger.exception(
            "model %s version %s not loaded",
            source.name,
            number,
            extra={"model": source.name, "version": number, "reason": "corrupt_artifact"},
        )
        return VersionFailure(number, "corrupt_artifact", f"{type(exc).__name__}: {exc}")
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
    return loaded


def _unchanged(old: ModelVersion | None, folder: Path, batching: tuple[int, float]) -> bool:
    return (
        old is not None
        and (old.max_batch_rows, old.max_delay_ms) == batching
        and old.fingerprint == fingerprint(folder)
    )


def load_model(
    source: ModelSource, options: LoadOptions, previous: ModelEntry | None = None
) -> ModelEntry:
    """The model as its folder says, keeping every version of `previous` that did not change.

    A kept version is the same object, so its batcher and the requests queued in it carry on.
    A changed version whose new artifact fails to load keeps serving the old one (reported as
    stale), so a bad or half-copied file never takes a serving version down.
    """
    cfg = source.config.batching
    batching = (
        options.batching_max_rows if cfg.max_batch_rows is None else cfg.max_batch_rows,
        options.batching_max_delay_ms if cfg.max_delay_ms is None else cfg.max_delay_ms,
    )
    versions: dict[int, ModelVersion] = {}
    failures: dict[int, VersionFailure] = {}
    stale: dict[int, VersionFailure] = {}
    for number, folder in sorted(source.versions.items()):
        old = previous.versions.get(number) if previous is not None else None
        if old is not None and _unchanged(old, folder, batching):
            versions[number] = old
            continue
        result = _load_logged(source, number, options, batching)
        if isinstance(result, ModelVersion):
            versions[number] = result
        elif old is not None:
            logger.warning(
                "model %s version %s keeps serving its previous artifact", source.name, number
            )
            versions[number] = old
            stale[number] = result
        else:
            failures[number] = result
    default, unready = default_version(source, versions, failures)
    if unready is not None:
        logger.warning(
            "model %s is not ready: %s", source.name, unready, extra={"model": source.name}
        )
    aliases = {a: v for a, v in source.config.aliases.items() if v in source.versions}
    traffic = {v: w for v, w in source.config.traffic.items() if v in versions and w > 0}
    if source.config.traffic and not traffic:
        logger.warning("model %s: no version of the traffic split is loaded", source.name)
    return ModelEntry(
        source.name,
        versions,
        failures,
        default,
        aliases,
        source.config_error,
        source.fingerprint,
        traffic=traffic,
        shadow=source.config.shadow,
        config=source.config,
        stamp=source.stamp,
        stale=stale,
        unready=unready,
    )


def default_version(
    source: ModelSource, versions: Mapping[int, object], failures: Mapping[int, VersionFailure]
) -> tuple[int | None, str | None]:
    """The version unversioned requests get, or None and why there is none.

    A default_version pinned in model.toml is the default or nothing: falling back to another
    version would switch clients to a model (and maybe a signature) they did not ask for.
    Without a pin, the highest loaded version is the default.
    """
    pinned = source.config.default_version
    if pinned is not None:
        if pinned in versions:
            return pinned, None
        failure = failures.get(pinned)
        why = f"{failure.reason}: {failure.message}" if failure else source.absence(pinned)
        return None, (
            f"default version {pinned} (pinned by default_version in model.toml) is not loaded "
            f"({why}); request a version explicitly, or fix version {pinned} or the pin"
        )
    if versions:
        return max(versions), None
    if failures:
        reasons = "; ".join(f"version {v}: {f.reason}" for v, f in sorted(failures.items()))
        return None, f"no version loaded ({reasons})"
    if source.unselected:
        return None, "no versions (the version policy in model.toml selects none of its folders)"
    return (
        None,
        "no versions (the model folder holds no version folder; add one with `modelserve package`)",
    )


def load_registry(root: Path, options: LoadOptions) -> Registry:
    sources = scan_repository(root, options.model_name)
    unloaded = frozenset(name for name, src in sources.items() if src.config.unloaded)
    models = {n: load_model(src, options) for n, src in sources.items() if n not in unloaded}
    return Registry(models, unloaded)


def reload_model(registry: Registry, root: Path, name: str, options: LoadOptions) -> Registry:
    """The registry with `name` as its folder says now (unloaded if model.toml says so)."""
    source = scan_model(root, name, options.model_name)
    if source.config.unloaded:
        models = {k: v for k, v in registry.models.items() if k != name}
        return Registry(models, registry.unloaded | {name})
    return registry.with_entry(load_model(source, options, registry.models.get(name)))
