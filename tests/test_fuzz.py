"""Fuzzing: schemathesis against the served OpenAPI document, hypothesis against the decoders."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.result import Err

from service.errors import InvalidInput, PayloadTooLarge
from service.prediction.signature import conform
from service.protocols import v1, v2
from service.store.registry import LoadOptions, ModelVersion, load_registry
from tests.serving import RunningServer, run_server

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

FUZZ_ADMIN_TOKEN = "fuzz-admin-token"


@pytest.fixture(scope="module")
def fuzz_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    # A private server: the fuzzer may load and unload models through the repository API.
    root = tmp_path_factory.mktemp("fuzz") / "models"
    shutil.copytree(trained_repository, root)
    env = {"MODELSERVE_ADMIN_TOKEN": FUZZ_ADMIN_TOKEN}
    with run_server(root, tmp_path_factory.mktemp("fuzz-logs"), env=env) as running:
        yield running


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def test_api_conforms_to_its_schema(fuzz_server: RunningServer) -> None:
    """Every operation of /openapi.json, 25 generated cases each: no 5xx, no off-schema answer."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    calls = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            failures.append(f"the schema is not valid: {result.err()}")
            continue
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case[Any]) -> None:
            nonlocal calls
            calls += 1
            headers = {"Authorization": f"Bearer {FUZZ_ADMIN_TOKEN}"}
            case.call_and_validate(headers=headers, checks=CHECKS)
            if "name" in (case.path_parameters or {}) and "/repository/" not in case.path:
                # Again against a real model, so generated bodies reach the decoders.
                pinned = {"name": "iris", "version": "1"}
                case.path_parameters = {k: pinned[k] for k in case.path_parameters or {}}
                case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 15
    assert calls >= 10 * operations  # the generator really explored each operation
    assert not failures, "\n\n".join(failures)


# Any JSON document at all, nested a few levels.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
DATATYPES = st.sampled_from(
    ["FP32", "FP64", "INT32", "INT64", "BOOL", "BYTES", "UINT8", "FP16", "nope"]
)
# Requests that look like V2 infer requests, so the search reaches past the first checks.
V2_REQUESTS = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["input", "other"]),
                    "shape": st.lists(st.integers(-2, 5), max_size=3),
                    "datatype": DATATYPES,
                    "data": st.lists(JSON_VALUES, max_size=8)
                    | st.lists(
                        st.lists(st.floats(width=32) | st.integers(), max_size=5), max_size=4
                    ),
                },
                optional={
                    "parameters": st.dictionaries(
                        st.sampled_from(["binary_data_size", "x"]), JSON_VALUES
                    )
                },
            ),
            max_size=2,
        )
    },
    optional={
        "id": JSON_VALUES,
        "parameters": st.dictionaries(
            st.sampled_from(["timeout", "binary_data_output"]), JSON_VALUES
        ),
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["label", "x"])})),
    },
)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def iris(iris_repository: Path) -> ModelVersion:
    registry = load_registry(iris_repository, LoadOptions())
    return registry.resolve("iris", "1")


def decode_and_conform(model: ModelVersion, body: bytes, header_length: str | None) -> None:
    """Either well-formed arrays for the model, or an error of our tree: never anything else."""
    try:
        call = v2.decode_infer_request(body, header_length, 1000)
        arrays = conform(model, call.tensors, max_rows=1000)
    except (InvalidInput, PayloadTooLarge):
        return
    tensor = arrays["input"]
    assert tensor.dtype == np.float32
    assert tensor.ndim == 2
    assert tensor.shape[1] == 4
    assert 1 <= tensor.shape[0] <= 1000
    assert np.isfinite(tensor).all()


@given(value=JSON_VALUES)
@FUZZ
def test_any_json_decodes_or_is_invalid_input(iris: ModelVersion, value: object) -> None:
    decode_and_conform(iris, json.dumps(value).encode(), None)


@given(request=V2_REQUESTS)
@FUZZ
def test_near_valid_v2_requests_decode_or_are_invalid_input(
    iris: ModelVersion, request: dict[str, object]
) -> None:
    decode_and_conform(iris, json.dumps(request).encode(), None)


@given(body=st.binary(max_size=200), header_length=st.none() | st.text(max_size=6))
@FUZZ
def test_any_bytes_decode_or_are_invalid_input(
    iris: ModelVersion, body: bytes, header_length: str | None
) -> None:
    decode_and_conform(iris, body, header_length)


@given(rows=JSON_VALUES | st.lists(st.dictionaries(st.sampled_from([*FEATURES, "x"]), JSON_VALUES)))
@FUZZ
def test_any_v1_instances_decode_or_are_invalid_input(iris: ModelVersion, rows: object) -> None:
    try:
        tensors = v1.decode_predict_request(iris, json.dumps({"instances": rows}).encode(), 1000)
        arrays = conform(iris, tensors, max_rows=1000)
    except (InvalidInput, PayloadTooLarge):
        return
    assert arrays["input"].dtype == np.float32
    assert arrays["input"].shape[1:] == (4,)
