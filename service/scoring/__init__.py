"""Scoring tables without a server: for the `score` command and for Spark, Ray and Dask workers.

A `ModelReference` names a model in a repository; `score(data, reference)` loads it once per
process (with the same sha256 checks as the server) and returns the data with prediction
columns added. The reference is small and picklable, so it travels to remote workers, which
load the model themselves on first use and keep it for every later batch.
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa

from service.config import Settings
from service.errors import InvalidInput, ModelNotFound, ModelNotReady
from service.protocols.files import Chunk
from service.scoring.chunks import score_chunk
from service.scoring.tabular import check_columns
from service.store.registry import ModelVersion, load_version
from service.store.repository import parse_version, scan_model

if TYPE_CHECKING:  # pandas is optional: only users who pass DataFrames have it
    import pandas as pd

ON_ERROR = ("fail", "skip")
# What goes in comes back, with prediction columns: an Arrow table or a pandas DataFrame.
Data = TypeVar("Data", pa.Table, "pd.DataFrame")


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
        # As the server does: a pinned default_version is the default or nothing.
        pinned = source.config.default_version
        if pinned is not None and pinned not in source.versions:
            raise ModelNotReady(
                f"model {reference.name!r}: default version {pinned} (pinned by default_version "
                f"in model.toml) cannot load: {source.absence(pinned)}"
            )
        number = pinned or max(source.versions, default=None)
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
        return score_chunk(model, Chunk(data), 0, on_error, model.runtime.predict)
    if not hasattr(data, "columns") or hasattr(data, "to_pandas"):
        raise InvalidInput("score() takes a pandas DataFrame or a pyarrow Table")
    table = pa.Table.from_pandas(data, preserve_index=False)
    check_columns(model, table.column_names)
    scored = score_chunk(model, Chunk(table), 0, on_error, model.runtime.predict).to_pandas()
    scored.index = data.index
    return scored
