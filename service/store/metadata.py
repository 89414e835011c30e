"""The metadata.json schema written beside every artifact and read at load time."""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.store.tensors import TensorSpec

Task = Literal["classification", "regression", "other"]


class ReferenceSample(BaseModel):
    """Rows of the training data kept beside the artifact (for conversion parity checks)."""

    file: str
    sha256: str
    rows: int


class ReferenceProfile(BaseModel):
    """The training distribution of the features and predictions (drift is measured on it)."""

    file: str
    sha256: str
    rows: int


class Parity(BaseModel):
    """How closely a converted version reproduced its source on a reference sample."""

    rows: int
    label_agreement: float | None = None  # classifiers: share of identical labels
    max_abs_probability_difference: float | None = None
    max_relative_prediction_difference: float | None = None  # regressors
    tolerance: float
    sample: str  # "reference_sample.parquet of version N", or the file given


class ConvertedFrom(BaseModel):
    """The version an artifact was converted from, with what converted it and how well."""

    version: int
    artifact: str
    sha256: str
    converter: dict[str, str]
    parity: Parity


class ArtifactMetadata(BaseModel):
    name: str
    version: int
    artifact: str
    sha256: str
    task: Task
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    features: list[str] = Field(default_factory=list)
    classes: list[str | int] | None = None
    framework: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    # Models such as HistGradientBoosting handle missing values; most do not.
    allow_nan: bool = False
    reference_sample: ReferenceSample | None = None
    profile: ReferenceProfile | None = None
    converted_from: ConvertedFrom | None = None

    @classmethod
    def read(cls, path: Path) -> "ArtifactMetadata":
        return cls.model_validate_json(path.read_bytes())

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")
