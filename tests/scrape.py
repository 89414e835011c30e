"""Reads a live server's /metrics the way Prometheus does, and sends it inference traffic."""

import json
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

Series = tuple[str, frozenset[tuple[str, str]]]
IRIS = load_iris().data.astype(np.float32)


def scrape(url: str) -> dict[Series, float]:
    """Every sample of GET /metrics, keyed by sample name and labels."""
    response = httpx.get(f"{url}/metrics", timeout=10.0)
    assert response.status_code == 200
    samples: dict[Series, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[Series, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@dataclass
class Sent:
    """What a burst of traffic sent, to compare with what the server counted."""

    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # model, version, v
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    labels: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # model, version, label
    request_ids: list[str] = field(default_factory=list)


def infer(
    http: httpx.Client, model: str, version: str, protocol: str, rows: int, request_id: str
) -> list[str | float]:
    """One inference of `rows` iris-shaped rows; returns the predictions."""
    data = IRIS[:rows] if model == "iris" else np.zeros((rows, _FEATURES[model]), np.float32)
    headers = {"X-Request-ID": request_id}
    if protocol == "v2":
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(data.shape),
                    "datatype": "FP32",
                    "data": data.tolist(),
                }
            ]
        }
        response = http.post(
            f"/v2/models/{model}/versions/{version}/infer", json=body, headers=headers
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == request_id
        first = response.json()["outputs"][0]
        predictions: list[str | float] = first["data"]
        return predictions
    response = http.post(
        f"/v1/models/{model}/versions/{version}:predict",
        json={"instances": data.tolist()},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    result: list[str | float] = response.json()["predictions"]
    return result


_FEATURES = {"iris": 4, "diabetes": 10, "breast_cancer": 30}


def send(
    url: str, plan: Iterable[tuple[str, str, str, int]], prefix: str, sent: Sent | None = None
) -> Sent:
    """Sends each (model, version, protocol, rows) at once from 8 threads, each request on a
    fresh connection, so that every worker of a several-worker server gets some."""
    sent = sent if sent is not None else Sent()
    start = len(sent.request_ids)
    jobs = [(job, f"{prefix}-{start + i}") for i, job in enumerate(plan)]

    def one(job: tuple[tuple[str, str, str, int], str]) -> list[str | float]:
        (model, version, protocol, rows), request_id = job
        with httpx.Client(base_url=url, timeout=30.0) as http:
            return infer(http, model, version, protocol, rows, request_id)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    for ((model, version, protocol, rows), request_id), predictions in zip(
        jobs, results, strict=True
    ):
        sent.requests[(model, version, protocol)] += 1
        sent.rows[(model, version)] += rows
        sent.request_ids.append(request_id)
        if model != "diabetes":
            for label in predictions:
                sent.labels[(model, version, str(label))] += 1
    return sent


def access_lines(log: str) -> list[dict[str, object]]:
    """The access lines of a JSON-lines server log."""
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "service.access":
                lines.append(entry)
    return lines
