"""V1 (TF Serving / KServe V1 style): {"instances": rows} in, {"predictions": ...} out."""

from typing import Any

import orjson
from numpy.typing import NDArray

from service.errors import InvalidInput, PayloadTooLarge
from service.protocols import envelope
from service.protocols.arrays import (
    array_from_json,
    array_from_values,
    array_with_nulls,
    values_with_nulls,
)
from service.protocols.v2 import json_array, labels_by_class
from service.store.registry import ModelVersion
from service.store.runtimes import Prediction


def _rows_from_objects(model: ModelVersion, rows: list[Any]) -> list[list[Any]]:
    features = model.signature.features
    if not features:
        raise InvalidInput(f"model {model.name!r} has no feature names; send rows as lists")
    wanted = set(features)
    table: list[list[Any]] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInput(f"instances[{index}]: mix of objects and lists; use one form")
        missing = [f for f in features if f not in row]
        if missing:
            raise InvalidInput(
                f"instances[{index}]: missing feature {missing[0]!r} "
                f"(model {model.name!r} needs {', '.join(features)})"
            )
        extra = [k for k in row if k not in wanted]
        if extra:
            raise InvalidInput(
                f"instances[{index}]: unknown feature {extra[0]!r} "
                f"(model {model.name!r} needs {', '.join(features)})"
            )
        values = [row[f] for f in features]
        if any(value.__class__ is bool for value in values):
            raise InvalidInput(f"instances[{index}]: values must be numbers, got booleans")
        table.append(values)
    return table


def decode_predict_request(
    model: ModelVersion, body: bytes | bytearray, max_rows: int
) -> dict[str, NDArray[Any]]:
    """The one input tensor; more than `max_rows` rows are refused before the numbers are parsed."""
    request = envelope.fields(
        body, 'the request body must be a JSON object such as {"instances": [[...]]}'
    )
    unknown = [k for k in request if k not in ("instances", "inputs")]
    if unknown:
        raise InvalidInput(
            f'unknown field {unknown[0]!r}: the request body holds only "instances" (or "inputs")'
        )
    if len(request) != 1:
        raise InvalidInput('the request body must have exactly one of "instances" or "inputs"')
    rows = next(iter(request.values()))
    keyed = envelope.first_item_is_object(rows)
    if keyed is None:
        raise InvalidInput('"instances" must be a list of rows')
    if len(model.signature.inputs) != 1:
        raise InvalidInput(f"model {model.name!r} takes several inputs; use the V2 protocol")
    spec = model.signature.inputs[0]

    def check(shape: tuple[int, ...]) -> None:
        count = shape[0] if len(shape) > 1 else 1
        if count > max_rows:
            raise PayloadTooLarge(f"instances: {count} rows is more than the limit of {max_rows}")

    # JSON has no NaN: a model that takes missing values takes them as nulls.
    nulls = model.allow_nan
    if keyed:
        table = _rows_from_objects(model, envelope.value(rows))
        if nulls:
            array = values_with_nulls(table, "instances", check)
        else:
            array = array_from_values(table, None, "instances")
            check(array.shape)
    elif nulls and b"null" in bytes(rows):
        array = array_with_nulls(memoryview(rows), "instances", check)
    else:
        array = array_from_json(memoryview(rows), None, "instances", check)
    if array.ndim == 1 and len(spec.shape) == 2 and array.size == spec.shape[1]:
        array = array.reshape(1, -1)  # V1's one row sent as a flat list
    return {spec.name: array}


def encode_predict_response(model: ModelVersion, prediction: Prediction) -> bytes:
    """The answer; labels go per class when the prediction carries their class positions."""
    signature = model.signature
    outputs = prediction.outputs
    response: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if "label" in outputs:
        by_class = labels_by_class(model, outputs["label"], prediction.label_index)
        if by_class:
            response["predictions"] = by_class[0].values(by_class[1])
        else:
            response["predictions"] = json_array(outputs["label"])
        if "probabilities" in outputs:
            response["probabilities"] = json_array(outputs["probabilities"])
            response["classes"] = signature.classes
    elif "prediction" in outputs:
        response["predictions"] = json_array(outputs["prediction"])
    else:
        first = signature.outputs[0].name
        response["predictions"] = json_array(outputs[first])
        response["outputs"] = {k: json_array(v) for k, v in outputs.items()}
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
