"""The metadata.json schema written beside every artifact and read at load time."""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.store.tensors import TensorSpec

Task = Literal["classification", "regression", "other"]


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

    @classmethod
    def read(cls, path: Path) -> "ArtifactMetadata":
        return cls.model_validate_json(path.read_bytes())

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")
