"""Control-plane routes: health, metadata, statistics, the repository extension, V1 status and
metrics (`/`, liveness or the status page, is in status_page.py)."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import __version__
from service.errors import Forbidden, ModelNotReady
from service.observability.statistics import model_statistics
from service.protocols.schemas import (
    ErrorResponse,
    InferenceStatistics,
    Liveness,
    ModelMetadata,
    ModelReadiness,
    ModelStatus,
    ModelStatusError,
    Readiness,
    RepositoryEntry,
    RepositoryIndexRequest,
    ServerMetadata,
    VersionDrift,
    VersionStatus,
)
from service.server.auth import Identity
from service.server.http import status_of
from service.server.state import ServiceState
from service.store.registry import ModelEntry, ModelVersion
from service.store.repository import parse_version

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
PLATFORMS = {"sklearn": "sklearn", "onnx": "onnxruntime_onnx"}


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(get_state)]


async def require_admin(request: Request, state: State) -> Identity:
    """The admin token, or a token with the scope modelserve:admin."""
    return await state.credentials.check_admin(request.headers.get("authorization"))


async def require_api_key(request: Request, state: State) -> Identity:
    """Model endpoints are as open as inference, and need the same scope for the same model;
    those of no one model (statistics of all) need the scope of every model."""
    return await state.credentials.check_inference(
        request.headers.get("authorization"),
        request.headers.get("x-api-key"),
        request.path_params.get("name"),
    )


async def require_metrics_access(request: Request, state: State) -> None:
    if state.settings.protect_metrics:
        await state.credentials.check_any(
            request.headers.get("authorization"), request.headers.get("x-api-key")
        )


Admin = Depends(require_admin)
# For handlers that name who acted (the audit log); cached, so checked once per request.
AdminIdentity = Annotated[Identity, Admin]
ApiKey = Depends(require_api_key)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 503)
}
NOT_READY_STATUS: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelStatusError, "description": "Not ready: the status and the reason"}
}
router = APIRouter(responses=ERRORS)


@router.get("/v2", response_model=ServerMetadata, tags=["v2"])
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="modelserve", version=__version__, extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=Liveness, tags=["health"])
def live() -> Liveness:
    return Liveness(live=True)


@router.get("/v2/health/ready", response_model=Readiness, tags=["health"])
def ready(state: State, response: Response) -> Readiness:
    ready = state.serving_ready()
    if not ready:
        response.status_code = 503
    return Readiness(ready=ready)


def describe_model(model: ModelVersion, versions: list[int]) -> ModelMetadata:
    signature = model.signature
    parameters: dict[str, object] = {
        "task": signature.task,
        "features": signature.features,
        "sha256": model.sha256,
        "warnings": model.warnings,
    }
    if signature.classes is not None:
        parameters["classes"] = signature.classes
    return ModelMetadata(
        name=model.name,
        versions=[str(v) for v in versions],
        platform=PLATFORMS.get(model.format, model.format),
        inputs=signature.inputs,
        outputs=signature.outputs,
        parameters=parameters,
    )


# Declared before /v2/models/{name}, which would otherwise take "stats" for a model name.
@router.get(
    "/v2/models/stats",
    response_model=InferenceStatistics,
    dependencies=[ApiKey],
    tags=["statistics"],
)
def statistics_of_all(state: State) -> InferenceStatistics:
    registry = state.registry
    versions = [
        (name, number)
        for name, entry in sorted(registry.models.items())
        for number in sorted(entry.versions)
    ]
    return model_statistics(state.prometheus, versions)


@router.get(
    "/v2/models/{name}/stats",
    response_model=InferenceStatistics,
    dependencies=[ApiKey],
    tags=["statistics"],
)
def statistics_of_model(state: State, name: str) -> InferenceStatistics:
    entry = state.registry.model(name)
    return model_statistics(state.prometheus, [(name, number) for number in sorted(entry.versions)])


@router.get(
    "/v2/models/{name}/versions/{version}/stats",
    response_model=InferenceStatistics,
    dependencies=[ApiKey],
    tags=["statistics"],
)
def statistics_of_version(state: State, name: str, version: str) -> InferenceStatistics:
    model = state.registry.resolve(name, version)
    return model_statistics(state.prometheus, [(name, model.version)])


@router.get(
    "/v2/models/{name}/versions/{version}/drift",
    response_model=VersionDrift,
    dependencies=[ApiKey],
    tags=["statistics"],
)
def drift_of_version(state: State, name: str, version: str) -> VersionDrift:
    """This worker's recent rows of the version against its reference profile, per feature."""
    if state.router.drift is None:
        raise Forbidden("drift is not measured: MODELSERVE_DRIFT_WINDOW_ROWS is 0")
    return state.router.drift.report(state.registry.resolve(name, version))


@router.get("/v2/models/{name}", response_model=ModelMetadata, dependencies=[ApiKey], tags=["v2"])
@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    dependencies=[ApiKey],
    tags=["v2"],
)
def model_metadata(state: State, name: str, version: str | None = None) -> ModelMetadata:
    model = state.registry.resolve(name, version)
    entry = state.registry.model(name)
    return describe_model(model, sorted(entry.versions) if version is None else [model.version])


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReadiness,
    dependencies=[ApiKey],
    tags=["v2"],
)
@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReadiness,
    dependencies=[ApiKey],
    tags=["v2"],
)
def model_ready(state: State, name: str, version: str | None = None) -> ModelReadiness:
    model = state.registry.resolve(name, version)
    return ModelReadiness(name=name, version=str(model.version), ready=True)


@router.post(
    "/v2/repository/index",
    response_model=list[RepositoryEntry],
    dependencies=[Admin],
    tags=["repository"],
)
def repository_index(
    state: State, request: Annotated[RepositoryIndexRequest | None, Body()] = None
) -> list[RepositoryEntry]:
    only_ready = request.ready if request else False
    entries: list[RepositoryEntry] = []
    registry = state.registry
    for name, entry in sorted(registry.models.items()):
        if entry.unready is not None:
            # The model as a whole: what unversioned requests get, and why.
            entries.append(RepositoryEntry(name=name, state="UNAVAILABLE", reason=entry.unready))
        for number in sorted(entry.versions):
            stale = entry.stale.get(number)
            reason = (
                f"serving its previous artifact; the new one did not load: "
                f"{stale.reason}: {stale.message}"
                if stale is not None
                else ""
            )
            entries.append(
                RepositoryEntry(name=name, version=str(number), state="READY", reason=reason)
            )
        for number, failure in sorted(entry.failures.items()):
            entries.append(
                RepositoryEntry(
                    name=name,
                    version=str(number),
                    state="UNAVAILABLE",
                    reason=f"{failure.reason}: {failure.message}",
                )
            )
    for name in sorted(registry.unloaded):
        entries.append(RepositoryEntry(name=name, state="UNAVAILABLE", reason="unloaded"))
    return [e for e in entries if e.state == "READY"] if only_ready else entries


@router.get(
    "/v1/models/{name}",
    response_model=ModelStatus,
    responses=NOT_READY_STATUS,
    dependencies=[ApiKey],
    tags=["v1"],
)
@router.get(
    "/v1/models/{name}/versions/{version}",
    response_model=ModelStatus,
    responses=NOT_READY_STATUS,
    dependencies=[ApiKey],
    tags=["v1"],
)
def v1_model_status(state: State, name: str, version: str | None = None) -> Response:
    """KServe V1 readiness (`name`, `ready`) and TF Serving's version statuses in one body:
    200 when the model (or the version) serves, else 503 with the error that says why."""
    registry = state.registry
    try:
        registry.resolve(name, version)  # unknown models and versions answer 404 here
        problem: ModelNotReady | None = None
    except ModelNotReady as exc:
        problem = exc
    entry = registry.models.get(name)
    statuses = [] if entry is None else _version_statuses(entry, _numbers(entry, version))
    status = ModelStatus(name=name, ready=problem is None, model_version_status=statuses)
    if problem is None:
        return Response(status.model_dump_json(), media_type="application/json")
    body = ModelStatusError(
        error=problem.message, type=type(problem).__name__, **status.model_dump()
    )
    return Response(
        body.model_dump_json(), status_code=status_of(problem), media_type="application/json"
    )


def _numbers(entry: ModelEntry, version: str | None) -> list[int]:
    if version is None:
        return sorted([*entry.versions, *entry.failures])
    number = parse_version(version)
    number = entry.aliases.get(version) if number is None else number
    return [] if number is None else [number]


def _version_statuses(entry: ModelEntry, numbers: list[int]) -> list[VersionStatus]:
    statuses = []
    for number in numbers:
        failure = entry.failures.get(number)
        statuses.append(
            VersionStatus(
                version=str(number),
                state="END" if failure else "AVAILABLE",
                status={
                    "error_code": "UNAVAILABLE" if failure else "OK",
                    "error_message": f"{failure.reason}: {failure.message}" if failure else "",
                },
            )
        )
    return statuses


@router.get(
    "/metrics",
    tags=["metrics"],
    response_class=Response,
    dependencies=[Depends(require_metrics_access)],
)
def metrics(state: State) -> Response:
    if state.router.drift is not None:  # this worker's PSI gauges, up to date for the scrape
        state.router.drift.refresh()
    return Response(generate_latest(state.prometheus), media_type=CONTENT_TYPE_LATEST)
