"""The repository layouts: model folders, and the single model that KServe mounts at /mnt/models."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.config import Settings
from service.errors import ModelLoadError, ModelNotFound
from service.store.registry import LoadOptions, Registry, load_registry, reload_model
from service.store.repository import scan_repository

SETOSA = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)


def label_of(registry: Registry, name: str, version: str | None = None) -> str:
    outputs = registry.resolve(name, version).runtime.predict({"input": SETOSA}).outputs
    return str(outputs["label"][0])


def test_a_repository_of_model_folders_serves_every_model(repository: Path) -> None:
    registry = load_registry(repository, LoadOptions())
    assert sorted(registry.models) == ["breast_cancer", "diabetes", "iris"]
    assert label_of(registry, "iris") == "setosa"


def test_a_model_folder_is_served_under_the_configured_name(repository: Path) -> None:
    registry = load_registry(repository / "iris", LoadOptions(model_name="flowers"))
    assert list(registry.models) == ["flowers"]
    entry = registry.model("flowers")
    # model.toml in the mounted folder still applies: default version and aliases.
    assert sorted(entry.versions) == [1, 2]
    assert entry.default_version == 2
    assert dict(entry.aliases) == {"stable": 1, "production": 2}
    assert label_of(registry, "flowers") == "setosa"
    assert label_of(registry, "flowers", "stable") == "setosa"


@pytest.mark.parametrize(("version", "fmt"), [(1, "sklearn"), (2, "onnx")])
def test_a_version_folder_is_served_as_the_version_its_metadata_names(
    repository: Path, version: int, fmt: str
) -> None:
    registry = load_registry(repository / "iris" / str(version), LoadOptions(model_name="iris"))
    entry = registry.model("iris")
    assert list(entry.versions) == [version]
    assert entry.versions[version].format == fmt
    assert label_of(registry, "iris") == "setosa"


def test_a_version_folder_without_metadata_is_version_one(repository: Path) -> None:
    folder = repository / "iris" / "2"
    (folder / "metadata.json").unlink()
    registry = load_registry(folder, LoadOptions(model_name="iris"))
    assert list(registry.model("iris").versions) == [1]
    assert label_of(registry, "iris") == "setosa"


def test_an_unverified_pickle_in_a_version_folder_is_still_refused(repository: Path) -> None:
    folder = repository / "iris" / "1"
    (folder / "metadata.json").unlink()
    entry = load_registry(folder, LoadOptions(model_name="iris")).model("iris")
    assert not entry.versions
    assert entry.failures[1].reason == "unverified_pickle"


def test_an_artifact_beside_version_folders_is_refused(repository: Path) -> None:
    shutil.copy(repository / "iris" / "2" / "model.onnx", repository / "iris" / "model.onnx")
    with pytest.raises(ModelLoadError, match="keep one layout") as caught:
        scan_repository(repository / "iris", "iris")
    assert caught.value.reason == "ambiguous_layout"


def test_a_symlinked_version_folder_is_not_followed(repository: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(repository / "iris" / "2", outside)
    (repository / "iris" / "3").symlink_to(outside, target_is_directory=True)
    source = scan_repository(repository / "iris", "iris")["iris"]
    assert sorted(source.versions) == [1, 2]
    assert "3" in source.ignored


def test_an_empty_folder_serves_a_model_that_is_not_ready(tmp_path: Path) -> None:
    entry = load_registry(tmp_path, LoadOptions(model_name="iris")).model("iris")
    assert not entry.versions
    assert not entry.ready


def test_only_the_configured_model_can_be_reloaded(repository: Path) -> None:
    options = LoadOptions(model_name="flowers")
    registry = load_registry(repository / "iris", options)
    reloaded = reload_model(registry, repository / "iris", "flowers", options)
    assert sorted(reloaded.model("flowers").versions) == [1, 2]
    for other in ("iris", "1", "../iris"):
        with pytest.raises(ModelNotFound):
            reload_model(registry, repository / "iris", other, options)


@pytest.mark.parametrize("name", ["../iris", ".hidden", "a/b", "", "x" * 65])
def test_a_model_name_that_could_leave_the_folder_is_refused(repository: Path, name: str) -> None:
    with pytest.raises(ValidationError, match="model name"):
        Settings(model_name=name)
    with pytest.raises(ModelLoadError, match="not valid"):
        scan_repository(repository / "iris", name)


def test_a_single_model_without_a_name_gets_a_hint(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert scan_repository(repository / "iris" / "2") == {}
    assert "MODELSERVE_MODEL_NAME" in caplog.text
