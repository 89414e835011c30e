"""The statistics extension through tritonclient, against a real two-worker server."""

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.scrape import access_lines, send
from tests.serving import RunningServer


@pytest.fixture
def client(workers_server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    http = triton.InferenceServerClient(workers_server.url.removeprefix("http://"))
    yield http
    http.close()


def _stats(client: triton.InferenceServerClient, model: str, version: str) -> dict[str, Any]:
    stats: dict[str, Any] = client.get_inference_statistics(model, version)
    entries: list[dict[str, Any]] = stats["model_stats"]
    assert len(entries) == 1
    return entries[0]


def test_the_server_declares_the_extension(client: triton.InferenceServerClient) -> None:
    assert "statistics" in client.get_server_metadata()["extensions"]


def test_all_models_lists_every_loaded_version(client: triton.InferenceServerClient) -> None:
    stats = client.get_inference_statistics()
    listed = [(s["name"], s["version"]) for s in stats["model_stats"]]
    # iris version 3 failed to load: it is not served, so it has no statistics.
    assert listed == [
        ("breast_cancer", "1"),
        ("breast_cancer", "2"),
        ("diabetes", "1"),
        ("diabetes", "2"),
        ("iris", "1"),
        ("iris", "2"),
    ]
    iris = client.get_inference_statistics("iris")["model_stats"]
    assert [s["version"] for s in iris] == ["1", "2"]


def test_statistics_count_the_requests_and_rows_of_every_worker(
    client: triton.InferenceServerClient, workers_server: RunningServer
) -> None:
    before = _stats(client, "iris", "1")
    started_ms = time.time() * 1000
    sent = send(workers_server.url, [("iris", "1", "v2", 3), ("iris", "1", "v1", 2)] * 8, "stats")
    failed = httpx.post(f"{workers_server.url}/v2/models/iris/versions/1/infer", json={})
    assert failed.status_code == 400
    after = _stats(client, "iris", "1")

    requests = sum(sent.requests.values())
    assert after["inference_count"] - before["inference_count"] == sum(sent.rows.values()) == 40
    infer, infer_before = after["inference_stats"], before["inference_stats"]
    assert infer["success"]["count"] - infer_before["success"]["count"] == requests
    assert infer["fail"]["count"] - infer_before["fail"]["count"] == 1
    assert infer["queue"]["count"] - infer_before["queue"]["count"] == requests
    calls = after["execution_count"] - before["execution_count"]
    assert 1 <= calls <= requests  # batching may merge requests into one call
    assert infer["compute_infer"]["count"] - infer_before["compute_infer"]["count"] == calls
    assert infer["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert infer["compute_infer"]["ns"] > infer_before["compute_infer"]["ns"]
    assert started_ms <= after["last_inference"] <= time.time() * 1000
    # Both workers served, and whichever answers, the numbers are the sum over both.
    ids = set(sent.request_ids)
    pids = {e["pid"] for e in access_lines(workers_server.output()) if e["request_id"] in ids}
    assert len(pids) == 2
    for _ in range(6):
        with httpx.Client(base_url=workers_server.url) as fresh:
            again = fresh.get("/v2/models/iris/versions/1/stats").json()["model_stats"][0]
        assert again == after


def test_a_version_alias_and_unknown_names(client: triton.InferenceServerClient) -> None:
    assert _stats(client, "iris", "production")["version"] == "2"
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.get_inference_statistics("no-such-model")
    with pytest.raises(InferenceServerException, match="no version"):
        client.get_inference_statistics("iris", "99")
