"""A damaged repository serves what it can; the repository extension reports and reloads."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.damage import rewrite_sha256, truncate
from tests.serving import RunningServer, run_server

TOKEN = "s3cret-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture
def damaged(repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    with (repository / "iris" / "1" / "model.joblib").open("ab") as artifact:
        artifact.write(b"tampered")
    truncate(repository / "breast_cancer" / "2" / "model.onnx")
    rewrite_sha256(repository / "breast_cancer" / "2")
    # diabetes pins default_version = 1 in its model.toml; that version now cannot load.
    (repository / "diabetes" / "1" / "metadata.json").unlink()
    (repository / "empty").mkdir()
    (repository / "empty" / "model.toml").write_text("[batching]\nmax_batch_rows = 8\n")
    with run_server(repository, tmp_path, env={"MODELSERVE_ADMIN_TOKEN": TOKEN}) as server:
        yield server


def test_broken_versions_are_reported_and_the_rest_serves(damaged: RunningServer) -> None:
    with httpx.Client(base_url=damaged.url) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/iris/versions/1/ready").status_code == 503
        refused = client.post("/v1/models/iris/versions/1:predict", json=ROW)
        assert refused.status_code == 503
        assert "hash_mismatch" in refused.json()["error"]
        assert client.post("/v1/models/iris/versions/2:predict", json=ROW).status_code == 200
        assert (
            client.post(
                "/v1/models/breast_cancer/versions/1:predict", json={"instances": [[0.0] * 30]}
            ).status_code
            == 200
        )
        index = client.post("/v2/repository/index", headers=ADMIN).json()
        states = {(e["name"], e["version"]): e for e in index}
        assert states[("iris", "1")]["state"] == "UNAVAILABLE"
        assert "hash_mismatch" in states[("iris", "1")]["reason"]
        assert "corrupt_artifact" in states[("breast_cancer", "2")]["reason"]
        assert states[("iris", "2")]["state"] == "READY"
        ready_only = client.post("/v2/repository/index", headers=ADMIN, json={"ready": True})
        assert all(e["state"] == "READY" for e in ready_only.json())
    assert "hash_mismatch" in damaged.output()


def diabetes_rows(n: int) -> dict[str, object]:
    return {
        "inputs": [{"name": "input", "shape": [n, 10], "datatype": "FP32", "data": [0.01] * 10 * n}]
    }


def test_a_pinned_default_that_did_not_load_is_not_replaced(damaged: RunningServer) -> None:
    with httpx.Client(base_url=damaged.url) as client:
        for refused in (
            client.post("/v2/models/diabetes/infer", json=diabetes_rows(1)),
            client.post("/v1/models/diabetes:predict", json={"instances": [[0.01] * 10]}),
            client.get("/v2/models/diabetes/ready"),
            client.get("/v2/models/diabetes"),
        ):
            assert refused.status_code == 503, refused.text
            message = refused.json()["error"]
            assert "default version 1" in message, message
            assert "unverified_pickle" in message, message
        # Explicit versions keep serving.
        assert client.get("/v2/models/diabetes/versions/2/ready").status_code == 200
        answer = client.post("/v2/models/diabetes/versions/2/infer", json=diabetes_rows(2))
        assert (answer.status_code, answer.json()["model_version"]) == (200, "2")
        index = client.post("/v2/repository/index", headers=ADMIN).json()
        model = next(e for e in index if e["name"] == "diabetes" and e["version"] is None)
        assert model["state"] == "UNAVAILABLE"
        assert "default version 1" in model["reason"]


def test_without_a_pin_the_highest_loaded_version_is_the_default(
    repository: Path, tmp_path: Path
) -> None:
    (repository / "diabetes" / "1" / "metadata.json").unlink()
    (repository / "iris" / "model.toml").unlink()
    (repository / "diabetes" / "model.toml").unlink()
    truncate(repository / "iris" / "2" / "model.onnx")
    with (
        run_server(repository, tmp_path) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        answer = client.post("/v2/models/diabetes/infer", json=diabetes_rows(1))
        assert (answer.status_code, answer.json()["model_version"]) == (200, "2")
        answer = client.post("/v1/models/iris:predict", json=ROW)
        assert (answer.status_code, answer.json()["model_version"]) == (200, "1")


def test_a_model_folder_without_versions_is_not_ready(damaged: RunningServer) -> None:
    with httpx.Client(base_url=damaged.url) as client:
        for refused in (client.get("/v2/models/empty/ready"), client.get("/v1/models/empty")):
            assert refused.status_code == 503, refused.text
            assert "no versions" in refused.json()["error"]
        index = client.post("/v2/repository/index", headers=ADMIN).json()
        assert [
            (e["state"], e["reason"].split(" (")[0]) for e in index if e["name"] == "empty"
        ] == [("UNAVAILABLE", "no versions")]
        assert client.get("/v2/health/ready").status_code == 200  # the server serves the rest


def test_unload_and_load(repository: Path, tmp_path: Path) -> None:
    with (
        run_server(repository, tmp_path, env={"MODELSERVE_ADMIN_TOKEN": TOKEN}) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert client.post("/v2/repository/models/iris/unload", headers=ADMIN).status_code == 200
        gone = client.post("/v1/models/iris:predict", json=ROW)
        assert gone.status_code == 503
        assert "unloaded" in gone.json()["error"]
        assert client.get("/v2/models/iris/ready").status_code == 503
        # A new version dropped into the repository is picked up by an explicit load.
        (repository / "iris" / "model.toml").write_text("default_version = 1\n")
        assert client.post("/v2/repository/models/iris/load", headers=ADMIN).status_code == 200
        answer = client.post("/v1/models/iris:predict", json=ROW).json()
        assert (answer["model_version"], answer["predictions"]) == ("1", ["setosa"])
        missing = client.post("/v2/repository/models/nope/load", headers=ADMIN)
        assert missing.status_code == 404
        assert "model 'nope' is not in the repository" in missing.json()["error"]
        traversal = client.post("/v2/repository/models/..%2F..%2Fetc/load", headers=ADMIN)
        assert traversal.status_code == 404


NEEDS_TOKEN = "repository endpoints need 'Authorization: Bearer <admin token>'"


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, NEEDS_TOKEN),
        ({"Authorization": "Bearer wrong"}, 403, "the admin token is not valid"),
        ({"Authorization": "Basic x"}, 401, NEEDS_TOKEN),
    ],
)
def test_admin_endpoints_need_the_token(
    client: httpx.Client, headers: dict[str, str], status: int, message: str
) -> None:
    response = client.post("/v2/repository/index", headers=headers)
    assert response.status_code == status
    assert response.json()["error"] == message


def test_admin_endpoints_are_off_without_a_token(repository: Path, tmp_path: Path) -> None:
    with run_server(repository, tmp_path) as server:
        response = httpx.post(f"{server.url}/v2/repository/index", headers=ADMIN)
        assert response.status_code == 403
        assert "MODELSERVE_ADMIN_TOKEN" in response.json()["error"]
