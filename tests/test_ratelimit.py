"""Per-client rate limits: the token bucket on a clock the test drives, the setting's format,
and a real server refusing one client over its limit (429 over HTTP, RESOURCE_EXHAUSTED over
gRPC) while serving another."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service.config import Rate, Settings, parse_rate
from service.errors import RateLimited
from service.observability.metrics import create_metrics
from service.server.auth import ANONYMOUS, Identity, key_id
from service.server.ratelimit import RateLimiter
from tests.grpcclient import tritonclient_grpc
from tests.scrape import scrape, total
from tests.serving import RunningServer, run_server

KEYS = ("first-secret-key", "second-secret-key", "grpc-secret-key")
ROW = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5, 3, 1, 0]}]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _limiter(rate: Rate, max_clients: int = 100) -> tuple[RateLimiter, Clock, CollectorRegistry]:
    registry = CollectorRegistry()
    clock = Clock()
    limiter = RateLimiter(rate, create_metrics(registry).rate_limited, max_clients, clock)
    return limiter, clock, registry


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    limiter, clock, registry = _limiter(Rate(per_second=0.5, burst=3))
    client = Identity("api_key", key_id("k"))
    for _ in range(3):
        limiter.admit(client, "10.0.0.1")
    with pytest.raises(RateLimited, match="over its rate limit") as refused:
        limiter.admit(client, "10.0.0.1")
    # One token back at 0.5/s takes 2 s.
    assert refused.value.retry_after_s == 2
    limiter.admit(Identity("api_key", key_id("other")), "10.0.0.1")  # another client's bucket
    clock.now += 1.0
    with pytest.raises(RateLimited) as again:
        limiter.admit(client, "10.0.0.1")
    assert again.value.retry_after_s == 1  # half a token left to wait for: rounded up
    clock.now += 1.0
    limiter.admit(client, "10.0.0.1")
    assert registry.get_sample_value(
        "modelserve_rate_limited_total", {"client_class": "api_key"}
    ) == pytest.approx(2)


@pytest.mark.parametrize(
    ("identity", "client_class"),
    [
        (Identity("token", "alice", frozenset({"modelserve:infer"})), "token"),
        (Identity("api_key", key_id("k")), "api_key"),
        (ANONYMOUS, "anonymous"),
        (None, "anonymous"),
    ],
)
def test_refusals_are_counted_by_client_class(identity: Identity | None, client_class: str) -> None:
    limiter, _, registry = _limiter(Rate(1.0, 1))
    limiter.admit(identity, "10.0.0.1")
    with pytest.raises(RateLimited, match=client_class):
        limiter.admit(identity, "10.0.0.1")
    sample = registry.get_sample_value
    assert sample("modelserve_rate_limited_total", {"client_class": client_class}) == 1


def test_anonymous_clients_are_told_apart_by_address() -> None:
    limiter, _, _ = _limiter(Rate(1.0, 1))
    limiter.admit(ANONYMOUS, "10.0.0.1")
    limiter.admit(ANONYMOUS, "10.0.0.2")
    with pytest.raises(RateLimited):
        limiter.admit(ANONYMOUS, "10.0.0.1")


def test_the_table_of_clients_is_bounded() -> None:
    limiter, _, _ = _limiter(Rate(1.0, 1), max_clients=50)
    for address in range(10_000):  # an attacker rotating addresses
        limiter.admit(ANONYMOUS, f"10.{address // 256}.{address % 256}.1")
    assert limiter.clients() == 50
    # The most recent clients are the ones remembered.
    with pytest.raises(RateLimited):
        limiter.admit(ANONYMOUS, "10.39.15.1")


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100.0, 100.0)),
        ("6000/min", Rate(100.0, 6000.0)),
        ("1/h burst 5", Rate(1 / 3600, 5.0)),
        ("0.5/s", Rate(0.5, 1.0)),
        (" 20 / second burst 40 ", Rate(20.0, 40.0)),
    ],
)
def test_rate_formats(text: str, rate: Rate) -> None:
    assert parse_rate(text) == pytest.approx(rate)
    assert Settings(rate_limit=text).rate() == pytest.approx(rate)


@pytest.mark.parametrize("text", ["100", "100/day", "0/s", "ten/s", "5/s burst 0", "5/s burst"])
def test_a_malformed_rate_is_refused_at_startup(text: str) -> None:
    with pytest.raises(ValidationError, match="rate limit"):
        Settings(rate_limit=text)


def test_unset_means_no_limit() -> None:
    assert Settings().rate() is None
    assert Settings(rate_limit="").rate() is None


@pytest.fixture(scope="module")
def limited_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = {"MODELSERVE_API_KEYS": ",".join(KEYS), "MODELSERVE_RATE_LIMIT": "1/s burst 3"}
    with run_server(trained_repository, tmp_path_factory.mktemp("limited"), env=env) as running:
        yield running


def _infer(server: RunningServer, key: str) -> httpx.Response:
    url = f"{server.url}/v2/models/iris/infer"
    return httpx.post(url, json=ROW, headers={"X-API-Key": key}, timeout=10)


@pytest.mark.e2e
def test_a_client_over_its_limit_gets_429_while_another_is_served(
    limited_server: RunningServer,
) -> None:
    answers = [_infer(limited_server, KEYS[0]) for _ in range(5)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    refused = answers[-1]
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["type"] == "RateLimited"
    assert "over its rate limit" in refused.json()["error"]
    # Another key has its own bucket.
    assert _infer(limited_server, KEYS[1]).status_code == 200
    # V1 goes through the same boundary, and the same bucket.
    v1 = httpx.post(
        f"{limited_server.url}/v1/models/iris:predict",
        json={"instances": [[5, 3, 1, 0]]},
        headers={"X-API-Key": KEYS[0]},
    )
    assert v1.status_code == 429
    time.sleep(1.2)  # one token back
    assert _infer(limited_server, KEYS[0]).status_code == 200

    samples = scrape(limited_server.url)
    assert total(samples, "modelserve_rate_limited_total", client_class="api_key") >= 2
    metrics_text = httpx.get(f"{limited_server.url}/metrics").text
    for key in KEYS:
        assert key not in metrics_text
        assert key not in limited_server.output()
    # The access line names the refusal.
    assert "RateLimited" in limited_server.output()


@pytest.mark.e2e
def test_grpc_over_the_limit_answers_resource_exhausted(limited_server: RunningServer) -> None:
    triton = tritonclient_grpc()
    client = triton.InferenceServerClient(limited_server.grpc_target)
    rows = np.array([[5, 3, 1, 0]], np.float32)
    tensor: Any = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(rows)
    headers = {"x-api-key": KEYS[2]}
    try:
        for _ in range(3):
            client.infer("iris", [tensor], headers=headers)
        with pytest.raises(triton.InferenceServerException, match="over its rate limit") as over:
            client.infer("iris", [tensor], headers=headers)
        assert over.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        client.close()
