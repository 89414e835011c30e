"""One chunk of a table through a model: typed, features out, checked, predicted, predictions in.

The `:score` endpoint, offline file scoring and `service.scoring.score` all score a chunk here;
they differ only in how the model is called (through the server's batcher, or directly).
"""

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from service.protocols.files import Chunk
from service.scoring.columns import ColumnTypes, apply_column_types
from service.scoring.tabular import check_rows, extract_features, scored_table
from service.store.registry import ModelVersion
from service.store.runtimes import Arrays, Prediction, Signature

Predict = Callable[[Arrays], Prediction]


def empty_outputs(signature: Signature) -> Arrays:
    """Zero-row outputs of the signature's types, for a chunk whose every row was set aside."""
    outputs: Arrays = {}
    for spec in signature.outputs:
        shape = [0 if axis == 0 or size < 0 else size for axis, size in enumerate(spec.shape)]
        if spec.name == "label" and signature.classes:
            # The labels' own type (text or numbers), as the model would return them.
            outputs[spec.name] = np.asarray(signature.classes)[:0]
        else:
            outputs[spec.name] = np.empty(shape, dtype=spec.dtype)
    return outputs


def score_chunk(
    model: ModelVersion,
    chunk: Chunk,
    first_row: int,
    on_error: str,
    predict: Predict,
    types: ColumnTypes | None = None,
) -> pa.Table:
    """The chunk with its prediction columns (and `error` when skipping bad rows), its
    columns first cast to the job's `types`."""
    if types:
        chunk = apply_column_types(chunk, types)
    features = extract_features(model, chunk.table, chunk.errors)
    check_rows(features, first_row, on_error)
    if features.good.any():
        prediction = predict({model.signature.inputs[0].name: features.matrix})
    else:
        prediction = Prediction(empty_outputs(model.signature))
    return scored_table(model, chunk.table, features, prediction, first_row, on_error)
