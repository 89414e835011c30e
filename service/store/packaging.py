"""Adds an artifact to a repository with its metadata.json (signature, sha256, versions)."""

import hashlib
import shutil
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.errors import InvalidInput, ServiceError
from service.store.metadata import ArtifactMetadata, Task
from service.store.repository import ARTIFACT_NAMES, model_dir, parse_version
from service.store.runtimes import RUNTIME_MODULES, Signature, runtime_module
from service.store.tensors import TensorSpec


@dataclass(frozen=True)
class Packaged:
    """Where a version was written, and what the packager chose on the user's behalf."""

    folder: Path
    notes: list[str] = field(default_factory=list)


def next_version(folder: Path) -> int:
    numbers = [parse_version(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    return max([n for n in numbers if n is not None], default=0) + 1


def package_artifact(
    source: Path,
    root: Path,
    name: str,
    version: int | None = None,
    *,
    features: list[str] | None = None,
    task: Task | None = None,
    training: dict[str, Any] | None = None,
    replace: bool = False,
    allow_nan: bool = False,
    allow_signature_change: bool = False,
) -> Packaged:
    """Copy `source` into root/name/version/ and write its metadata."""
    if source.suffix not in RUNTIME_MODULES:
        raise InvalidInput(
            f"{source}: unsupported artifact; use one of {', '.join(RUNTIME_MODULES)}"
        )
    if not source.is_file():
        raise InvalidInput(f"{source}: no such file")
    folder = model_dir(root, name)
    number = version if version is not None else next_version(folder)
    if number < 1:
        raise InvalidInput("versions are positive integers")
    target = folder / str(number)
    if target.exists() and not replace:
        raise InvalidInput(f"{target} exists; choose another --version")
    data = source.read_bytes()
    module = runtime_module(source)
    signature = _with_task(_describe(source, data), task, source)
    others = read_other_versions(folder, number)
    if not allow_signature_change:
        check_agreement(source, signature.inputs, others)
    names, notes = feature_names(source, signature, features, others)
    metadata = ArtifactMetadata(
        name=name,
        version=number,
        artifact=next(n for n in ARTIFACT_NAMES if n.endswith(source.suffix)),
        sha256=hashlib.sha256(data).hexdigest(),
        task=signature.task,
        inputs=signature.inputs,
        outputs=signature.outputs,
        features=names,
        classes=signature.classes,
        framework=module.framework_versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training=training or {},
        allow_nan=allow_nan,
    )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(source, target / metadata.artifact)
    metadata.write(target / "metadata.json")
    return Packaged(target, notes)


def _describe(source: Path, data: bytes) -> Signature:
    """The artifact's signature; the one place where reading a user's artifact may fail."""
    try:
        exported = None
        if source.suffix == ".onnx":
            from service.store.onnx_exports import describe_export

            exported = describe_export(data)
        # Described even when recognised: it proves that the runtime can load the artifact.
        signature = runtime_module(source).describe(data)
    except ServiceError:
        raise
    except ImportError as exc:
        raise InvalidInput(
            f"{source} needs code that cannot be imported here ({exc}); install the package "
            "that defines the model, or make its module importable"
        ) from exc
    except Exception as exc:  # unpickling and protobuf parsing raise many unrelated types
        cause = f"{type(exc).__name__}: {exc}"
        if source.suffix == ".onnx":
            raise InvalidInput(
                f"{source} cannot be read as an ONNX graph ({cause}); is it complete, and "
                "written with model.SerializeToString()?"
            ) from exc
        raise InvalidInput(
            f"{source} cannot be read as a joblib or pickle file ({cause}); is it complete, and "
            "written with joblib.dump or pickle.dump?"
        ) from exc
    return exported or signature


def _with_task(signature: Signature, task: Task | None, source: Path) -> Signature:
    if task is None or task == signature.task:
        return signature
    if signature.task != "other":
        raise InvalidInput(
            f"{source} is a {signature.task} model; drop --task {task} "
            "(it is for ONNX graphs whose task cannot be recognised)"
        )
    outputs = signature.outputs
    if task == "regression" and len(outputs) == 1:
        # One row in, one value out: the canonical regressor tensor, whatever the export named it.
        outputs = [TensorSpec(name="prediction", datatype=outputs[0].datatype, shape=[-1])]
    return replace(signature, task=task, outputs=outputs)


def read_other_versions(folder: Path, number: int) -> dict[int, ArtifactMetadata]:
    """The metadata of the model's versions other than `number`, newest first."""
    found: dict[int, ArtifactMetadata] = {}
    versions = [(parse_version(p.name), p) for p in folder.iterdir()] if folder.is_dir() else []
    for other, path in sorted(((v, p) for v, p in versions if v), reverse=True):
        if other == number:
            continue
        try:
            found[other] = ArtifactMetadata.read(path / "metadata.json")
        except (ValidationError, OSError, UnicodeDecodeError):
            continue  # a version without readable metadata does not load, so no client uses it
    return found


def check_agreement(
    source: Path, inputs: list[TensorSpec], others: dict[int, ArtifactMetadata]
) -> None:
    """Refuse inputs that differ from another version's: the default version or an alias
    would switch its clients to a signature they do not send."""
    for number, other in others.items():
        if _agree(inputs, other.inputs):
            continue
        fixes = []
        if [i.name for i in inputs] != [i.name for i in other.inputs]:
            names = ", ".join(repr(i.name) for i in other.inputs)
            fixes.append(f"export it with its input named {names}")
        widths = [_width(i) for i in other.inputs]
        if [_width(i) for i in inputs] != widths:
            count = f"{widths[0]} " if len(widths) == 1 and widths[0] >= 0 else ""
            fixes.append(f"train it on the same {count}features as version {number}")
        raise InvalidInput(
            f"{source} takes {_inputs_text(inputs)}, but version {number} takes "
            f"{_inputs_text(other.inputs)}; clients of the default version or an alias would "
            f"break. Make them agree ({'; '.join(fixes)}), package it under another --name, or "
            "pass --allow-signature-change"
        )


def _agree(inputs: list[TensorSpec], others: list[TensorSpec]) -> bool:
    return len(inputs) == len(others) and all(
        a.name == b.name and (-1 in (_width(a), _width(b)) or _width(a) == _width(b))
        for a, b in zip(inputs, others, strict=True)
    )


def _width(spec: TensorSpec) -> int:
    """Features per row of a [rows, features] input; -1 if any or not a table."""
    return spec.shape[1] if len(spec.shape) == 2 else -1


def _inputs_text(inputs: list[TensorSpec]) -> str:
    return ", ".join(
        f"input {s.name!r} of {s.shape[-1]} features"
        if len(s.shape) == 2 and s.shape[-1] >= 0
        else f"input {s.name!r} of shape {s.shape}"
        for s in inputs
    )


def feature_names(
    source: Path,
    signature: Signature,
    given: list[str] | None,
    others: dict[int, ArtifactMetadata],
) -> tuple[list[str], list[str]]:
    """The feature names to write, and a note when neither the user nor the artifact gave them.

    ONNX graphs and models fitted on arrays carry none: they come from another version of the
    same width (so V1 rows keyed by name and CSV columns keep working across versions), else
    they are generated as scikit-learn names unnamed columns."""
    width = _width(signature.inputs[0]) if len(signature.inputs) == 1 else -1
    if given is not None:
        if width not in (-1, len(given)):
            raise InvalidInput(f"{len(given)} feature names for a model of {width} features")
        return given, []
    generated = [f"x{i}" for i in range(width)]
    if width < 1 or signature.features not in ([], generated):
        return signature.features, []
    for number, other in others.items():
        if len(other.features) == width and other.features != generated:
            return other.features, [
                f"{source.name} carries no feature names; using those of version {number}"
            ]
    span = f"x0…x{width - 1}" if width > 1 else "x0"
    return generated, [
        f"{source.name} carries no feature names; named them {span} (pass --features to name them)"
    ]
