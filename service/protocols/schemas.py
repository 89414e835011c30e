"""V2 and V1 messages as pydantic models: the control-plane responses and the OpenAPI document."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.store.tensors import TensorSpec


class ErrorResponse(BaseModel):
    error: str
    type: str | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Any] = Field(default_factory=dict)


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    version: str | None = None
    ready: bool


class RepositoryIndexRequest(BaseModel):
    ready: bool = False


class RepositoryEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str = ""


class ShadowRouting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: int
    target: int
    fraction: float = 1.0


class Routing(BaseModel):
    """A model's routing: the JSON mirror of its model.toml keys.

    In a PUT, a key present replaces the file's (null or {} removes it) and a key left out is
    kept; `revision`, when given, must be the file's current one. `workers` and `unloaded` are
    what GET reports and are ignored in a PUT.
    """

    model_config = ConfigDict(extra="forbid")

    default_version: int | None = None
    aliases: dict[str, int] | None = None
    traffic: dict[str, float] | None = None
    shadow: ShadowRouting | None = None
    version_policy: dict[str, Any] | None = None
    batching: dict[str, Any] | None = None
    revision: int | None = None
    unloaded: bool | None = None
    workers: list[dict[str, Any]] | None = None


class RoutingChange(BaseModel):
    """What a change of routing, load or unload answers once the change is durable."""

    model: str
    revision: int
    # Every worker and replica applies the change within this many seconds (plus, for a
    # version that is new to a worker, the time it takes to load it).
    propagation_s: float
    routing: Routing


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    model_name: str | None = Field(
        None, description="Ignored: the path names the model. KServe's client sends it."
    )
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class PredictRequest(BaseModel):
    instances: list[list[float] | dict[str, float]]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    classes: list[str | int] | None = None


class VersionStatus(BaseModel):
    version: str
    state: str
    status: dict[str, str]


class ModelStatus(BaseModel):
    """V1 model status: KServe's `name` and `ready` beside TF Serving's version statuses."""

    name: str
    ready: bool
    model_version_status: list[VersionStatus]


class ModelStatusError(ModelStatus):
    """The status of a model or version that is not ready, with the error that says why."""

    error: str
    type: str


class ServerStatus(BaseModel):
    """KServe V1 liveness, at the root path."""

    status: Literal["alive"]


class StatisticDuration(BaseModel):
    count: int = 0
    ns: int = 0


class InferStatistics(BaseModel):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration = Field(default_factory=StatisticDuration)
    cache_miss: StatisticDuration = Field(default_factory=StatisticDuration)


class InferBatchStatistics(BaseModel):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ShadowStatistics(BaseModel):
    """What mirroring this version's requests to a shadow version showed (modelserve's own)."""

    shadow_version: str
    compared: int
    dropped: int
    failed: int
    # Share of rows whose labels agree (classifiers; None for regressors or before any row).
    label_agreement: float | None = None
    # Mean over compared requests of each request's largest difference (see the metrics).
    mean_largest_difference: float | None = None
    shadow_ns: int = 0


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    batch_stats: list[InferBatchStatistics] = Field(default_factory=list)
    memory_usage: list[dict[str, Any]] = Field(default_factory=list)
    shadow: list[ShadowStatistics] = Field(default_factory=list)


class InferenceStatistics(BaseModel):
    model_stats: list[ModelStatistics]


class FeatureDrift(BaseModel):
    """One feature over a worker's recent rows, against the version's reference profile."""

    name: str
    edges: list[float] = Field(
        description="Interior bin edges: bin i holds edges[i-1] <= x < edges[i]."
    )
    reference_shares: list[float]
    live_shares: list[float]
    psi: float | None = Field(description="Population Stability Index; null before any row.")
    reference_min: float | None
    reference_max: float | None
    out_of_range: int = Field(description="Values in the window below min or above max.")
    missing: int = Field(description="Missing (NaN) values in the window.")
    reference_missing_share: float


class PredictionDrift(BaseModel):
    classes: list[str | int] | None = None
    edges: list[float] = Field(default_factory=list)
    reference_shares: list[float]
    live_shares: list[float]
    psi: float | None


class VersionDrift(BaseModel):
    """GET /v2/models/{name}/versions/{version}/drift: the answering worker's window."""

    name: str
    version: str
    window_rows: int = Field(description="Rows in the window now.")
    window_limit: int = Field(description="MODELSERVE_DRIFT_WINDOW_ROWS.")
    reference_rows: int
    features: list[FeatureDrift]
    prediction: PredictionDrift | None
