"""The Grafana dashboard queries metrics that exist, in PromQL that a real Prometheus runs."""

import contextlib
import json
import re
from pathlib import Path

import httpx

from tests.prometheus import Prometheus
from tests.scrape import scrape, send
from tests.serving import RunningServer, wait_for

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "modelserve.json"
# PromQL words that look like metric names once strings, matchers and ranges are gone.
_PROMQL = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "time",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
}  # fmt: skip
# What Grafana puts in place of its variables when it runs a query.
_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*", "$version": ".*"}


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            [selector] = re.findall(r"label_values\((.+), \w+\)", variable["query"]["query"])
            queries.append(selector)
    return queries


def _runnable(query: str) -> str:
    for variable, value in _VARIABLES.items():
        query = query.replace(variable, value)
    return query


def metric_names(query: str) -> set[str]:
    bare = re.sub(r'"[^"]*"', "", query)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare)) - _PROMQL


def test_the_dashboard_covers_what_operators_watch() -> None:
    titles = " / ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"])
    topics = ["Request rate", "Error ratio", "p50 / p99", "Queue vs compute", "Batch size"]
    topics += ["Rows inferred per second", "Prediction distribution", "Model readiness"]
    for topic in topics:
        assert topic in titles


def test_every_metric_the_dashboard_queries_is_exposed(workers_server: RunningServer) -> None:
    send(workers_server.url, [("iris", "1", "v2", 2), ("diabetes", "1", "v1", 1)], "dashboard")
    exposed = {name for name, _ in scrape(workers_server.url)}
    queried = set().union(*(metric_names(q) for q in _queries()))
    assert len(queried) >= 15
    assert queried - exposed == set()


def test_every_dashboard_query_runs_in_prometheus_and_returns_data(
    prometheus: Prometheus, workers_server: RunningServer
) -> None:
    send(workers_server.url, [("iris", "2", "v2", 3), ("breast_cancer", "1", "v2", 1)], "dash")
    error = httpx.post(f"{workers_server.url}/v2/models/iris/versions/2/infer", json={})
    assert error.status_code == 400
    queries = [_runnable(q) for q in _queries()]
    # A rate needs two scrapes of a series: wait until every panel has data, or time out.
    with contextlib.suppress(TimeoutError):  # the loop below names the query without data
        wait_for(lambda: all(prometheus.query(q) for q in queries), timeout=20)
    for query in queries:
        assert prometheus.query(query), f"no data: {query}"
