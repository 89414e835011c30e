"""What models warn reaches the log once per version, never raw on stderr: models fitted on
pandas DataFrames answer without scikit-learn's feature-name warning, and a model that warns
on every call is logged once per version, in the JSON-lines log."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.store.packaging import package_artifact
from tests.conftest import ROOT
from tests.models_for_faults import WarningClassifier
from tests.serving import RunningServer, run_server

# Servers and the command line run as processes of their own.
pytestmark = pytest.mark.e2e

IRIS = load_iris(as_frame=True)
FRAME: pd.DataFrame = IRIS.data
COLUMNS = [str(c) for c in FRAME.columns]


def _frame_models() -> dict[str, Any]:
    """Fitted on a DataFrame: a Pipeline, a forest, and a Pipeline whose ColumnTransformer
    selects columns by name (which only a DataFrame can serve)."""
    by_name = ColumnTransformer(
        [("scaled", StandardScaler(), COLUMNS[:2])], remainder="passthrough"
    )
    models = {
        "frame_pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "frame_forest": RandomForestClassifier(n_estimators=20, random_state=0),
        "frame_columns": make_pipeline(by_name, LogisticRegression(max_iter=1000)),
    }
    return {name: model.fit(FRAME, IRIS.target) for name, model in models.items()}


@pytest.fixture(scope="module")
def frame_models() -> dict[str, Any]:
    return _frame_models()


def _modelserve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **env},
    )


ENV = {"PYTHONPATH": str(ROOT), "MODELSERVE_LOG_FORMAT": "json"}


@pytest.fixture(scope="module")
def warning_repository(
    frame_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The DataFrame-fitted models packaged as a user would, beside a model that warns on
    every call in two versions."""
    work = tmp_path_factory.mktemp("warning-models")
    root = work / "models"
    for name, model in frame_models.items():
        artifact = work / f"{name}.joblib"
        joblib.dump(model, artifact)
        packaged = _modelserve(
            "package", str(artifact), "--name", name, "--model-repository", str(root), env=ENV
        )
        assert packaged.returncode == 0, packaged.stderr
    warner = WarningClassifier(LogisticRegression(max_iter=1000).fit(FRAME.to_numpy(), IRIS.target))
    joblib.dump(warner, work / "warner.joblib")
    for version in (1, 2):
        package_artifact(work / "warner.joblib", root, "warner", version, features=COLUMNS)
    return root


@pytest.fixture(scope="module")
def warning_server(
    warning_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with run_server(warning_repository, tmp_path_factory.mktemp("warning-logs"), env=ENV) as server:
        yield server


def _v2(rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    data = rows.astype(np.float32)
    return {
        "inputs": [
            {"name": "input", "shape": list(data.shape), "datatype": "FP32", "data": data.tolist()}
        ]
    }


def _log_records(server: RunningServer) -> list[dict[str, Any]]:
    """Every line of the server's output, each of which must be one JSON object."""
    lines = [line for line in server.output().splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, f"lines outside the JSON log: {not_json[:5]}"
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", ["frame_pipeline", "frame_forest", "frame_columns"])
def test_models_fitted_on_dataframes_answer_without_feature_name_warnings(
    warning_server: RunningServer, frame_models: dict[str, Any], name: str
) -> None:
    model = frame_models[name]
    rows = FRAME.to_numpy(dtype=np.float32)
    with httpx.Client(base_url=warning_server.url, timeout=30) as client:
        for start in range(0, 150, 5):
            batch = rows[start : start + (1 if start % 2 else 5)]
            answer = client.post(f"/v2/models/{name}/infer", json=_v2(batch))
            assert answer.status_code == 200, answer.text
            label = next(o for o in answer.json()["outputs"] if o["name"] == "label")
            expected = model.predict(pd.DataFrame(batch, columns=FRAME.columns))
            assert label["data"] == expected.tolist()
        keyed = [dict(zip(COLUMNS, row.tolist(), strict=True)) for row in rows[:3]]
        v1 = client.post(f"/v1/models/{name}:predict", json={"instances": keyed})
        assert v1.status_code == 200, v1.text
    assert "feature names" not in warning_server.output()
    _log_records(warning_server)


def test_a_model_warning_is_logged_once_per_version(warning_server: RunningServer) -> None:
    with httpx.Client(base_url=warning_server.url, timeout=30) as client:
        for i in range(40):
            for version in (1, 2):
                rows = FRAME.to_numpy()[: 1 + i % 4]
                answer = client.post(f"/v2/models/warner/versions/{version}/infer", json=_v2(rows))
                assert answer.status_code == 200, answer.text
    warned = [r for r in _log_records(warning_server) if r.get("category") == "ModelWarning"]
    assert sorted((r["model"], r["version"]) for r in warned) == [("warner", 1), ("warner", 2)]
    assert all("uncalibrated model" in r["message"] and r["level"] == "warning" for r in warned)
    assert all(r["source"].rsplit(":", 1)[0].endswith("models_for_faults.py") for r in warned)


def test_validate_logs_model_warnings_and_prints_no_raw_ones(warning_repository: Path) -> None:
    result = _modelserve(
        "validate",
        "--model-repository",
        str(warning_repository),
        env={**ENV, "MODELSERVE_LOG_FORMAT": "text"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "feature names" not in result.stderr
    assert "warnings.warn(" not in result.stderr  # how Python prints a warning raw
    warned = [line for line in result.stderr.splitlines() if "category=ModelWarning" in line]
    assert len(warned) == 2, result.stderr
    fields = [set(line.split()) for line in warned]
    assert all({"model=warner", f"version={v}"} <= f for f, v in zip(fields, (1, 2), strict=True))
