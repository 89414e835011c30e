"""The signature check converts what it can and names what it cannot."""

from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidInput, PayloadTooLarge
from service.prediction.signature import conform
from service.protocols.arrays import array_from_values
from service.store.registry import LoadOptions, ModelVersion, load_registry


@pytest.fixture(scope="module")
def iris(iris_repository: Path) -> ModelVersion:
    return load_registry(iris_repository, LoadOptions()).resolve("iris", "2")


def test_conversion_to_the_model_dtype(iris: ModelVersion) -> None:
    arrays = conform(iris, {"input": np.array([[1, 2, 3, 4]], dtype=np.int64)}, 10)
    assert arrays["input"].dtype == np.float32


def test_a_shape_of_another_rank_is_refused_naming_the_shape_wanted(iris: ModelVersion) -> None:
    with pytest.raises(InvalidInput, match=r"expected shape \[-1, 4\], got \[4\]"):
        conform(iris, {"input": np.array([1.0, 2, 3, 4])}, 10)


@pytest.mark.parametrize(
    ("array", "given"),
    [
        (np.array([["5.1", "3.5", "1.4", "0.2"]], dtype=object), "BYTES"),
        (np.ones((1, 4), bool), "BOOL"),
    ],
)
def test_a_datatype_of_another_kind_is_refused_naming_the_one_wanted(
    iris: ModelVersion, array: np.ndarray, given: str
) -> None:
    with pytest.raises(InvalidInput, match=f"datatype {given} given; this input takes FP32"):
        conform(iris, {"input": array}, 10)


def test_row_limit(iris: ModelVersion) -> None:
    with pytest.raises(PayloadTooLarge, match="limit of 2"):
        conform(iris, {"input": np.ones((3, 4))}, 2)


def test_missing_input(iris: ModelVersion) -> None:
    with pytest.raises(InvalidInput, match="missing input 'input'"):
        conform(iris, {}, 10)


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ([[1, 2], [3]], "ragged"),
        ([["a", 1]], "strings"),
        ([[None, 1]], "null"),
        ([True, False], "booleans"),
    ],
)
def test_values_that_are_not_a_rectangle_of_numbers(values: object, phrase: str) -> None:
    with pytest.raises(InvalidInput, match=phrase):
        array_from_values(values, "FP32", "input")


def test_nan_is_refused_unless_the_model_allows_it(iris: ModelVersion) -> None:
    with pytest.raises(InvalidInput, match="NaN"):
        conform(iris, {"input": np.array([[np.nan, 1, 2, 3]])}, 10)
