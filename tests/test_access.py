"""Access lines and request ids, read from the logs of real servers."""

import json
import re

import httpx

from tests.scrape import access_lines
from tests.serving import RunningServer, wait_for

BODY = {
    "inputs": [
        {
            "name": "input",
            "shape": [2, 4],
            "datatype": "FP32",
            # Distinctive values: none of them may ever reach a log.
            "data": [[5.123457, 3.987651, 1.456789, 0.234561], [6.711119, 3.022223, 5.333337, 2.1]],
        }
    ]
}


def _line(server: RunningServer, request_id: str) -> dict[str, object]:
    def logged() -> bool:
        return any(e["request_id"] == request_id for e in access_lines(server.output()))

    wait_for(logged, what=f"access line of {request_id}")
    [entry] = [e for e in access_lines(server.output()) if e["request_id"] == request_id]
    return entry


def test_an_inference_logs_one_json_line_and_echoes_the_request_id(
    workers_server: RunningServer,
) -> None:
    response = httpx.post(
        f"{workers_server.url}/v2/models/iris/versions/stable/infer",
        json=BODY,
        headers={"X-Request-ID": "trace-1f2e.3d"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-1f2e.3d"
    entry = _line(workers_server, "trace-1f2e.3d")
    assert entry["level"] == "info"
    assert entry["model"] == "iris"
    assert entry["version"] == "1"  # the alias, resolved
    assert entry["protocol"] == "v2"
    assert entry["status"] == 200
    assert entry["rows"] == 2
    assert entry["error"] is None
    assert isinstance(entry["duration_ms"], float)
    assert entry["duration_ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry["time"]))
    log = workers_server.output()
    for value in ("5.123457", "3.987651", "6.711119", "5.333337"):
        assert value not in log


def test_ids_are_generated_when_missing_or_unusable(workers_server: RunningServer) -> None:
    url = f"{workers_server.url}/v1/models/iris:predict"
    rows = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
    for given in (None, "has space", "x" * 129, "caf\u00e9"):
        headers = {} if given is None else {"X-Request-ID": given.encode()}
        response = httpx.post(url, json=rows, headers=headers)  # type: ignore[arg-type]  # bytes values test raw header bytes
        assert response.status_code == 200
        generated = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated), given
        assert _line(workers_server, generated)["protocol"] == "v1"


def test_errors_log_their_type_and_status(workers_server: RunningServer) -> None:
    response = httpx.post(
        f"{workers_server.url}/v2/models/iris/infer",
        json={"inputs": []},
        headers={"X-Request-ID": "bad-1"},
    )
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "bad-1"
    entry = _line(workers_server, "bad-1")
    assert (entry["status"], entry["error"], entry["rows"]) == (400, "InvalidInput", 0)
    response = httpx.post(
        f"{workers_server.url}/v2/models/nope/infer", json=BODY, headers={"X-Request-ID": "bad-2"}
    )
    assert response.status_code == 404
    entry = _line(workers_server, "bad-2")
    assert (entry["model"], entry["status"], entry["error"]) == ("nope", 404, "ModelNotFound")


def test_the_control_plane_logs_and_answers_with_request_ids(
    workers_server: RunningServer,
) -> None:
    with httpx.Client(base_url=workers_server.url) as http:
        metadata = http.get("/v2/models/iris/versions/2", headers={"X-Request-ID": "meta-1"})
        missing = http.get("/no/such/route", headers={"X-Request-ID": "route-1"})
        probe = http.get("/v2/health/ready", headers={"X-Request-ID": "probe-1"})
        scrape = http.get("/metrics", headers={"X-Request-ID": "scrape-1"})
        root = http.get("/", headers={"X-Request-ID": "root-1"})  # KServe V1 liveness
    statuses = [r.status_code for r in (metadata, missing, probe, scrape, root)]
    assert statuses == [200, 404, 200, 200, 200]
    for response, given in ((metadata, "meta-1"), (missing, "route-1"), (probe, "probe-1")):
        assert response.headers["x-request-id"] == given
    entry = _line(workers_server, "meta-1")
    assert (entry["method"], entry["path"], entry["status"]) == (
        "GET",
        "/v2/models/iris/versions/2",
        200,
    )
    assert (entry["model"], entry["version"], entry["protocol"]) == ("iris", "2", "v2")
    # A HEAD that is answered as GET is logged as the HEAD the client sent.
    head = httpx.head(f"{workers_server.url}/v2", headers={"X-Request-ID": "head-1"})
    assert head.status_code == 200
    assert _line(workers_server, "head-1")["method"] == "HEAD"
    missed = _line(workers_server, "route-1")
    # The control plane's errors carry their type too (answered inside the framework).
    assert (missed["status"], missed["error"]) == (404, "RouteNotFound")
    assert _line(workers_server, "meta-1")["error"] is None
    refused = httpx.post(
        f"{workers_server.url}/v2/repository/index", headers={"X-Request-ID": "admin-1"}
    )
    assert refused.status_code in (401, 403)
    assert _line(workers_server, "admin-1")["error"] == refused.json()["type"]
    # Probes and scrapes are logged at debug level only, so not at the default info.
    logged = {e["request_id"] for e in access_lines(workers_server.output())}
    assert "probe-1" not in logged
    assert "scrape-1" not in logged
    assert "root-1" not in logged


def test_the_status_pages_own_refreshes_are_logged_at_debug_only(
    workers_server: RunningServer,
) -> None:
    marked = {"X-Modelserve-Status-Page": "1"}
    with httpx.Client(base_url=workers_server.url) as http:
        refresh = http.get("/v2/models/iris", headers={**marked, "X-Request-ID": "page-1"})
        failed = http.get("/v2/models/nope", headers={**marked, "X-Request-ID": "page-2"})
        posted = http.post(
            "/v2/models/iris/infer", json=BODY, headers={**marked, "X-Request-ID": "page-3"}
        )
        plain = http.get("/v2/models/iris", headers={"X-Request-ID": "page-4"})
    assert [r.status_code for r in (refresh, failed, posted, plain)] == [200, 404, 200, 200]
    # A failed read and an inference are logged at info even when marked; so is anyone else's.
    assert _line(workers_server, "page-2")["status"] == 404
    assert _line(workers_server, "page-3")["status"] == 200
    assert _line(workers_server, "page-4")["status"] == 200
    assert "page-1" not in {e["request_id"] for e in access_lines(workers_server.output())}


def test_model_loads_are_logged_with_format_and_time(workers_server: RunningServer) -> None:
    entries = [
        json.loads(line) for line in workers_server.output().splitlines() if line.startswith("{")
    ]
    loaded = {
        (e["pid"], e["model"], e["version"]): e for e in entries if e["message"] == "model loaded"
    }
    assert len(loaded) == 12  # 6 versions in each of the 2 workers
    for entry in loaded.values():
        assert entry["format"] in ("sklearn", "onnx")
        assert entry["load_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f]{12}", entry["sha256"])
    failed = [e for e in entries if e.get("reason") and e.get("model") == "iris"]
    assert {(e["version"], e["level"]) for e in failed} == {(3, "error")}
    assert len(failed) == 2


def test_text_lines_quote_what_could_break_them(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.url}/v2/models/two%20words%0Aforged/infer",
        json=BODY,
        headers={"X-Request-ID": "text-1"},
    )
    assert response.status_code == 404
    wait_for(lambda: "request_id=text-1 " in server.output(), what="text access line")
    [line] = [line for line in server.output().splitlines() if "request_id=text-1 " in line]
    assert ' path="/v2/models/two words\\nforged/infer" ' in line
    assert " status=404 " in line
    assert " protocol=v2 " in line
    assert " error=ModelNotFound" in line
    assert " rows=0" in line
    assert "version=" not in line
