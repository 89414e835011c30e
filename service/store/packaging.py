"""Adds an artifact to a repository with its metadata.json (signature, sha256, versions)."""

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import InvalidInput
from service.store.metadata import ArtifactMetadata, Task
from service.store.repository import ARTIFACT_NAMES, model_dir, parse_version
from service.store.runtimes import RUNTIME_MODULES, runtime_module
from service.store.tensors import TensorSpec


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
) -> Path:
    """Copy `source` into root/name/version/ and write its metadata; returns the version folder."""
    if source.suffix not in RUNTIME_MODULES:
        raise InvalidInput(
            f"{source}: unsupported artifact; use one of {', '.join(RUNTIME_MODULES)}"
        )
    folder = model_dir(root, name)
    number = version if version is not None else next_version(folder)
    if number < 1:
        raise InvalidInput("versions are positive integers")
    target = folder / str(number)
    if target.exists() and not replace:
        raise InvalidInput(f"{target} exists; choose another --version")
    data = source.read_bytes()
    module = runtime_module(source)
    signature = module.describe(data)
    if features is not None:
        width = signature.inputs[0].shape[-1]
        if width not in (-1, len(features)):
            raise InvalidInput(f"{len(features)} feature names for a model of {width} features")
    artifact_name = next(n for n in ARTIFACT_NAMES if n.endswith(source.suffix))
    outputs = signature.outputs
    if task == "regression" and len(outputs) == 1:
        # One row in, one value out: the canonical regressor tensor, whatever the export named it.
        outputs = [TensorSpec(name="prediction", datatype=outputs[0].datatype, shape=[-1])]
    metadata = ArtifactMetadata(
        name=name,
        version=number,
        artifact=artifact_name,
        sha256=hashlib.sha256(data).hexdigest(),
        task=task or signature.task,
        inputs=signature.inputs,
        outputs=outputs,
        features=features or signature.features,
        classes=signature.classes,
        framework=module.framework_versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training=training or {},
    )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(source, target / artifact_name)
    metadata.write(target / "metadata.json")
    return target
