"""API keys and the admin token over real HTTP: 401 without credentials, 403 with wrong ones."""

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, API_KEY
from tests.serving import RunningServer
from tests.test_faults import INFER, JSON, assert_serving, infer_body

MODEL_ENDPOINTS = [
    ("POST", INFER),
    ("POST", "/v1/models/iris:predict"),
    ("GET", "/v2/models/iris"),
    ("GET", "/v2/models/iris/versions/1"),
    ("GET", "/v2/models/iris/ready"),
    ("GET", "/v1/models/iris"),
]
# (path, status with the admin token, a phrase its error names)
ADMIN_ENDPOINTS = [
    ("/v2/repository/index", 200, None),
    ("/v2/repository/models/iris/load", 200, None),
    ("/v2/repository/models/no-such-model/unload", 404, "'no-such-model' is not in the repository"),
]


@pytest.fixture
def anonymous(fault_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_server.url, timeout=30.0) as http:
        yield http


@pytest.fixture(autouse=True)
def still_serving(fault_client: httpx.Client) -> Iterator[None]:
    yield
    assert_serving(fault_client)


def _send(client: httpx.Client, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}' if "v1" in path else infer_body()
    if method == "POST":
        return client.post(path, content=body, headers={**JSON, **headers})
    return client.get(path, headers=headers)


@pytest.mark.parametrize(("method", "path"), MODEL_ENDPOINTS)
def test_model_endpoints_need_an_api_key(anonymous: httpx.Client, method: str, path: str) -> None:
    missing = _send(anonymous, method, path, {})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "needs an API key" in missing.json()["error"]
    for wrong in ({"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}):
        refused = _send(anonymous, method, path, wrong)
        assert refused.status_code == 403
        assert refused.json()["error"] == "the API key is not valid"
    for right in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        assert _send(anonymous, method, path, right).status_code == 200
    assert _send(anonymous, method, path, {"X-API-Key": "second-key"}).status_code == 200


def test_a_key_of_another_scheme_is_not_a_key(anonymous: httpx.Client) -> None:
    response = anonymous.post(
        INFER, content=infer_body(), headers={**JSON, "Authorization": API_KEY}
    )
    assert response.status_code == 401
    assert "needs an API key" in response.json()["error"]


@pytest.mark.parametrize(("path", "status", "phrase"), ADMIN_ENDPOINTS)
def test_admin_endpoints_need_the_admin_token(
    anonymous: httpx.Client, path: str, status: int, phrase: str | None
) -> None:
    missing = anonymous.post(path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <admin token>" in missing.json()["error"]
    # A wrong token, and an inference key, which is not an admin token.
    for wrong in ("wrong", API_KEY):
        refused = anonymous.post(path, headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 403
        assert refused.json()["error"] == "the admin token is not valid"
    allowed = anonymous.post(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert allowed.status_code == status, allowed.text
    if phrase is not None:
        assert phrase in allowed.json()["error"]


def test_health_is_open_and_protected_metrics_need_credentials(anonymous: httpx.Client) -> None:
    assert anonymous.get("/v2/health/live").status_code == 200
    assert anonymous.get("/v2/health/ready").status_code == 200
    missing = anonymous.get("/metrics")
    assert missing.status_code == 401
    assert "send 'Authorization: Bearer <key>' or 'X-API-Key'" in missing.json()["error"]
    refused = anonymous.get("/metrics", headers={"X-API-Key": "nope"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "the credentials are not valid"
    assert anonymous.get("/metrics", headers={"X-API-Key": API_KEY}).status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert anonymous.get("/metrics", headers=admin).status_code == 200


def test_metrics_and_inference_are_open_by_default(client: httpx.Client) -> None:
    assert client.get("/metrics").status_code == 200
    assert client.post(INFER, content=infer_body(), headers=JSON).status_code == 200
