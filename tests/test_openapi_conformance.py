"""Real V2 responses validate against the Open Inference Protocol's own OpenAPI schemas."""

from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests.serving import RunningServer

SPEC = yaml.safe_load((Path(__file__).parent / "specs" / "open_inference_rest.yaml").read_text())


def validate(instance: Any, schema_name: str) -> None:
    # OpenAPI 3.0 schemas are JSON Schema with local $refs into components.schemas.
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.validate(instance, schema)


def test_server_metadata(client: httpx.Client) -> None:
    validate(client.get("/v2").json(), "metadata_server_response")


@pytest.mark.parametrize(
    "path", ["/v2/models/iris", "/v2/models/iris/versions/1", "/v2/models/diabetes/versions/2"]
)
def test_model_metadata(client: httpx.Client, path: str) -> None:
    validate(client.get(path).json(), "metadata_model_response")


@pytest.mark.parametrize("model", ["iris", "breast_cancer", "diabetes"])
@pytest.mark.parametrize("version", ["1", "2"])
def test_inference_response(client: httpx.Client, model: str, version: str) -> None:
    width = client.get(f"/v2/models/{model}").json()["inputs"][0]["shape"][1]
    request = {
        "id": "c1",
        "inputs": [
            {
                "name": "input",
                "shape": [2, width],
                "datatype": "FP32",
                "data": [[0.5] * width, [1.0] * width],
            }
        ],
    }
    validate(request, "inference_request")
    response = client.post(f"/v2/models/{model}/versions/{version}/infer", json=request)
    assert response.status_code == 200
    validate(response.json(), "inference_response")


def test_error_response(client: httpx.Client) -> None:
    response = client.post("/v2/models/iris/infer", json={"inputs": "nope"})
    assert response.status_code == 400
    validate(response.json(), "inference_error_response")
    validate(client.get("/v2/models/nope").json(), "metadata_model_error_response")


def test_the_scoring_endpoint_is_documented_with_its_file_formats(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/models/{name}:score", "/v1/models/{name}/versions/{version}:score"):
        operation = paths[path]["post"]
        formats = {"text/csv", "application/x-ndjson", "application/vnd.apache.parquet"}
        assert set(operation["requestBody"]["content"]) == formats
        assert set(operation["responses"]["200"]["content"]) == formats
        assert {p["name"] for p in operation["parameters"]} >= {"name", "on_error", "chunk_rows"}


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v2/nothing/here"), ("POST", "/v2/health/ready")]
)
def test_framework_errors_are_error_objects(client: httpx.Client, method: str, path: str) -> None:
    validate(client.request(method, path).json(), "inference_error_response")


def served(client: httpx.Client, schema_name: str) -> dict[str, Any]:
    """A schema of the service's own OpenAPI document, which clients generate code from."""
    components = client.get("/openapi.json").json()["components"]
    return {"$ref": f"#/components/schemas/{schema_name}", "components": components}


@pytest.mark.parametrize("path", ["/v1/models/iris", "/v1/models/iris/versions/production"])
def test_v1_model_status(client: httpx.Client, path: str) -> None:
    jsonschema.validate(client.get(path).json(), served(client, "ModelStatus"))


def test_v1_liveness(client: httpx.Client) -> None:
    """KServe's model server answers its V1 liveness at the root path with this body."""
    answer = client.get("/").json()
    assert answer == {"status": "alive"}
    jsonschema.validate(answer, served(client, "ServerStatus"))


def test_v1_status_of_a_model_that_is_not_ready(damaged_server: RunningServer) -> None:
    with httpx.Client(base_url=damaged_server.url) as client:
        response = client.get("/v1/models/diabetes")
        assert response.status_code == 503
        jsonschema.validate(response.json(), served(client, "ModelStatusError"))
        validate(response.json(), "metadata_model_error_response")
        documented = client.get("/openapi.json").json()["paths"]["/v1/models/{name}"]["get"]
        schema = documented["responses"]["503"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ModelStatusError"}
