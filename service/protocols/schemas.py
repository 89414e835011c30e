"""V2 and V1 messages as pydantic models: the control-plane responses and the OpenAPI document."""

from typing import Any, Literal

from pydantic import BaseModel, Field

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


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    batch_stats: list[InferBatchStatistics] = Field(default_factory=list)
    memory_usage: list[dict[str, Any]] = Field(default_factory=list)


class InferenceStatistics(BaseModel):
    model_stats: list[ModelStatistics]
