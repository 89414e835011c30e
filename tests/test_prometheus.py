"""A real Prometheus scrapes a two-worker server, and PromQL returns what was sent."""

import time

from tests.prometheus import Prometheus
from tests.scrape import access_lines, scrape, send, total
from tests.serving import RunningServer, wait_for

ROWS = "modelserve_inference_rows_total"
# Every (model, version, protocol) the traffic uses; rows per request vary from 1 to 5.
TARGETS = [("iris", "1", "v2"), ("iris", "2", "v1"), ("diabetes", "2", "v2")]


DURATIONS = "modelserve_request_duration_seconds_count"


def _scraped(prometheus: Prometheus, server: RunningServer, requests: float = 0) -> float:
    """Waits until the server has counted `requests` answered requests (a request is counted
    once its answer is sent, so after the client has it), then until Prometheus has scraped
    what the server counts now; returns when that sample was taken (a scrape timestamp)."""
    wait_for(
        lambda: total(scrape(server.url), DURATIONS) >= requests,
        timeout=10,
        what=f"the server to count {requests} answered requests",
    )
    now = scrape(server.url)
    expected = {name: total(now, name) for name in (ROWS, DURATIONS)}
    wait_for(
        lambda: all(prometheus.value(f"sum({n})") == v for n, v in expected.items()),
        timeout=20,
        what=f"Prometheus to scrape {expected}",
    )
    return prometheus.sample_times(f'{ROWS}{{model="iris",version="1"}}')[-1]


def test_promql_returns_the_requests_and_rows_sent_to_two_workers(
    prometheus: Prometheus, workers_server: RunningServer
) -> None:
    # Every series the traffic touches exists before the first sample that counts.
    answered = total(scrape(workers_server.url), DURATIONS)
    send(workers_server.url, [(*t, 1) for t in TARGETS], "prom-warm")
    t0 = _scraped(prometheus, workers_server, answered + len(TARGETS))
    before = total(scrape(workers_server.url), DURATIONS)
    plan = [(*TARGETS[i % len(TARGETS)], i % 5 + 1) for i in range(30)]
    sent = send(workers_server.url, plan, "prom")
    ids = set(sent.request_ids)
    pids = {e["pid"] for e in access_lines(workers_server.output()) if e["request_id"] in ids}
    assert len(pids) == 2, "both workers must have served part of the traffic"
    t1 = _scraped(prometheus, workers_server, before + len(plan))
    rows, requests = sum(sent.rows.values()), sum(sent.requests.values())
    assert (rows, requests) == (90, 30)

    def delta(expr: str) -> float:
        after, before = prometheus.value(expr, at=t1), prometheus.value(expr, at=t0)
        assert after is not None
        assert before is not None
        return after - before

    assert delta(f"sum({ROWS})") == rows
    assert delta('sum(modelserve_requests_total{code="200"})') == requests
    assert delta(f"sum({DURATIONS})") == requests
    assert delta("sum(modelserve_batch_rows_sum)") == rows
    for (model, version), count in sent.rows.items():
        assert delta(f'sum({ROWS}{{model="{model}",version="{version}"}})') == count
    for (model, version, label), count in sent.labels.items():
        selector = f'model="{model}",version="{version}",label="{label}"'
        assert delta(f"sum(modelserve_predictions_total{{{selector}}})") == count

    # rate() over a window from the sample at t0 to the one at t1 (both ends included in
    # Prometheus 2) is (rows at t1 - rows at t0) / (t1 - t0): times the window, the rows.
    window_ms = round((t1 - t0) * 1000)
    per_second = prometheus.value(f"sum(rate({ROWS}[{window_ms}ms]))", at=t1)
    assert per_second is not None
    assert abs(per_second * window_ms / 1000 - rows) < 1e-6
    increase = prometheus.value(f"sum(increase({ROWS}[{window_ms}ms]))", at=t1)
    assert increase is not None
    assert abs(increase - rows) < 1e-6


def test_promql_sees_the_model_state_of_both_workers(prometheus: Prometheus) -> None:
    wait_for(lambda: prometheus.value("count(process_cpu_seconds_total)") == 2, what="2 workers")
    now = time.time()
    assert prometheus.value('modelserve_model_ready{model="iris",version="2"}', at=now) == 1
    assert prometheus.value('modelserve_model_ready{model="iris",version="3"}', at=now) == 0
    assert prometheus.value("sum(modelserve_inflight_requests)", at=now) == 0
    # Each worker tried to load the broken version, and counted its own failure.
    assert prometheus.value('sum(modelserve_model_load_failures_total{model="iris"})') == 2
    assert prometheus.value('count(modelserve_model_info{model="iris"} == 1)') == 2
