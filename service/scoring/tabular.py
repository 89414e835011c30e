"""Tables and the model's tensors: feature columns in, prediction columns out, row by row checks.

Batch scoring works on Arrow tables whatever the file format. A bad value fails only its
row: the features of the good rows go to the model, and each bad row is described by a
`RowError` naming its row and column, so the caller can either stop or emit the row with an
`error` column.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from service.errors import InvalidInput
from service.protocols.files import RowError
from service.store.registry import ModelVersion
from service.store.runtimes import Prediction

ERROR_COLUMN = "error"


@dataclass
class Features:
    """The model input of a chunk: only its good rows, and why the others were set aside."""

    matrix: NDArray[Any]
    good: NDArray[np.bool_]
    errors: list[RowError] = field(default_factory=list)


def feature_names(model: ModelVersion) -> list[str]:
    """The columns a model reads; only models with one named 2-D input can score tables."""
    signature = model.signature
    inputs = signature.inputs
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or not signature.features:
        raise InvalidInput(
            f"model {model.name!r} version {model.version} has no single input with named "
            "features, so it cannot score tables; use the V2 infer endpoint"
        )
    return signature.features


def check_columns(model: ModelVersion, columns: list[str]) -> None:
    """Refuse a table without every feature column, or with a column named twice."""
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise InvalidInput(f"column {column!r} appears more than once in the header")
        seen.add(column)
    missing = [f for f in feature_names(model) if f not in seen]
    if missing:
        raise InvalidInput(
            f"missing feature column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} for model {model.name!r} "
            f"version {model.version}"
        )


def _parse_text(values: list[Any]) -> tuple[NDArray[np.float64], list[tuple[int, str]]]:
    """The slow path for a text column that did not convert at once: find the bad cells."""
    numbers = np.empty(len(values), dtype=np.float64)
    bad: list[tuple[int, str]] = []
    for index, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            bad.append((index, "missing value"))
            numbers[index] = np.nan
            continue
        try:
            numbers[index] = float(value)
        except (TypeError, ValueError):
            bad.append((index, f"not a number: {str(value)[:40]!r}"))
            numbers[index] = np.nan
    return numbers, bad


def _column_values(column: Any) -> tuple[NDArray[np.float64], list[tuple[int, str]]]:
    """A column as float64, with the cells that are not numbers."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        numbers = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        missing = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        return np.asarray(numbers, dtype=np.float64), [(int(i), "missing value") for i in missing]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            numbers = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return _parse_text(column.to_pylist())
        if column.null_count == 0:
            return np.asarray(numbers, dtype=np.float64), []
    if pa.types.is_null(kind):
        return np.full(len(column), np.nan), [(i, "missing value") for i in range(len(column))]
    return _parse_text(column.to_pylist())


def extract_features(
    model: ModelVersion, table: pa.Table, unreadable: list[RowError] | None = None
) -> Features:
    """The feature matrix of a table in the model's dtype, setting aside rows that cannot run.

    `unreadable` are rows that the decoder could not read; they are set aside first.
    """
    names = feature_names(model)
    spec = model.signature.inputs[0]
    allow_nan = model.allow_nan
    rows = table.num_rows
    matrix = np.empty((rows, len(names)), dtype=spec.dtype)
    first_error: dict[int, RowError] = {}
    for error in unreadable or []:
        first_error.setdefault(error.row, error)
    present = set(table.column_names)
    for position, name in enumerate(names):
        if name in present:
            values, bad = _column_values(table.column(name))
        else:  # NDJSON rows may all leave a key out
            values, bad = np.full(rows, np.nan), [(i, "missing value") for i in range(rows)]
        with np.errstate(over="ignore", invalid="ignore"):
            matrix[:, position] = values
        if allow_nan:  # missing values reach the model as NaN, which it handles
            bad = [(row, reason) for row, reason in bad if reason != "missing value"]
        else:
            finite = np.isfinite(matrix[:, position])
            flagged = {row for row, _ in bad}
            bad += [
                (int(row), "not a finite number for the model")
                for row in np.flatnonzero(~finite)
                if int(row) not in flagged
            ]
        for row, reason in bad:
            first_error.setdefault(row, RowError(row, name, reason))
    good = np.ones(rows, dtype=np.bool_)
    errors = sorted(first_error.values(), key=lambda e: e.row)
    if errors:
        good[[e.row for e in errors]] = False
        matrix = matrix[good]
    return Features(matrix, good, errors)


def _spread(values: NDArray[Any], good: NDArray[np.bool_]) -> Any:
    """An Arrow column over all rows of a chunk, null where the row was set aside."""
    if good.all():
        return pa.array(values)
    text = values.dtype.kind in "UO"
    full = np.empty(len(good), dtype=object if text else values.dtype)
    full[good] = values
    # Typed from the model's output, not from the values: a chunk of only bad rows has none,
    # and its columns must have the types of every other chunk's.
    kind = pa.string() if text else pa.from_numpy_dtype(values.dtype)
    return pa.array(full, mask=~good, type=kind)


def _labels(classes: list[str], index: NDArray[np.intp], good: NDArray[np.bool_]) -> Any:
    """Text labels taken from the classes by each row's position: no string object per row."""
    if not good.all():
        full = np.zeros(len(good), dtype=np.intp)
        full[good] = index
        return pa.array(classes).take(pa.array(full, mask=~good))
    return pa.array(classes).take(pa.array(index))


def prediction_columns(
    model: ModelVersion, prediction: Prediction, good: NDArray[np.bool_]
) -> list[tuple[str, Any]]:
    """`label` and `probability_<class>` for classifiers, `prediction` for regressors."""
    signature = model.signature
    outputs = prediction.outputs
    columns: list[tuple[str, Any]] = []
    if "label" in outputs:
        texts = [c for c in signature.classes or [] if isinstance(c, str)]
        positions = prediction.label_index
        if positions is not None and texts and len(texts) == len(signature.classes or []):
            columns.append(("label", _labels(texts, positions, good)))
        else:
            columns.append(("label", _spread(np.asarray(outputs["label"]), good)))
        probabilities = outputs.get("probabilities")
        if probabilities is not None:
            classes = signature.classes or list(range(probabilities.shape[1]))
            for index, name in enumerate(classes):
                columns.append((f"probability_{name}", _spread(probabilities[:, index], good)))
        return columns
    if "prediction" in outputs:
        return [("prediction", _spread(np.asarray(outputs["prediction"]), good))]
    for name, array in outputs.items():
        if array.ndim == 1:
            columns.append((name, _spread(array, good)))
        else:
            flat = array.reshape(len(array), -1)
            columns += [(f"{name}_{i}", _spread(flat[:, i], good)) for i in range(flat.shape[1])]
    return columns


def error_column(errors: list[RowError], rows: int, first_row: int) -> Any:
    messages: list[str | None] = [None] * rows
    for error in errors:
        messages[error.row] = error.describe(first_row)
    return pa.array(messages, type=pa.string())


def append_columns(table: pa.Table, columns: list[tuple[str, Any]]) -> pa.Table:
    """The input's columns, then the new ones; an input column of the same name is replaced."""
    names = {name for name, _ in columns}
    kept = [n for n in table.column_names if n not in names]
    result = table.select(kept)
    for name, column in columns:
        result = result.append_column(name, column)
    return result


def check_rows(features: Features, first_row: int, on_error: str) -> None:
    """With on_error=fail, the first bad row stops the scoring."""
    if features.errors and on_error == "fail":
        raise InvalidInput(features.errors[0].describe(first_row))


def scored_table(
    model: ModelVersion,
    table: pa.Table,
    features: Features,
    prediction: Prediction,
    first_row: int,
    on_error: str,
) -> pa.Table:
    """The input's columns with the prediction columns (and `error` when skipping) added."""
    columns = prediction_columns(model, prediction, features.good)
    if on_error == "skip":
        columns.append((ERROR_COLUMN, error_column(features.errors, table.num_rows, first_row)))
    return append_columns(table, columns)
