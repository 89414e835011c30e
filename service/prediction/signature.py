"""Checks request tensors against a model's signature before the model runs."""

from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput, PayloadTooLarge
from service.store.registry import ModelVersion
from service.store.runtimes import Arrays
from service.store.tensors import TensorSpec


def _describe(model: ModelVersion) -> str:
    return f"model {model.name!r} version {model.version}"


def _expected_names(model: ModelVersion) -> str:
    return ", ".join(repr(s.name) for s in model.signature.inputs)


def _check_shape(
    model: ModelVersion, spec: TensorSpec, array: NDArray[Any], max_rows: int, where: str
) -> NDArray[Any]:
    rank = len(spec.shape)
    if rank and array.size == 0:
        raise InvalidInput(f"{where}: empty batch; send at least one row")
    if array.ndim != rank:
        # As Triton does: a shape of another rank is refused, never guessed at.
        one_row = [1 if size < 0 else size for size in spec.shape]
        raise InvalidInput(
            f"{where}: expected shape {spec.shape}, got {list(array.shape)} "
            f"(-1 is any size: one row is {one_row})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if want >= 0 and want != got:
            if axis == 1 and model.signature.features:
                raise InvalidInput(
                    f"{where}: each row needs {want} features "
                    f"({', '.join(model.signature.features)}), got {got}"
                )
            raise InvalidInput(f"{where}: expected shape {spec.shape}, got {list(array.shape)}")
    if rank and array.shape[0] > max_rows:
        raise PayloadTooLarge(
            f"{where}: {array.shape[0]} rows is more than the limit of {max_rows}"
        )
    return array


def conform_tensor(
    model: ModelVersion, spec: TensorSpec, array: NDArray[Any], max_rows: int
) -> NDArray[Any]:
    """Reshape, bound and convert one tensor to the exact dtype the model takes."""
    if (
        array.ndim == len(spec.shape) == 2
        and spec.shape[0] in (-1, array.shape[0])
        and spec.shape[1] in (-1, array.shape[1])
        and 0 < array.shape[0] <= max_rows
        and array.size
        and array.dtype.kind == "f"
        and spec.dtype.kind == "f"
    ):
        pass  # the common case, a table of floats with the right width: nothing to explain
    else:
        array = _check_shape(model, spec, array, max_rows, _where(model, spec))
        if spec.datatype == "BYTES":
            return array
    kind = array.dtype.kind
    given = "BYTES" if kind in "OUS" else "BOOL" if kind == "b" else None
    if given is not None and given != spec.datatype:
        raise InvalidInput(
            f"{_where(model, spec)}: datatype {given} given; this input takes {spec.datatype}"
        )
    if array.dtype != spec.dtype:
        if kind == "f" and spec.dtype.kind in "iu":
            raise InvalidInput(
                f"{_where(model, spec)}: expected {spec.datatype} integers, got floating point"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(spec.dtype)
    allow_nan = model.allow_nan
    if array.dtype.kind == "f" and not allow_nan and not np.isfinite(array).all():
        raise InvalidInput(
            f"{_where(model, spec)}: contains NaN, Infinity or a value out of {spec.datatype} range"
        )
    return array


def _where(model: ModelVersion, spec: TensorSpec) -> str:
    return f"input {spec.name!r} of {_describe(model)}"


def conform(model: ModelVersion, tensors: dict[str, NDArray[Any]], max_rows: int) -> Arrays:
    """Match request tensors to the model's inputs by name; every input exactly once."""
    specs = model.signature.inputs
    names = {s.name for s in specs}
    unknown = [name for name in tensors if name not in names]
    if unknown:
        raise InvalidInput(
            f"unknown input {unknown[0]!r} for {_describe(model)}; "
            f"it takes {_expected_names(model)}"
        )
    missing = [s.name for s in specs if s.name not in tensors]
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r} for {_describe(model)}")
    arrays = {s.name: conform_tensor(model, s, tensors[s.name], max_rows) for s in specs}
    rows = {a.shape[0] for a in arrays.values() if a.ndim}
    if len(rows) > 1:
        raise InvalidInput(
            f"inputs of {_describe(model)} have different row counts: {sorted(rows)}"
        )
    return arrays
