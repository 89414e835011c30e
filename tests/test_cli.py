"""`modelserve package` and `modelserve validate`, run as a user runs them."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import LogisticRegression

from service.store.registry import LoadOptions, load_registry
from tests.conftest import ROOT, copy_examples
from tests.damage import truncate
from tests.serving import run_server

# Each test runs the command line as a process of its own.
pytestmark = pytest.mark.e2e


def modelserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_package_infers_signature_and_picks_the_next_version(tmp_path: Path) -> None:
    bunch = load_wine()
    model = LogisticRegression(max_iter=5000).fit(bunch.data, bunch.target)
    artifact = tmp_path / "wine.joblib"
    joblib.dump(model, artifact)
    root = tmp_path / "models"
    for expected in ("1", "2"):
        result = modelserve(
            "package", str(artifact), "--name", "wine", "--model-repository", str(root)
        )
        assert result.returncode == 0, result.stderr
        assert (root / "wine" / expected / "model.joblib").is_file()
    metadata = json.loads((root / "wine" / "2" / "metadata.json").read_text())
    assert metadata["features"] == [f"x{i}" for i in range(13)]  # no names in a numpy fit
    assert metadata["classes"] == [0, 1, 2]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 13]}]
    assert metadata["framework"]["scikit-learn"]
    served = load_registry(root, LoadOptions()).resolve("wine")
    rows = bunch.data.astype(np.float32)[:5]
    np.testing.assert_array_equal(
        served.runtime.predict({"input": rows}).outputs["label"], model.predict(rows)
    )


def test_package_a_regressor_with_feature_names(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 3))
    artifact = tmp_path / "reg.pkl"
    joblib.dump(GradientBoostingRegressor(n_estimators=5).fit(x, x.sum(axis=1)), artifact)
    result = modelserve(
        "package",
        str(artifact),
        "--name",
        "reg",
        "--version",
        "7",
        "--features",
        "a,b,c",
        "--model-repository",
        str(tmp_path / "m"),
    )
    assert result.returncode == 0, result.stderr
    metadata = json.loads((tmp_path / "m" / "reg" / "7" / "metadata.json").read_text())
    assert (metadata["task"], metadata["features"]) == ("regression", ["a", "b", "c"])
    assert metadata["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1]}]


def test_package_refuses_bad_names_and_existing_versions(tmp_path: Path) -> None:
    artifact = tmp_path / "m.joblib"
    joblib.dump(LogisticRegression().fit([[0], [1]], [0, 1]), artifact)
    bad = modelserve(
        "package", str(artifact), "--name", "../evil", "--model-repository", str(tmp_path / "m")
    )
    assert bad.returncode == 1
    assert "not valid" in bad.stderr
    assert not (tmp_path / "evil").exists()
    args = (
        "package",
        str(artifact),
        "--name",
        "ok",
        "--version",
        "1",
        "--model-repository",
        str(tmp_path / "m"),
    )
    assert modelserve(*args).returncode == 0
    again = modelserve(*args)
    assert again.returncode == 1
    assert "exists" in again.stderr


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (lambda path: None, "no such file"),
        (lambda path: path.write_bytes(b"not a pickle\n"), "cannot be read as a joblib"),
        (lambda path: path.write_bytes(b""), "cannot be read as a joblib"),
        # A pickle of a class from a package this machine does not have.
        (
            lambda path: path.write_bytes(b"cnot_installed_here\nModel\n(tR."),
            "needs code that cannot be imported here (No module named 'not_installed_here')",
        ),
    ],
    ids=["missing", "corrupt", "empty", "unimportable"],
)
def test_package_failures_are_one_error_line(
    tmp_path: Path, make: Callable[[Path], object], cause: str
) -> None:
    artifact = tmp_path / "model.joblib"
    make(artifact)
    result = modelserve(
        "package", str(artifact), "--name", "m", "--model-repository", str(tmp_path)
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {artifact}")
    assert cause in line
    assert not (tmp_path / "m").exists()


def test_package_of_a_truncated_joblib_names_the_file(tmp_path: Path) -> None:
    artifact = tmp_path / "model.joblib"
    joblib.dump(LogisticRegression(max_iter=5000).fit(*load_wine(return_X_y=True)), artifact)
    truncate(artifact)
    result = modelserve(
        "package", str(artifact), "--name", "m", "--model-repository", str(tmp_path)
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {artifact} cannot be read as a joblib or pickle file (")
    assert line.endswith("; is it complete, and written with joblib.dump or pickle.dump?")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("package", "m.joblib"),
            "error: the following arguments are required: --name (see `modelserve package --help`)",
        ),
        (
            ("package", "m.joblib", "--name", "m", "--version", "0"),
            "error: argument --version: must be a positive whole number "
            "(see `modelserve package --help`)",
        ),
    ],
    ids=["no-name", "version-0"],
)
def test_package_usage_errors_are_one_line_and_exit_2(args: tuple[str, ...], line: str) -> None:
    result = modelserve(*args)
    assert (result.returncode, result.stderr.splitlines()) == (2, [line])


def test_validate_passes_on_a_good_repository(repository: Path) -> None:
    result = modelserve("validate", "--model-repository", str(repository))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 6


def test_validate_fails_on_a_broken_version(repository: Path) -> None:
    truncate(repository / "diabetes" / "2" / "model.onnx")
    result = modelserve("validate", "--model-repository", str(repository))
    assert result.returncode == 1
    assert "FAIL  diabetes:2 hash_mismatch" in result.stdout


def test_serve_trains_missing_example_models(tmp_path: Path) -> None:
    # What a fresh clone's models/ holds: the marker and the examples' model.toml files.
    root = tmp_path / "models"
    copy_examples(ROOT / "models", root)
    shutil.copy(ROOT / "models" / ".examples", root / ".examples")
    with run_server(root, tmp_path) as server:
        answer = httpx.post(
            f"{server.url}/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}
        ).json()
    assert answer["predictions"] == ["setosa"]
    assert (root / "breast_cancer" / "2" / "model.onnx").is_file()
