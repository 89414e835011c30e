"""Loading a repository: broken versions are skipped with a reason, everything else serves."""

from pathlib import Path

import pytest

from service.errors import ModelNotFound, ModelNotReady
from service.store.registry import LoadOptions, load_registry
from service.store.runtimes import RuntimeOptions
from tests.damage import rewrite_sha256, set_framework_version, truncate


def failure_reason(root: Path, name: str, version: int, options: LoadOptions | None = None) -> str:
    registry = load_registry(root, options or LoadOptions())
    entry = registry.model(name)
    assert version not in entry.versions
    return entry.failures[version].reason


def test_all_examples_load(repository: Path) -> None:
    registry = load_registry(repository, LoadOptions())
    assert sorted(registry.models) == ["breast_cancer", "diabetes", "iris"]
    for entry in registry.models.values():
        assert sorted(entry.versions) == [1, 2]
        assert not entry.failures


def test_changed_artifact_is_refused_before_unpickling(repository: Path) -> None:
    with (repository / "iris" / "1" / "model.joblib").open("ab") as artifact:
        artifact.write(b"tampered")
    assert failure_reason(repository, "iris", 1) == "hash_mismatch"


def test_truncated_pickle_with_matching_hash_fails_alone(repository: Path) -> None:
    truncate(repository / "iris" / "1" / "model.joblib")
    rewrite_sha256(repository / "iris" / "1")
    registry = load_registry(repository, LoadOptions())
    assert registry.model("iris").failures[1].reason == "corrupt_artifact"
    assert registry.resolve("iris", "2").version == 2
    with pytest.raises(ModelNotReady, match="version 1 is not ready"):
        registry.resolve("iris", "1")


def test_corrupt_onnx_graph(repository: Path) -> None:
    (repository / "breast_cancer" / "2" / "model.onnx").write_bytes(b"\x08\x07garbage")
    rewrite_sha256(repository / "breast_cancer" / "2")
    assert failure_reason(repository, "breast_cancer", 2) == "corrupt_artifact"


def test_missing_artifact(repository: Path) -> None:
    (repository / "diabetes" / "2" / "model.onnx").unlink()
    assert failure_reason(repository, "diabetes", 2) == "missing_artifact"


def test_pickle_without_metadata_needs_explicit_permission(repository: Path) -> None:
    (repository / "iris" / "1" / "metadata.json").unlink()
    assert failure_reason(repository, "iris", 1) == "unverified_pickle"
    allowed = load_registry(repository, LoadOptions(allow_unverified_pickle=True))
    model = allowed.resolve("iris", "1")
    assert model.signature.classes == ["setosa", "versicolor", "virginica"]
    assert any("unverified" in w for w in model.warnings)


def test_other_scikit_learn_version_warns_or_is_refused(repository: Path) -> None:
    set_framework_version(repository / "iris" / "1", "scikit-learn", "0.24.2")
    lenient = load_registry(repository, LoadOptions()).resolve("iris", "1")
    assert any("0.24.2" in w for w in lenient.warnings)
    strict = LoadOptions(runtime=RuntimeOptions(strict_versions=True))
    assert failure_reason(repository, "iris", 1, strict) == "version_mismatch"


def test_all_versions_broken_leaves_model_known_but_not_ready(repository: Path) -> None:
    for version in ("1", "2"):
        (repository / "diabetes" / version / "metadata.json").write_text("{}")
    registry = load_registry(repository, LoadOptions())
    assert not registry.model("diabetes").ready
    with pytest.raises(ModelNotReady):
        registry.resolve("diabetes")
    assert registry.resolve("iris").version == 2


def test_version_policy_and_default(repository: Path) -> None:
    (repository / "iris" / "model.toml").write_text("[version_policy]\nspecific = [1]\n")
    registry = load_registry(repository, LoadOptions())
    assert sorted(registry.model("iris").versions) == [1]
    assert registry.resolve("iris").version == 1
    with pytest.raises(ModelNotFound):
        registry.resolve("iris", "2")


def test_a_pinned_default_that_did_not_load_is_not_replaced(repository: Path) -> None:
    truncate(repository / "iris" / "2" / "model.onnx")  # iris pins default_version = 2
    registry = load_registry(repository, LoadOptions())
    assert not registry.model("iris").ready
    with pytest.raises(ModelNotReady, match=r"default version 2 .*hash_mismatch"):
        registry.resolve("iris")
    assert registry.resolve("iris", "1").version == 1


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ("default_version = 3\n", "there is no version folder 3"),
        ("default_version = 2\n[version_policy]\nspecific = [1]\n", "leaves version 2 out"),
    ],
)
def test_a_pinned_default_that_is_not_there_is_named(
    repository: Path, config: str, why: str
) -> None:
    (repository / "iris" / "model.toml").write_text(config)
    registry = load_registry(repository, LoadOptions())
    with pytest.raises(ModelNotReady, match=why):
        registry.resolve("iris")
    assert registry.resolve("iris", "1").version == 1


def test_a_model_without_versions_is_not_ready_for_that_reason(repository: Path) -> None:
    (repository / "empty").mkdir()
    (repository / "empty" / "model.toml").write_text("")
    entry = load_registry(repository, LoadOptions()).model("empty")
    assert not entry.ready
    assert entry.unready is not None
    assert entry.unready.startswith("no versions")


def test_latest_policy(repository: Path) -> None:
    (repository / "iris" / "model.toml").write_text("[version_policy]\nlatest = 1\n")
    assert sorted(load_registry(repository, LoadOptions()).model("iris").versions) == [2]


def test_an_alias_on_a_version_that_does_not_serve_says_so(repository: Path) -> None:
    """Not that the alias does not exist: it does, in model.toml, on a version left out."""
    config = "[version_policy]\nlatest = 1\n[aliases]\nstable = 1\n"
    (repository / "iris" / "model.toml").write_text(config)
    registry = load_registry(repository, LoadOptions())
    with pytest.raises(ModelNotFound, match="alias 'stable' names version 1, which does not serve"):
        registry.resolve("iris", "stable")
    with pytest.raises(ModelNotFound, match="has no version 'canary'"):
        registry.resolve("iris", "canary")


def test_invalid_model_toml_falls_back_to_defaults(repository: Path) -> None:
    (repository / "iris" / "model.toml").write_text("default_version = 'two'\n")
    entry = load_registry(repository, LoadOptions()).model("iris")
    assert entry.config_error is not None
    assert entry.default_version == 2


def test_unknown_model_and_version(repository: Path) -> None:
    registry = load_registry(repository, LoadOptions())
    with pytest.raises(ModelNotFound):
        registry.resolve("nope")
    with pytest.raises(ModelNotFound):
        registry.resolve("iris", "3")
    with pytest.raises(ModelNotFound):
        registry.resolve("iris", "unknown-alias")
    assert registry.resolve("iris", "production").version == 2
