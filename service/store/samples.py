"""Reference samples: rows of the training data kept beside a version's artifact.

A conversion is checked on them: the converted model must answer them as the original does.
They are stored as Parquet with one column per feature and hashed into metadata.json, so a
sample that was changed after packaging is noticed before anything trusts it.
"""

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from service.errors import InvalidInput
from service.store.metadata import ArtifactMetadata, ReferenceSample

SAMPLE_FILE = "reference_sample.parquet"
MAX_ROWS = 1000


def chosen_rows(rows: int, limit: int = MAX_ROWS, seed: int = 0) -> NDArray[np.intp]:
    """The positions of at most `limit` of `rows` rows, drawn at random (seeded), in order."""
    if rows <= limit:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))


def choose_rows(matrix: NDArray[Any], limit: int = MAX_ROWS) -> NDArray[Any]:
    return matrix if len(matrix) <= limit else matrix[chosen_rows(len(matrix), limit)]


def write_sample(folder: Path, matrix: NDArray[Any], features: list[str]) -> ReferenceSample:
    if matrix.ndim != 2 or matrix.shape[1] != len(features):
        raise InvalidInput(
            f"a reference sample of shape {list(matrix.shape)} for {len(features)} features"
        )
    table = pa.table({name: matrix[:, i] for i, name in enumerate(features)})
    path = folder / SAMPLE_FILE
    pq.write_table(table, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ReferenceSample(file=SAMPLE_FILE, sha256=digest, rows=len(matrix))


def store_reference_sample(folder: Path, rows: NDArray[Any]) -> ReferenceSample:
    """Keep up to MAX_ROWS of `rows` beside a packaged version and record them in metadata.json.

    The columns of `rows` are the version's features, in order.
    """
    metadata_path = folder / "metadata.json"
    metadata = ArtifactMetadata.read(metadata_path)
    sample = write_sample(folder, choose_rows(rows), metadata.features)
    metadata.model_copy(update={"reference_sample": sample}).write(metadata_path)
    return sample


def sample_problem(folder: Path, metadata: ArtifactMetadata) -> str | None:
    """Why a version's stored sample cannot be trusted; None if it has none or it is intact."""
    info = metadata.reference_sample
    if info is None:
        return None
    return stored_file_problem(folder, info.file, info.sha256, SAMPLE_FILE, "sample")


def stored_file_problem(
    folder: Path, file: str, sha256: str, expected: str, noun: str
) -> str | None:
    """Why a file kept beside an artifact does not match what metadata.json records of it."""
    if file != expected:
        return f"metadata.json names reference {noun} {file!r}; expected {expected!r}"
    path = folder / file
    if not path.is_file():
        return f"{path} is missing"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != sha256.lower():
        return (
            f"{path}: sha256 {actual[:12]}… does not match metadata.json ({sha256[:12]}…); "
            f"the {noun} was changed or corrupted"
        )
    return None


def read_stored_sample(folder: Path, metadata: ArtifactMetadata) -> NDArray[np.float32] | None:
    """The version's reference sample, checked against its sha256; None if it has none."""
    if metadata.reference_sample is None:
        return None
    problem = sample_problem(folder, metadata)
    if problem is not None:
        raise InvalidInput(f"{problem}; pass a sample file with the feature columns instead")
    path = folder / SAMPLE_FILE
    table = pq.read_table(io.BytesIO(path.read_bytes()))
    return feature_matrix(table, metadata.features, str(path), metadata.allow_nan)


def read_sample_file(path: Path, features: list[str], allow_nan: bool) -> NDArray[np.float32]:
    """A CSV or Parquet file's feature columns as a matrix; other columns are ignored."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InvalidInput(f"{path}: a sample is a .csv or .parquet file with the feature columns")
    try:
        table = pa_csv.read_csv(path) if suffix == ".csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"{path}: cannot be read as {suffix[1:].upper()}: {exc}") from exc
    return feature_matrix(table, features, str(path), allow_nan)


def feature_matrix(
    table: pa.Table, features: list[str], source: str, allow_nan: bool
) -> NDArray[np.float32]:
    missing = [f for f in features if f not in table.column_names]
    if missing:
        raise InvalidInput(
            f"{source} lacks the feature column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}"
        )
    if table.num_rows == 0:
        raise InvalidInput(f"{source} holds no rows")
    matrix = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for position, name in enumerate(features):
        column = table.column(name)
        if column.null_count and not allow_nan:  # models that handle NaN get it for a gap
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise InvalidInput(f"{source}: row {row}, column {name!r}: missing value")
        try:
            values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInput(f"{source}: column {name!r} is not numeric") from exc
        with np.errstate(over="ignore"):
            matrix[:, position] = values
        finite = np.isfinite(matrix[:, position])
        if not allow_nan and not finite.all():
            row = int(np.flatnonzero(~finite)[0]) + 1
            raise InvalidInput(
                f"{source}: row {row}, column {name!r}: not a finite number for the model"
            )
    return matrix
