"""Scoring tables without a server: for the `score` command and for Spark, Ray and Dask workers.

A `ModelReference` names a model in a repository; `score(data, reference)` loads it once per
process (with the same sha256 checks as the server) and returns the data with prediction
columns added. The reference is small and picklable, so it travels to remote workers, which
load the model themselves on first use and keep it for every later batch.
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from service.config import Settings
from service.errors import InvalidInput, ModelNotFound
from service.protocols.files import Chunk
from service.scoring.tabular import (
    check_columns,
    check_rows,
    empty_outputs,
    extract_features,
    needs_call,
    scored_table,
)
from service.store.registry import ModelVersion, load_version, smoke_inputs
from service.store.repository import parse_version, scan_model
from service.store.runtimes import LABEL_INDEX, Arrays

ON_ERROR = ("fail", "skip")
Data = TypeVar("Data")


@dataclass(frozen=True)
class ModelReference:
    """A model in a repository: `version` is a number, an alias, or None for the default."""

    repository: str
    name: str
    version: int | str | None = None

    @classmethod
    def parse(cls, repository: str | Path, text: str) -> "ModelReference":
        """`iris`, `iris:2` or `iris:production`, as the `score` command takes it."""
        name, _, version = text.partition(":")
        return cls(str(repository), name, version or None)


def load_model(reference: ModelReference, settings: Settings | None = None) -> ModelVersion:
    """Loads one version as the server would: hash checks, pickle policy, smoke prediction."""
    settings = settings or Settings()
    source = scan_model(Path(reference.repository), reference.name)
    version = reference.version
    if version is None:
        default = source.config.default_version
        number = default if default in source.versions else max(source.versions, default=None)
    elif isinstance(version, int):
        number = version
    else:
        number = parse_version(version) or source.config.aliases.get(version)
    if number is None or number not in source.versions:
        which = "a version" if version is None else f"version {version!r}"
        raise ModelNotFound(f"model {reference.name!r} has no {which} in {reference.repository}")
    # Offline scoring calls the runtime directly; batching settings are unused.
    return load_version(
        reference.name, number, source.versions[number], settings.load_options(), (0, 0.0)
    )


@lru_cache(maxsize=8)
def cached_model(reference: ModelReference) -> ModelVersion:
    """The model of a reference, loaded on first use in this process and kept."""
    return load_model(reference)


def predict_rows(model: ModelVersion, chunk: Chunk, first_row: int, on_error: str) -> pa.Table:
    """One chunk through the model in this thread: the input with prediction columns."""
    features = extract_features(model, chunk.table, chunk.errors)
    check_rows(features, first_row, on_error)
    name = model.signature.inputs[0].name
    outputs: Arrays
    if needs_call(features):
        outputs = model.runtime.predict({name: features.matrix})
    else:
        outputs = empty_outputs(model, model.runtime.predict(smoke_inputs(model.signature)))
    outputs.pop(LABEL_INDEX, None)  # the columns come from the labels themselves
    return scored_table(model, chunk.table, features, outputs, first_row, on_error)


def score(data: Data, reference: ModelReference | ModelVersion, on_error: str = "fail") -> Data:
    """`data` (a pandas DataFrame or an Arrow table) with the model's prediction columns.

    The data comes first, as Dask's `map_partitions` and Ray's `map_batches` pass it. Rows come
    back in order, with every input column. With on_error="skip" a row that cannot
    be scored gets empty predictions and a message in an `error` column instead of failing.
    """
    if on_error not in ON_ERROR:
        raise InvalidInput(f"on_error must be one of {', '.join(ON_ERROR)}")
    model = reference if isinstance(reference, ModelVersion) else cached_model(reference)
    if isinstance(data, pa.Table):
        check_columns(model, data.column_names)
        result: Any = predict_rows(model, Chunk(data), 0, on_error)
        return result  # type: ignore[no-any-return]
    to_pandas = getattr(data, "to_pandas", None)
    if not hasattr(data, "columns") or to_pandas is not None:
        raise InvalidInput("score() takes a pandas DataFrame or a pyarrow Table")
    table = pa.Table.from_pandas(data, preserve_index=False)
    check_columns(model, table.column_names)
    scored = predict_rows(model, Chunk(table), 0, on_error).to_pandas()
    scored.index = data.index  # type: ignore[attr-defined]
    return scored  # type: ignore[no-any-return]
