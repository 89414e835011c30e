"""The tests' example repository holds the bundled examples only, whatever else `models/` holds."""

import shutil
from pathlib import Path

import joblib
from sklearn.linear_model import LogisticRegression

from service.store.packaging import package_artifact
from service.store.registry import LoadOptions, load_registry
from tests.conftest import ROOT, example_repository
from training.examples import EXAMPLES


def test_a_users_own_model_in_the_source_repository_is_left_out(tmp_path: Path) -> None:
    source = tmp_path / "clone" / "models"
    shutil.copytree(
        ROOT / "models" / "iris", source / "iris", ignore=shutil.ignore_patterns("[0-9]*")
    )
    # A model of the user's beside the example, packaged as `modelserve package` does it.
    artifact = tmp_path / "mine.joblib"
    joblib.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), artifact)
    package_artifact(artifact, source, "mymodel", 1, features=["x"], task="classification")
    (source / "mymodel" / "model.toml").write_text("default_version = 1\n")
    iris = [e for e in EXAMPLES if e.name == "iris"]  # one example keeps this test fast
    target = example_repository(source, tmp_path / "models", iris)
    assert sorted(p.name for p in target.iterdir()) == ["iris"]
    registry = load_registry(target, LoadOptions())
    assert sorted(registry.models) == ["iris"]
    assert sorted(registry.model("iris").versions) == [1, 2]
