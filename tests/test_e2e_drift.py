"""Drift against a real server: training rows show none, shifted features show, in /metrics and
in GET …/drift, for online inference and :score alike."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.prometheus import run_prometheus
from tests.scrape import scrape, total
from tests.serving import RunningServer, run_server, wait_for
from tests.test_profiles import IRIS_FEATURES, iris_training_rows

pytestmark = pytest.mark.e2e
SHIFTED = ("sepal_width", "petal_length")


@pytest.fixture(scope="module")
def drift_server(
    iris_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with run_server(iris_repository, tmp_path_factory.mktemp("drift")) as running:
        yield running


def infer(url: str, version: str, rows: np.ndarray) -> list[str]:
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }
    response = httpx.post(f"{url}/v2/models/iris/versions/{version}/infer", json=body)
    assert response.status_code == 200, response.text
    labels: list[str] = response.json()["outputs"][0]["data"]
    return labels


def drift(url: str, version: str) -> dict[str, object]:
    response = httpx.get(f"{url}/v2/models/iris/versions/{version}/drift")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def psi_of(url: str, version: str) -> dict[str, float]:
    samples = scrape(url)
    return {
        name: total(samples, "modelserve_feature_drift_psi", version=version, feature=name)
        for name in IRIS_FEATURES
    }


def test_training_rows_keep_every_psi_under_a_tenth(drift_server: RunningServer) -> None:
    rows = iris_training_rows()
    for start in range(0, len(rows), 16):
        infer(drift_server.url, "1", rows[start : start + 16])
    psi = psi_of(drift_server.url, "1")
    assert all(value < 0.1 for value in psi.values()), psi
    samples = scrape(drift_server.url)
    assert total(samples, "modelserve_prediction_drift_psi", model="iris", version="1") < 0.1
    assert total(samples, "modelserve_feature_out_of_range_total", version="1") == 0


def test_shifting_two_features_raises_exactly_those(drift_server: RunningServer) -> None:
    rows = iris_training_rows()
    shifted = rows.copy()
    for name in SHIFTED:
        shifted[:, IRIS_FEATURES.index(name)] += 3.0
    infer(drift_server.url, "2", shifted)
    psi = psi_of(drift_server.url, "2")
    for name, value in psi.items():
        assert (value > 0.25) if name in SHIFTED else (value < 0.1), (name, psi)
    samples = scrape(drift_server.url)
    for name in IRIS_FEATURES:
        column = IRIS_FEATURES.index(name)
        beyond = int((shifted[:, column] > rows[:, column].max()).sum())
        counted = total(samples, "modelserve_feature_out_of_range_total", version="2", feature=name)
        assert counted == beyond, name
        assert (beyond > 0) == (name in SHIFTED), name


def test_the_drift_endpoint_gives_each_features_bins_and_shares(
    drift_server: RunningServer,
) -> None:
    infer(drift_server.url, "2", iris_training_rows()[:8])  # the window has rows, whatever ran
    body = drift(drift_server.url, "2")
    assert body["name"] == "iris"
    assert body["version"] == "2"
    assert body["window_limit"] == 10_000
    assert body["reference_rows"] == 112
    features = body["features"]
    assert isinstance(features, list)
    assert [f["name"] for f in features] == IRIS_FEATURES
    for feature in features:
        assert len(feature["reference_shares"]) == len(feature["edges"]) + 1
        assert len(feature["live_shares"]) == len(feature["reference_shares"])
        assert sum(feature["live_shares"]) == pytest.approx(1.0)
        assert isinstance(feature["psi"], float)
        assert {"out_of_range", "missing", "reference_min", "reference_max"} <= feature.keys()
    prediction = body["prediction"]
    assert isinstance(prediction, dict)
    assert prediction["classes"] == ["setosa", "versicolor", "virginica"]


def test_a_single_row_is_answered_and_counted(drift_server: RunningServer) -> None:
    before = drift(drift_server.url, "1")["window_rows"]
    assert isinstance(before, int)
    row = iris_training_rows()[:1]
    assert infer(drift_server.url, "1", row) in (["setosa"], ["versicolor"], ["virginica"])
    assert drift(drift_server.url, "1")["window_rows"] == before + 1


def test_scored_rows_count_too(drift_server: RunningServer) -> None:
    before = drift(drift_server.url, "1")["window_rows"]
    assert isinstance(before, int)
    rows = iris_training_rows()[:50]
    csv = ",".join(IRIS_FEATURES) + "\n" + "\n".join(",".join(map(str, r)) for r in rows.tolist())
    response = httpx.post(
        f"{drift_server.url}/v1/models/iris/versions/1:score",
        content=csv.encode(),
        headers={"content-type": "text/csv"},
    )
    assert response.status_code == 200, response.text
    assert drift(drift_server.url, "1")["window_rows"] == before + 50


def test_a_version_without_a_profile_is_a_404_that_names_the_command(
    iris_repository: Path, tmp_path: Path
) -> None:
    import shutil

    from service.store.metadata import ArtifactMetadata

    shutil.copytree(iris_repository, tmp_path / "models")
    metadata_path = tmp_path / "models" / "iris" / "1" / "metadata.json"
    metadata = ArtifactMetadata.read(metadata_path)
    metadata.model_copy(update={"profile": None}).write(metadata_path)
    with run_server(tmp_path / "models", tmp_path) as running:
        response = httpx.get(f"{running.url}/v2/models/iris/versions/1/drift")
    assert response.status_code == 404
    assert "no reference profile" in response.json()["error"]
    assert "modelserve profile iris:1 --data FILE" in response.json()["error"]


def test_two_workers_each_report_drift_and_count_every_value(
    iris_repository: Path, tmp_path: Path
) -> None:
    rows = iris_training_rows()
    shifted = rows.copy()
    shifted[:, IRIS_FEATURES.index("petal_length")] += 3.0
    with run_server(iris_repository, tmp_path, args=("--workers", "2")) as running:
        wait_for(lambda: running.output().count("Application startup complete") >= 2)

        # Every request holds all the rows, so each worker's window has the training
        # distribution (shifted), however the requests are spread; a fresh connection each.
        outside = shifted[shifted[:, 2] > rows[:, 2].max()]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: infer(running.url, "1", shifted), range(10)))
            # Single rows wait in a worker's buffer: counted within a second even if that
            # worker gets no other request and answers no scrape.
            list(pool.map(lambda i: infer(running.url, "1", outside[i : i + 1]), range(20)))
        beyond = 10 * len(outside) + 20
        # Each worker bins its pending rows within a second, idle or not.
        wait_for(
            lambda: (
                total(
                    scrape(running.url),
                    "modelserve_feature_out_of_range_total",
                    feature="petal_length",
                )
                == beyond
            ),
            timeout=10,
            what="every out-of-range value counted",
        )
        psi = psi_of(running.url, "1")
    assert psi["petal_length"] > 0.25, psi
    assert all(psi[name] < 0.1 for name in IRIS_FEATURES if name != "petal_length"), psi


def test_prometheus_sees_exactly_the_shifted_features_drift(
    iris_repository: Path, tmp_path: Path
) -> None:
    rows = iris_training_rows()
    shifted = rows.copy()
    for name in SHIFTED:
        shifted[:, IRIS_FEATURES.index(name)] += 3.0
    with run_server(iris_repository, tmp_path) as running:
        infer(running.url, "1", rows)
        infer(running.url, "2", shifted)
        target = running.url.removeprefix("http://")
        with run_prometheus(target, tmp_path) as prometheus:
            psi = 'modelserve_feature_drift_psi{model="iris"}'

            def scraped() -> bool:
                return len(prometheus.query(psi)) == 8

            wait_for(scraped, timeout=30, what="drift series scraped")
            drifted = prometheus.query(f"max by (version, feature) ({psi}) > 0.25")
            steady = prometheus.query(f"{psi} < 0.1")
    found = {(r["metric"]["version"], r["metric"]["feature"]) for r in drifted}
    assert found == {("2", name) for name in SHIFTED}
    assert {(r["metric"]["version"], r["metric"]["feature"]) for r in steady} == {
        ("1", name) for name in IRIS_FEATURES
    } | {("2", name) for name in IRIS_FEATURES if name not in SHIFTED}
