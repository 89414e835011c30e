"""Tensor datatypes of the Open Inference Protocol and their numpy equivalents."""

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

# V2 datatype name -> numpy dtype. BYTES holds strings (class labels) as object arrays.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
# The same, looked up by dtype (a dtype hashes as it compares); the first name of a dtype wins.
_DATATYPE_OF: dict[np.dtype[Any], str] = {
    dtype: name for name, dtype in reversed(DATATYPES.items())
}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name for a numpy dtype (strings map to BYTES)."""
    if dtype.kind in "OUS":
        return "BYTES"
    known = _DATATYPE_OF.get(dtype)
    if known is not None:
        return known
    for name, candidate in DATATYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"no V2 datatype for numpy dtype {dtype}")


class TensorSpec(BaseModel):
    """A named tensor of a model's signature; -1 in a shape is any size."""

    model_config = ConfigDict(frozen=True)

    name: str
    datatype: str
    shape: list[int]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]
