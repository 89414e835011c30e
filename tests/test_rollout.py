"""Routing at run time over HTTP: the admin API, routing keys, replicas and the route command."""

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import RunningServer, run_server, wait_for

TOKEN = "routing-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"MODELSERVE_ADMIN_TOKEN": TOKEN, "MODELSERVE_ROUTING_SYNC_S": "0.2"}
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
V2_ROW = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5, 3, 1, 0]}]}


def _iris_repository(trained: Path, target: Path) -> Path:
    """iris (versions 1, 2 and 3, a copy of 1) alone in a repository of its own."""
    shutil.copytree(trained / "iris", target / "iris")
    shutil.copytree(target / "iris" / "1", target / "iris" / "3")
    return target


@pytest.fixture
def routed(trained_repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    root = _iris_repository(trained_repository, tmp_path / "models")
    with run_server(root, tmp_path, env=ENV) as server:
        yield server


def _routing_url(server: RunningServer, model: str = "iris") -> str:
    return f"{server.url}/v2/repository/models/{model}/routing"


def _versions(server: RunningServer, count: int, **kwargs: object) -> set[str]:
    seen = set()
    for _ in range(count):
        response = httpx.post(f"{server.url}/v2/models/iris/infer", **kwargs)  # type: ignore[arg-type]  # httpx's keywords
        assert response.status_code == 200, response.text
        seen.add(response.json()["model_version"])
    return seen


def test_routing_needs_the_admin_token(routed: RunningServer) -> None:
    assert httpx.get(_routing_url(routed)).status_code == 401
    refused = httpx.put(_routing_url(routed), json={"default_version": 1})
    assert refused.status_code == 401
    assert "admin" in refused.json()["error"].lower() or "token" in refused.json()["error"]
    wrong = httpx.get(_routing_url(routed), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403


def test_a_routing_change_is_durable_and_answers_its_revision(routed: RunningServer) -> None:
    before = httpx.get(_routing_url(routed), headers=ADMIN).json()
    assert before["default_version"] == 2
    assert [w["revision"] for w in before["workers"]] == [before["revision"]]
    answer = httpx.put(_routing_url(routed), json={"default_version": 3}, headers=ADMIN)
    assert answer.status_code == 200
    body = answer.json()
    assert body["revision"] == before["revision"] + 1
    assert body["propagation_s"] == pytest.approx(2 * 0.2 + 0.5)
    assert body["routing"]["default_version"] == 3
    assert _versions(routed, 5, json=V2_ROW) == {"3"}
    # What GET answers goes back in a PUT unchanged (the per-worker key is ignored).
    document = httpx.get(_routing_url(routed), headers=ADMIN).json()
    again = httpx.put(_routing_url(routed), json=document, headers=ADMIN)
    assert again.status_code == 200
    assert again.json()["routing"]["default_version"] == 3


@pytest.mark.parametrize(
    ("routing", "status", "message"),
    [
        ({"default_version": 7}, 400, "version 7"),
        ({"traffic": {"2": 50, "9": 50}}, 400, "version 9"),
        ({"shadow": {"source": 2, "target": 5}}, 400, "version 5"),
        ({"traffic": {"2": -5, "3": 10}}, 400, "negative"),
        ({"traffic": {"two": 1}}, 400, "version numbers"),
        ({"default_version": 1, "revision": 0}, 200, ""),
        ({"default_version": 1, "revision": 0}, 409, "revision 1, not 0"),
        ({"colour": "blue"}, 400, "colour"),
        # A policy that would stop serving what the routing names (it took the model offline).
        ({"version_policy": {"latest": 1}}, 400, "leaves out version 2 of model 'iris', which"),
        ({"version_policy": {"specific": []}}, 400, "(it would serve: none)"),
        ({"version_policy": {"specific": [1, 2]}}, 200, ""),
    ],
)
def test_bad_routing_is_refused_with_the_reason(
    routed: RunningServer, routing: dict[str, object], status: int, message: str
) -> None:
    if status == 409:  # the revision has moved on since the client read it
        httpx.put(_routing_url(routed), json={"default_version": 2}, headers=ADMIN)
    before = (routed.url, httpx.get(_routing_url(routed), headers=ADMIN).json()["revision"])
    answer = httpx.put(_routing_url(routed), json=routing, headers=ADMIN)
    assert answer.status_code == status, answer.text
    if status != 200:
        assert message in answer.json()["error"]
        after = httpx.get(_routing_url(routed), headers=ADMIN).json()["revision"]
        assert after == before[1]  # nothing was written
    assert _versions(routed, 3, json=V2_ROW) <= {"1", "2"}


def test_a_routing_key_sticks_to_one_version_of_a_split(routed: RunningServer) -> None:
    httpx.put(_routing_url(routed), json={"traffic": {"2": 50, "3": 50}}, headers=ADMIN)
    assert _versions(routed, 40, json=V2_ROW) == {"2", "3"}
    for user in ("alice", "bob", "carol", "dave"):
        by_body = {**V2_ROW, "parameters": {"routing_key": user}}
        header = {"X-Routing-Key": user}
        assert (
            len(
                _versions(routed, 10, json=by_body)
                | _versions(routed, 10, json=V2_ROW, headers=header)
            )
            == 1
        )
    # Explicit versions and aliases bypass the split.
    for version, expected in (("1", "1"), ("stable", "1"), ("production", "2")):
        url = f"{routed.url}/v1/models/iris/versions/{version}:predict"
        assert {httpx.post(url, json=ROW).json()["model_version"] for _ in range(10)} == {expected}
    bad = {**V2_ROW, "parameters": {"routing_key": 7}}
    answer = httpx.post(f"{routed.url}/v2/models/iris/infer", json=bad)
    assert answer.status_code == 400
    assert "routing_key" in answer.json()["error"]


def test_replicas_sharing_a_repository_follow_each_other(
    trained_repository: Path, tmp_path: Path
) -> None:
    """Two servers (not workers of one) on one folder, as replicas on a shared volume."""
    root = _iris_repository(trained_repository, tmp_path / "models")
    for logs in ("a", "b"):
        (tmp_path / logs).mkdir()
    with (
        run_server(root, tmp_path / "a", env=ENV) as first,
        run_server(root, tmp_path / "b", env=ENV) as second,
    ):
        started = time.monotonic()
        answer = httpx.put(
            _routing_url(first), json={"aliases": {"production": 3}}, headers=ADMIN
        ).json()
        wait_for(
            lambda: (
                httpx.get(_routing_url(second), headers=ADMIN).json()["workers"][0]["revision"]
                == answer["revision"]
            ),
            what="the other replica to apply the change",
        )
        assert time.monotonic() - started < 5
        url = f"{second.url}/v1/models/iris/versions/production:predict"
        assert httpx.post(url, json=ROW).json()["model_version"] == "3"
        # Unloading through one replica unloads on the other too.
        assert httpx.post(f"{first.url}/v2/repository/models/iris/unload", headers=ADMIN).is_success
        wait_for(
            lambda: httpx.post(f"{second.url}/v1/models/iris:predict", json=ROW).status_code == 503,
            what="the other replica to unload",
        )
        assert httpx.post(f"{second.url}/v2/repository/models/iris/load", headers=ADMIN).is_success
        wait_for(
            lambda: httpx.post(f"{first.url}/v1/models/iris:predict", json=ROW).status_code == 200,
            what="the first replica to load again",
        )


def test_a_version_loaded_through_another_worker_can_be_routed_at_once(
    trained_repository: Path, tmp_path: Path
) -> None:
    """A load answered 200 by one worker (or replica) is followed at once by a routing change
    answered by another that has not synced yet: the routing must not be refused."""
    root = _iris_repository(trained_repository, tmp_path / "models")
    slow_sync = {**ENV, "MODELSERVE_ROUTING_SYNC_S": "60"}  # the other never syncs in time
    for logs in ("a", "b"):
        (tmp_path / logs).mkdir()
    with (
        run_server(root, tmp_path / "a", env=slow_sync) as first,
        run_server(root, tmp_path / "b", env=slow_sync) as second,
    ):
        shutil.copytree(root / "iris" / "1", root / "iris" / "7")
        loaded = httpx.post(f"{first.url}/v2/repository/models/iris/load", headers=ADMIN)
        assert loaded.status_code == 200, loaded.text
        shadow = {"shadow": {"source": 2, "target": 7, "fraction": 0.5}}
        routed = httpx.put(_routing_url(second), json=shadow, headers=ADMIN)
        assert routed.status_code == 200, routed.text
        # A version that is nowhere is still refused, saying which versions serve.
        missing = httpx.put(_routing_url(second), json={"aliases": {"next": 8}}, headers=ADMIN)
        assert missing.status_code == 400, missing.text
        assert (
            "version 8 of model 'iris', which does not serve (serving: 1, 2, 3, 7)"
            in (missing.json()["error"])
        )


def _route(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "route", "iris", "--url", server.url, *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={"MODELSERVE_ADMIN_TOKEN": TOKEN, "PATH": ""},
    )


def test_the_route_command_shows_and_changes_the_routing(routed: RunningServer) -> None:
    shown = _route(routed)
    assert shown.returncode == 0, shown.stderr
    assert '"default_version": 2' in shown.stdout
    changed = _route(routed, "--traffic", "2=80,3=20", "--alias", "canary=3", "--shadow", "2:3:0.5")
    assert changed.returncode == 0, changed.stderr
    routing = httpx.get(_routing_url(routed), headers=ADMIN).json()
    assert routing["traffic"] == {"2": 80.0, "3": 20.0}
    assert routing["aliases"]["canary"] == 3
    assert routing["aliases"]["production"] == 2  # other aliases are kept
    assert routing["shadow"] == {"source": 2, "target": 3, "fraction": 0.5}
    cleared = _route(routed, "--no-traffic", "--no-shadow", "--remove-alias", "canary")
    assert cleared.returncode == 0, cleared.stderr
    routing = httpx.get(_routing_url(routed), headers=ADMIN).json()
    assert (routing["traffic"], routing["shadow"]) == ({}, None)
    assert "canary" not in routing["aliases"]
    refused = _route(routed, "--default", "9")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: PUT ")
    assert "version 9" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    usage = _route(routed, "--traffic", "2")
    assert usage.returncode == 2
    assert "KEY=VALUE" in usage.stderr
    # A reader that leaves before the output comes (`| head`): no traceback.
    command = [sys.executable, "-m", "service", "route", "iris", "--url", routed.url]
    env = {"MODELSERVE_ADMIN_TOKEN": TOKEN, "PATH": ""}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as cut:
        assert cut.stdout is not None
        cut.stdout.close()
        _, errors = cut.communicate(timeout=60)
    assert cut.returncode == 141, errors  # 128 + SIGPIPE, as a shell reports a cut pipe
    assert errors == b"", errors


def _walkthrough() -> list[str]:
    """The commands of the README's rollout walk, in order."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Rolling out a new version", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readmes_rollout_walk_runs_as_written(trained_repository: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(trained_repository / "breast_cancer", root / "breast_cancer")
    commands = _walkthrough()
    programs = [c.split()[0] for c in commands]
    assert programs == [
        "modelserve",
        "curl",
        "modelserve",
        "curl",
        "modelserve",
        "modelserve",
        "modelserve",
    ]
    bin_dir = Path(sys.executable).parent
    with run_server(root, tmp_path, env=ENV) as server:
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "MODELSERVE_ADMIN_TOKEN": TOKEN,
            "MODELSERVE_MODEL_REPOSITORY": str(root),
        }
        host = server.url.removeprefix("http://")
        for command in commands:
            line = command.replace("localhost:8000", host)
            if line.startswith("modelserve route"):
                line += f" --url {server.url}"
            done = subprocess.run(
                ["bash", "-c", line], capture_output=True, text=True, timeout=120, env=env
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        routing = httpx.get(_routing_url(server, "breast_cancer"), headers=ADMIN).json()
        assert (routing["default_version"], routing["aliases"]["production"]) == (1, 1)
        assert (routing["traffic"], routing["shadow"]) == ({}, None)
        assert sorted(routing["workers"][0]["serving"]) == [1, 2, 3]
