"""`modelserve jobs`: a client of a running server's job API (the standard library only).

Exit codes a scheduler can act on: 0 the job succeeded (or the request did), 1 it failed or
the server refused, 2 a usage error, 3 it was cancelled, 4 `wait` timed out.
"""

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any, BinaryIO

from service.scoring.progress import ProgressBar

_MEDIA_TYPES = {".csv": "text/csv", ".ndjson": "application/x-ndjson"}
_MEDIA_TYPES |= {".jsonl": "application/x-ndjson", ".parquet": "application/vnd.apache.parquet"}
EXIT = {"succeeded": 0, "failed": 1, "cancelled": 3}


class JobClientError(Exception):
    def __init__(self, message: str, status: int = 0, content_range: str | None = None) -> None:
        super().__init__(message)
        self.status, self.content_range = status, content_range


def _call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: bytes | BinaryIO | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    headers = dict(headers or {})
    key = args.api_key or os.environ.get("MODELSERVE_API_KEY")
    token = args.token or os.environ.get("MODELSERVE_TOKEN")
    if key:
        headers["X-API-Key"] = key
    elif token:  # the server reads an API key first: a token goes only where no key is given
        headers["Authorization"] = f"Bearer {token}"
    url = f"{args.url.rstrip('/')}{path}"
    # Imported here: every command imports this module, and http.client with ssl take longer
    # to import than `modelserve score` takes for 50,000 rows.
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise JobClientError(
            f"{method} {url}: {exc.code} {message}", exc.code, exc.headers.get("content-range")
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise JobClientError(f"{method} {url}: the server cannot be reached ({exc})") from None


def _json(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    with _call(args, method, path, **kw) as response:
        data = response.read()
    return json.loads(data) if data else None


def _submit(args: argparse.Namespace) -> int:
    fields = {
        "model": args.model,
        "version": args.version,
        "output_format": args.output_format,
        "on_error": args.on_error,
        "column_types": args.column_types,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.input_path:
        fields["input_path"] = args.file
        body = json.dumps(fields).encode()
        job = _json(args, "POST", "/v1/jobs", body=body, headers=_JSON)
    else:
        source = Path(args.file)
        media_type = _MEDIA_TYPES.get(source.suffix.lower())
        if media_type is None:
            raise JobClientError(f"{source}: name a .csv, .ndjson, .jsonl or .parquet file")
        query = urllib.parse.urlencode(fields)
        headers = {"Content-Type": media_type, "Content-Length": str(source.stat().st_size)}
        with source.open("rb") as body_file:
            job = _json(args, "POST", f"/v1/jobs?{query}", body=body_file, headers=headers)
    print(job["id"])
    return 0


_JSON = {"Content-Type": "application/json"}


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(_json(args, "GET", f"/v1/jobs/{args.id}"), indent=2))
    return 0


def _wait(args: argparse.Namespace) -> int:
    """Polls until the job ends; a progress bar on a terminal, the final state on stdout."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    bar: ProgressBar | None = None
    while True:
        job = _json(args, "GET", f"/v1/jobs/{args.id}")
        # The bar's 100% is the rows counted, not the estimate a queued job shows.
        if job["rows_total"] and not job.get("rows_total_estimated") and bar is None:
            bar = ProgressBar(job["rows_total"], sys.stderr)
        if bar is not None:
            bar.advance(job["rows_done"] - bar.rows, job["rows_done"] - bar.done)
        if job["state"] in EXIT:
            if bar is not None and job["state"] == "succeeded":
                bar.close()
            print(job["state"] if job["error"] is None else f"{job['state']}: {job['error']}")
            return EXIT[str(job["state"])]
        if deadline is not None and time.monotonic() > deadline:
            print(f"error: job {args.id} is still {job['state']}", file=sys.stderr)
            return 4
        time.sleep(args.interval)


def _result(args: argparse.Namespace) -> int:
    target = Path(args.output)
    # A download that stopped resumes from where it stopped.
    have = target.stat().st_size if args.resume and target.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = _call(args, "GET", f"/v1/jobs/{args.id}/result", headers=headers)
    except JobClientError as exc:
        # Nothing past what it has: the file was already whole (a retried script).
        if have and exc.status == 416 and exc.content_range == f"bytes */{have}":
            return 0
        raise
    with response:
        mode = "ab" if have and response.status == 206 else "wb"
        with target.open(mode) as out:
            shutil.copyfileobj(response, out, 1 << 20)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    answer = _json(args, "DELETE", f"/v1/jobs/{args.id}")
    print("deleted" if answer is None else answer["state"])
    return 0


def _list(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({k: v for k, v in (("state", args.state),) if v})
    for job in _json(args, "GET", f"/v1/jobs?{query}")["jobs"]:
        total = "?" if job["rows_total"] is None else str(job["rows_total"])
        if job.get("rows_total_estimated"):
            total = f"~{total}"
        model = f"{job['model']}:{job['version']}"
        print(f"{job['id']}  {job['state']:<9}  {model}  {job['rows_done']}/{total}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        code: int = args.jobs_run(args)
    except JobClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a local file: the input to send, or where the result goes
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return code


def add_parser(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="submit and follow batch jobs on a running server")
    jobs.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    credentials = jobs.add_mutually_exclusive_group()
    credentials.add_argument("--api-key", help="API key (default: MODELSERVE_API_KEY)")
    credentials.add_argument(
        "--token", help="bearer token, when no API key is given (default: MODELSERVE_TOKEN)"
    )
    actions = jobs.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="submit a file; prints the job id")
    submit.add_argument("model", metavar="MODEL")
    submit.add_argument("file", metavar="FILE")
    submit.add_argument("--version", help="a version number or alias")
    submit.add_argument("--output-format", choices=("csv", "ndjson", "parquet"))
    submit.add_argument("--on-error", choices=("fail", "skip"))
    submit.add_argument("--column-types", metavar="NAME:TYPE,...")
    submit.add_argument(
        "--input-path", action="store_true", help="FILE is a path the server reads itself"
    )
    submit.set_defaults(jobs_run=_submit)
    for name, function, text in (
        ("status", _status, "print the job as JSON"),
        ("cancel", _cancel, "cancel a running job, or delete a finished one"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("id", metavar="ID")
        action.set_defaults(jobs_run=function)
    wait = actions.add_parser("wait", help="wait for the job to end; exit 0, 1 or 3")
    wait.add_argument("id", metavar="ID")
    wait.add_argument("--timeout", type=float, help="seconds; past them exit 4")
    wait.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    wait.set_defaults(jobs_run=_wait)
    result = actions.add_parser("result", help="download the result")
    result.add_argument("id", metavar="ID")
    result.add_argument("output", metavar="OUTPUT")
    result.add_argument("--resume", action="store_true", help="continue a partial download")
    result.set_defaults(jobs_run=_result)
    listing = actions.add_parser("list", help="list jobs, newest first")
    listing.add_argument(
        "--state", choices=("queued", "running", "succeeded", "failed", "cancelled")
    )
    listing.set_defaults(jobs_run=_list)
    jobs.set_defaults(run=run)
