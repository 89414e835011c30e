"""The online benchmark's own parts: the raw-call measurement and the bodies it sends."""

import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.online.raw import load_runtime, measure_raw
from bench.online.workload import Artifact, Encoding, build_request, decode_answer, features
from service.store.runtimes import RuntimeOptions


@pytest.mark.parametrize("version", [1, 2])
def test_raw_call_measurement_gives_rows_per_second(iris_repository: Path, version: int) -> None:
    rates = measure_raw(iris_repository, Artifact("iris", version), 10, RuntimeOptions(), 0.02)
    expected = {"runtime", "estimator"} if version == 1 else {"runtime"}
    assert set(rates) == expected
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_benchmark_requests_are_answered_correctly(
    client: httpx.Client, trained_repository: Path, encoding: Encoding
) -> None:
    artifact = Artifact("iris", 1)
    rows = features("iris", 150)
    expected = (
        load_runtime(trained_repository, artifact, RuntimeOptions())
        .predict({"input": rows})
        .outputs
    )
    labels = [str(v) for v in expected["label"]]
    request = build_request("modelserve", artifact, rows, labels[0], encoding)
    headers = {"content-type": request.content_type}
    if request.header_length is not None:
        headers["inference-header-content-length"] = str(request.header_length)
    response = client.post(request.path, content=request.body, headers=headers)
    assert response.status_code == 200, response.text
    assert all(marker.encode() in response.content for marker in request.markers)
    answer = decode_answer(
        "modelserve", response.content, response.headers.get("inference-header-content-length"), 3
    )
    assert answer.labels == labels
    np.testing.assert_allclose(answer.probabilities, expected["probabilities"], atol=1e-6)
