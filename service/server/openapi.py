"""Documents the inference routes, which the ASGI fast path serves outside FastAPI's router."""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.protocols.schemas import (
    ErrorResponse,
    InferRequest,
    InferResponse,
    PredictRequest,
    PredictResponse,
)
from service.server.openapi_jobs import job_paths

_V2_INFER = ["/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"]
_V1_PREDICT = ["/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict"]
_V1_SCORE = ["/v1/models/{name}:score", "/v1/models/{name}/versions/{version}:score"]
# The batch file formats of :score, in and out (the answer's follows Accept, else the input's).
_FILES = {
    "text/csv": {"schema": {"type": "string"}},
    "application/x-ndjson": {"schema": {"type": "string"}},
    "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
}
_SCORE_QUERY = [
    {
        "name": "on_error",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["fail", "skip"], "default": "fail"},
        "description": "fail: a bad row ends the answer with an error; skip: it gets an "
        "`error` column and empty predictions.",
    },
    {
        "name": "chunk_rows",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "Rows per chunk (default 16384, at most MODELSERVE_MAX_BATCH_ROWS).",
    },
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(
    path: str,
    summary: str,
    request: type[BaseModel] | None,
    response: type[BaseModel] | None,
    tag: str,
) -> dict[str, Any]:
    """A POST operation; without request and response models, its bodies are batch files."""
    parameters = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if "{version}" in path:
        parameters.append(
            {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    errors = {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": _ref(ErrorResponse)}},
        }
        for code, text in [
            (400, "Invalid input"),
            (401, "No API key (when MODELSERVE_API_KEYS is set)"),
            (403, "Wrong API key"),
            (404, "Unknown model or version"),
            (413, "Too large"),
            (415, "Unsupported content type"),
            (500, "The model failed; the body names the request id"),
            (503, "Not ready, overloaded or shutting down (see Retry-After)"),
            (504, "Deadline passed"),
        ]
    }
    if request is None or response is None:
        parameters += _SCORE_QUERY
        body, answer = _FILES, _FILES
    else:
        body = {"application/json": {"schema": _ref(request)}}
        answer = {"application/json": {"schema": _ref(response)}}
    return {
        "post": {
            "summary": summary,
            "tags": [tag],
            "operationId": f"{tag}_{summary}_{path}".replace("/", "_"),
            "parameters": parameters,
            "requestBody": {"required": True, "content": body},
            "responses": {"200": {"description": "Predictions", "content": answer}, **errors},
        }
    }


def add_inference_paths(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorResponse, InferRequest, InferResponse, PredictRequest, PredictResponse):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        for path in _V2_INFER:
            schema["paths"][path] = _operation(path, "infer", InferRequest, InferResponse, "v2")
        for path in _V1_PREDICT:
            schema["paths"][path] = _operation(
                path, "predict", PredictRequest, PredictResponse, "v1"
            )
        for path in _V1_SCORE:
            schema["paths"][path] = _operation(path, "score", None, None, "v1")
        schema["paths"].update(job_paths())
        app.openapi_schema = schema
        return schema

    # FastAPI's documented way to replace the schema is to assign the method.
    app.openapi = openapi  # type: ignore[method-assign]  # see above
