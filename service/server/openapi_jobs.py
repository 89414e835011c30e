"""The OpenAPI paths of /v1/jobs, which the ASGI fast path serves outside FastAPI's router."""

from typing import Any

_FILES = {
    "text/csv": {"schema": {"type": "string"}},
    "application/x-ndjson": {"schema": {"type": "string"}},
    "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
}
_STATES = ["queued", "running", "succeeded", "failed", "cancelled"]
_JOB = {
    "type": "object",
    "required": ["id", "state", "rows_done", "rows_total", "error"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": _STATES},
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "rows_done": {"type": "integer"},
        "rows_total": {
            "type": ["integer", "null"],
            "description": "Counted once the job starts; estimated before (Parquet: exact).",
        },
        "rows_total_estimated": {
            "type": "boolean",
            "description": "Whether rows_total is an estimate from the input's size.",
        },
        "rows_per_s": {"type": ["number", "null"]},
        "eta_s": {"type": ["number", "null"]},
        "error": {"type": ["string", "null"], "description": "Names the row and column."},
        "attempts": {"type": "integer"},
        "result": {"type": ["string", "null"], "description": "The result's path, once done."},
    },
}
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _query(name: str, values: list[str] | None = None, text: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"} if values is None else {"enum": values}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def job_paths() -> dict[str, Any]:
    formats = ["csv", "ndjson", "parquet"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    submit_query = [
        {"name": "model", "in": "query", "required": True, "schema": {"type": "string"}},
        _query("version", None, "A version number or alias, resolved at submission."),
        _query("output_format", formats, "Default: the input's format."),
        _query("on_error", ["fail", "skip"]),
        _query("column_types", None, "NAME:TYPE,... as for :score."),
    ]
    by_path = {
        "type": "object",
        "required": ["model", "input_path"],
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "string"},
            "input_path": {"type": "string", "description": "Under MODELSERVE_JOBS_INPUT_ROOTS."},
            "input_format": {"enum": formats},
            "output_format": {"enum": formats},
            "on_error": {"enum": ["fail", "skip"]},
            "column_types": {"type": "string"},
        },
    }
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "summary": "submit a batch job",
                "tags": ["jobs"],
                "operationId": "jobs_submit",
                "parameters": submit_query,
                "requestBody": {
                    "required": True,
                    "content": {**_FILES, "application/json": {"schema": by_path}},
                },
                "responses": {
                    "202": _json("Accepted; Location names the job", _JOB),
                    "403": _json("input_path outside the allowed roots", error),
                    "404": _json("Unknown model or version", error),
                    "507": _json("The jobs folder would pass MODELSERVE_JOBS_MAX_BYTES", error),
                },
            },
            "get": {
                "summary": "list jobs, newest first",
                "tags": ["jobs"],
                "operationId": "jobs_list",
                "parameters": [
                    _query("state", _STATES),
                    _query("model"),
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {
                    "200": _json(
                        "Jobs",
                        {
                            "type": "object",
                            "properties": {"jobs": {"type": "array", "items": _JOB}},
                        },
                    ),
                },
            },
        },
        "/v1/jobs/{id}": {
            "get": {
                "summary": "a job's state and progress",
                "tags": ["jobs"],
                "operationId": "jobs_status",
                "parameters": _ID,
                "responses": {"200": _json("The job", _JOB), "404": _json("No such job", error)},
            },
            "delete": {
                "summary": "cancel a queued or running job, or delete a finished one",
                "tags": ["jobs"],
                "operationId": "jobs_delete",
                "parameters": _ID,
                "responses": {
                    "200": _json("Cancelled", _JOB),
                    "204": {"description": "Deleted with its files"},
                },
            },
        },
        "/v1/jobs/{id}/result": {
            "get": {
                "summary": "download a succeeded job's result (one Range served)",
                "tags": ["jobs"],
                "operationId": "jobs_result",
                "parameters": _ID,
                "responses": {
                    "200": {"description": "The result", "content": _FILES},
                    "206": {"description": "The range asked for", "content": _FILES},
                    "409": _json("The job has not succeeded", error),
                    "416": _json("The range starts past the end", error),
                },
            },
        },
    }
    # What every job route may answer, as every inference-like route may (the request boundary).
    common = {
        "400": "Invalid input: the message names the parameter",
        "401": "No credentials (when MODELSERVE_API_KEYS or tokens are required)",
        "403": "Wrong credentials",
        "404": "Unknown model, version or job",
        "413": "Body too large",
        "415": "Unsupported content type or encoding",
        "503": "Shutting down, or overloaded (see Retry-After)",
    }
    for operations in paths.values():
        for operation in operations.values():
            for code, text in common.items():
                operation["responses"].setdefault(code, _json(text, error))
    return paths
