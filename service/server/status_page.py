"""The status page at `/`: server-rendered HTML for browsers, the V1 liveness JSON for the rest.

The server lists what is loaded; the page's script (static/status.js) fills in rates, latency
percentiles and drift every few seconds from the endpoints every client uses, and reasons and
routing once the admin token is typed in. Nothing is fetched from outside the server.
"""

from html import escape
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.protocols.schemas import ServerStatus
from service.server.routes import State
from service.server.state import ServiceState
from service.store.registry import ModelEntry

STATIC_URL = "/status/static"
router = APIRouter()


def static_files() -> StaticFiles:
    """The page's script and style sheet, from the installed package."""
    return StaticFiles(directory=Path(str(files("service.server") / "static")))


def wants_html(request: Request) -> bool:
    # Browsers name text/html; curl, KServe's client and probes send */* or nothing.
    return "text/html" in request.headers.get("accept", "")


@router.get(
    "/",
    response_model=ServerStatus,
    responses={200: {"content": {"text/html": {}}, "description": "JSON, or the status page"}},
    tags=["health"],
)
def root(request: Request, state: State) -> Response:
    """Liveness where KServe's V1 protocol and its client (`is_server_live`) look for it; a
    browser (Accept: text/html) gets the status page."""
    if wants_html(request):
        return HTMLResponse(render_status_page(state))
    return Response(ServerStatus(status="alive").model_dump_json(), media_type="application/json")


def _is_open(state: ServiceState) -> bool:
    """Whether anyone may read model metadata, so the page may list the models unasked."""
    credentials = state.credentials
    return not credentials.api_keys and credentials.tokens is None


def _model_rows(name: str, entry: ModelEntry, drift_on: bool) -> list[str]:
    rows = []
    states = {number: "READY" for number in entry.versions}
    states.update({number: "UNAVAILABLE" for number in entry.failures})
    versions: list[tuple[int | str, str]] = [*sorted(states.items())]
    if not versions:  # a model with no version at all is listed too, as unavailable
        versions = [("", "UNAVAILABLE")]
    for number, status in versions:
        # Only versions with a reference profile have drift to ask for.
        model = entry.versions.get(number) if isinstance(number, int) else None
        drift = drift_on and model is not None and model.profile is not None
        rows.append(
            f'<tr data-model="{escape(name)}" data-version="{number}" '
            f'data-drift="{"yes" if drift else "no"}">'
            f"<td>{escape(name)}</td><td>{number}</td>"
            f'<td class="state {status.lower()}">{status}</td>'
            '<td class="reason"></td><td class="rate"></td><td class="errors"></td>'
            '<td class="p50"></td><td class="p95"></td><td class="p99"></td></tr>'
        )
    return rows


def _model_option(name: str, entry: ModelEntry) -> str:
    if entry.default_version is None:
        return ""
    signature = entry.versions[entry.default_version].signature
    tensor = signature.inputs[0]
    return (
        f'<option value="{escape(name)}" data-input="{escape(tensor.name)}" '
        f'data-datatype="{escape(tensor.datatype)}" '
        f'data-features="{escape(", ".join(signature.features))}">{escape(name)}</option>'
    )


def render_status_page(state: ServiceState) -> str:
    models = sorted(state.registry.models.items()) if _is_open(state) else []
    drift_on = state.router.drift is not None
    rows = [row for name, entry in models for row in _model_rows(name, entry, drift_on)]
    options = "".join(_model_option(name, entry) for name, entry in models)
    note = (
        ""
        if _is_open(state)
        else '<p class="note">This server needs a credential to list its models: enter the '
        "admin token (and an API key to send a row).</p>"
    )
    # A request the page knows will be refused would show as an error in the console.
    metrics = "protected" if state.settings.protect_metrics else "open"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>modelserve status</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{STATIC_URL}/status.css">
<script src="{STATIC_URL}/status.js" defer></script>
</head>
<body data-drift="{"on" if drift_on else "off"}" data-metrics="{metrics}"
 data-inference="{"open" if _is_open(state) else "closed"}">
<header><h1>modelserve {escape(__version__)}</h1>
<form id="credential"><label>Admin token
<input id="token" type="password" autocomplete="off"></label>
<label>API key <input id="api-key" type="password" autocomplete="off"></label>
<button type="submit">Use</button></form>
<span id="updated"></span></header>
<section id="models"><h2>Models</h2>{note}
<table><thead><tr><th>Model</th><th>Version</th><th>State</th><th>Reason</th>
<th>Requests/s</th><th>Errors/s</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr></thead>
<tbody id="model-rows">{"".join(rows)}</tbody></table>
<p class="note">Rates over the last refresh; latency percentiles since the server started.</p>
</section>
<section id="routing" hidden><h2>Routing</h2><div id="routing-body"></div></section>
<section id="try"><h2>Send one row</h2>
<form id="infer"><select id="infer-model">{options}</select>
<input id="infer-row" size="60" required><button type="submit">Infer</button></form>
<pre id="infer-answer"></pre></section>
<section id="drift"><h2>Drift</h2>
<p class="note">Population Stability Index per feature: <span class="psi ok">&lt; 0.1</span>
<span class="psi warn">0.1&ndash;0.25</span> <span class="psi alert">&gt; 0.25</span></p>
<div id="drift-body"></div></section>
</body>
</html>
"""
