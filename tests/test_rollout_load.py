"""Rollout under load: two workers keep answering every request while the routing changes.

Client threads send steady traffic (unversioned, by alias, by explicit version, with routing
keys) while the test adds a version and makes it the default, flips an alias ten times, sets a
90/10 split, copies an artifact in place slowly, unloads and reloads a model and mirrors a
shadow. Every answer must be a 200, and once a change's answer plus its stated propagation
bound have passed, no answer may come from a version the routing no longer allows.
"""

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.scrape import scrape, total
from tests.serving import RunningServer, run_server, wait_for

TOKEN = "rollout-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
SYNC_S = 0.25


@dataclass(frozen=True)
class Answer:
    kind: str  # default, alias, pinned, key:<key>
    sent: float
    status: int
    version: str


@dataclass
class Traffic:
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, url: str, kind: str, path: str, headers: dict[str, str]) -> None:
        # A new connection now and then, so both workers get this thread's requests.
        while not self.stop.is_set():
            with httpx.Client(base_url=url, timeout=30) as client:
                for _ in range(25):
                    if self.stop.is_set():
                        return
                    sent = time.monotonic()
                    response = client.post(path, json=ROW, headers=headers)
                    version = response.json().get("model_version", "") if response.content else ""
                    with self.lock:
                        self.answers.append(Answer(kind, sent, response.status_code, version))


@dataclass(frozen=True)
class Change:
    requested: float  # from here, a worker may already serve it
    applied: float  # from here, every worker must: the answer plus the stated bound
    default: frozenset[str]  # versions unversioned requests may reach
    alias: str  # the version `production` names


@pytest.fixture
def rollout_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("rollout") / "models"
    for name in ("iris", "diabetes"):
        shutil.copytree(trained_repository / name, root / name)
    env = {
        "MODELSERVE_ADMIN_TOKEN": TOKEN,
        "MODELSERVE_ROUTING_SYNC_S": str(SYNC_S),
        "MODELSERVE_REPOSITORY_POLL_S": "0.5",
        "MODELSERVE_LOG_LEVEL": "warning",
    }
    logs = tmp_path_factory.mktemp("rollout-logs")
    with run_server(root, logs, env=env, args=("--workers", "2")) as server:
        wait_for(lambda: len(_workers(server)) == 2, what="both workers to report")
        yield server, root


def _workers(server: RunningServer) -> list[dict[str, object]]:
    routing = httpx.get(f"{server.url}/v2/repository/models/iris/routing", headers=ADMIN).json()
    workers: list[dict[str, object]] = routing["workers"]
    return workers


def _put(
    server: RunningServer, model: str, routing: dict[str, object]
) -> tuple[float, dict[str, object]]:
    """(when the change was asked for, the answer)."""
    requested = time.monotonic()
    response = httpx.put(
        f"{server.url}/v2/repository/models/{model}/routing", json=routing, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return requested, answer


def _post(server: RunningServer, path: str) -> dict[str, object]:
    response = httpx.post(f"{server.url}/v2/repository/models/{path}", headers=ADMIN, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def _applied(answer: dict[str, object]) -> float:
    return time.monotonic() + float(answer["propagation_s"])  # type: ignore[arg-type]  # JSON


def _propagation(server: RunningServer, revision: object, started: float) -> float:
    """Seconds until every worker reports `revision`."""
    wait_for(
        lambda: all(w.get("revision") == revision for w in _workers(server)),
        what=f"every worker at revision {revision}",
    )
    return time.monotonic() - started


def _slow_copy(source: Path, target: Path, seconds: float) -> None:
    """Rewrite `target` in place with `source`'s bytes, a piece at a time."""
    data = source.read_bytes()
    pieces = 10
    with target.open("r+b") as out:
        out.truncate(0)
        for i in range(pieces):
            out.write(data[i * len(data) // pieces : (i + 1) * len(data) // pieces])
            out.flush()
            time.sleep(seconds / pieces)


def test_routing_changes_under_load_fail_no_request(
    rollout_server: tuple[RunningServer, Path],
) -> None:
    server, root = rollout_server
    traffic = Traffic()
    streams = [
        ("default", "/v1/models/iris:predict", {}),
        ("default", "/v1/models/iris:predict", {}),
        ("alias", "/v1/models/iris/versions/production:predict", {}),
        ("pinned", "/v1/models/iris/versions/1:predict", {}),
        *[
            (f"key:user-{i}", "/v1/models/iris:predict", {"X-Routing-Key": f"user-{i}"})
            for i in range(3)
        ],
    ]
    threads = [
        threading.Thread(target=traffic.run, args=(server.url, kind, path, headers), daemon=True)
        for kind, path, headers in streams
    ]
    for thread in threads:
        thread.start()
    changes = [Change(0.0, 0.0, frozenset({"2"}), "2")]
    propagation: list[float] = []
    try:
        time.sleep(2)
        # A new version: copied in under a temporary name, renamed, loaded, made the default.
        staging = root / "iris" / ".incoming"
        shutil.copytree(root / "iris" / "1", staging)
        staging.rename(root / "iris" / "3")
        started = time.monotonic()
        loaded = _post(server, "iris/load")
        propagation.append(_propagation(server, loaded["revision"], started))
        requested, answer = _put(server, "iris", {"default_version": 3})
        changes.append(Change(requested, _applied(answer), frozenset({"3"}), "2"))
        propagation.append(_propagation(server, answer["revision"], requested))
        # An alias flipped ten times.
        for flip in range(10):
            target = ("1", "3")[flip % 2]
            aliases = {"production": int(target), "stable": 1}
            requested, answer = _put(server, "iris", {"aliases": aliases})
            changes.append(Change(requested, _applied(answer), frozenset({"3"}), target))
            time.sleep(0.4)
        # A 90/10 split, with a shadow of half of version 2's requests on version 3.
        requested, answer = _put(
            server,
            "iris",
            {"traffic": {"2": 90, "3": 10}, "shadow": {"source": 2, "target": 3, "fraction": 0.5}},
        )
        split_from = _applied(answer)
        changes.append(Change(requested, split_from, frozenset({"2", "3"}), changes[-1].alias))
        # Meanwhile: version 1's artifact rewritten in place, slowly; diabetes unloaded and
        # loaded again.
        artifact = next((root / "iris" / "1").glob("model.*"))
        _slow_copy(artifact, artifact, seconds=2.0)
        _post(server, "diabetes/unload")
        _post(server, "diabetes/load")
        wait_for(
            lambda: (
                sum(1 for a in traffic.answers if a.kind == "default" and a.sent > split_from)
                >= 2000
            ),
            timeout=120,
            what="2,000 unversioned requests under the split",
        )
    finally:
        traffic.stop.set()
        for thread in threads:
            thread.join(timeout=60)

    answers = traffic.answers
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"

    def allowed(sent: float) -> tuple[set[str], set[str]]:
        """(versions an unversioned request may reach, versions the alias may name): while a
        change propagates, the one before it may still be in force on a worker."""
        index = max(i for i, c in enumerate(changes) if c.requested <= sent)
        in_force = [changes[index]]
        if sent < changes[index].applied:
            in_force.append(changes[index - 1])
        return {v for c in in_force for v in c.default}, {c.alias for c in in_force}

    for a in answers:
        defaults, named = allowed(a.sent)
        if a.kind == "default" or a.kind.startswith("key:"):
            assert a.version in defaults, (a, defaults)
        elif a.kind == "alias":
            assert a.version in named, (a, named)
        else:
            assert a.version == "1", a
    split = [a for a in answers if a.kind == "default" and a.sent > split_from]
    share = Counter(a.version for a in split)["3"] / len(split)
    assert abs(share - 0.10) <= 0.05, f"version 3 got {share:.1%} of {len(split)} requests"
    for key in {a.kind for a in answers if a.kind.startswith("key:")}:
        versions = {a.version for a in answers if a.kind == key and a.sent > split_from}
        assert len(versions) == 1, (key, versions)
    samples = scrape(server.url)
    labels = {"model": "iris", "version": "2", "shadow_version": "3"}
    compared = total(samples, "modelserve_shadow_requests_total", outcome="compared", **labels)
    dropped = total(samples, "modelserve_shadow_requests_total", outcome="dropped", **labels)
    shadow_failed = total(samples, "modelserve_shadow_requests_total", outcome="failed", **labels)
    mirror_from = changes[-1].requested
    # Every answer of version 2 since the shadow was asked for may have been mirrored.
    answered_by_2 = sum(1 for a in answers if a.version == "2" and a.sent >= mirror_from)
    assert compared > 0
    assert shadow_failed == 0
    # About half of version 2's requests are mirrored (compared or dropped).
    assert 0.35 * answered_by_2 <= compared + dropped <= 0.65 * answered_by_2 + 50
    stats = httpx.get(f"{server.url}/v2/models/iris/versions/2/stats").json()
    [shadow] = stats["model_stats"][0]["shadow"]
    assert shadow["shadow_version"] == "3"
    assert shadow["compared"] >= compared  # read later: as many or more
    assert shadow["label_agreement"] == 1.0  # version 3 is a copy of 1, the same model as 2
    diabetes = {"instances": [[0.0] * 10]}
    for _ in range(4):  # new connections: both workers serve the reloaded model
        assert httpx.post(f"{server.url}/v1/models/diabetes:predict", json=diabetes).is_success
    print(
        f"\nrollout under load: {len(answers)} requests, {len(failed)} failed; "
        f"propagation to both workers {', '.join(f'{p:.2f} s' for p in propagation)}; "
        f"split {share:.1%} to version 3 over {len(split)}; shadow compared {compared:.0f}, "
        f"dropped {dropped:.0f} ({dropped / max(1, compared + dropped):.1%})"
    )
