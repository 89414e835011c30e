"""Checks request tensors against a model's signature before the model runs."""

from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput, PayloadTooLarge
from service.store.registry import ModelVersion
from service.store.runtimes import Arrays
from service.store.tensors import TensorSpec

# The ufunc reductions themselves: ndarray.all() and .max() go through a Python function each.
_ALL = np.logical_and.reduce
_MAX = np.maximum.reduce
# The largest finite value of each floating-point dtype a model may take.
_FLOAT_MAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float16, np.float32, np.float64)}


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
    allow_nan = model.allow_nan
    if array.dtype != spec.dtype:
        if kind == "f" and spec.dtype.kind in "iu":
            raise InvalidInput(
                f"{_where(model, spec)}: expected {spec.datatype} integers, got floating point"
            )
        largest = _FLOAT_MAX.get(spec.dtype) if kind == "f" and not allow_nan else None
        if largest is not None and array.size and _MAX(np.abs(array), axis=None) <= largest:
            # Finite and within the target's range (NaN compares false): the cast can neither
            # overflow nor give a value the check below refuses.
            return array.astype(spec.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(spec.dtype)
    if array.dtype.kind == "f" and not allow_nan and not _ALL(np.isfinite(array), axis=None):
        raise InvalidInput(
            f"{_where(model, spec)}: contains NaN, Infinity or a value out of {spec.datatype} range"
        )
    return array


def _where(model: ModelVersion, spec: TensorSpec) -> str:
    return f"input {spec.name!r} of {_describe(model)}"


def conform(model: ModelVersion, tensors: dict[str, NDArray[Any]], max_rows: int) -> Arrays:
    """Match request tensors to the model's inputs by name; every input exactly once."""
    specs = model.signature.inputs
    if len(specs) == 1 and len(tensors) == 1:
        spec = specs[0]
        array = tensors.get(spec.name)
        if array is not None:  # the one input, by its name: nothing to match
            return {spec.name: conform_tensor(model, spec, array, max_rows)}
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
