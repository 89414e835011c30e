"""With MODELSERVE_REPOSITORY_POLL_S set, models that appear, change or vanish on disk follow."""

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from service.server.polling import changed_models
from service.store.registry import LoadOptions, load_registry
from tests.serving import run_server

ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
TOKEN = "poll-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_polling_follows_the_repository(repository: Path, tmp_path: Path) -> None:
    spare = tmp_path / "spare"
    shutil.move(repository / "iris", spare)
    with (
        run_server(
            repository,
            tmp_path,
            env={"MODELSERVE_REPOSITORY_POLL_S": "0.3", "MODELSERVE_ADMIN_TOKEN": "poll-admin"},
        ) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert client.post("/v1/models/iris:predict", json=ROW).status_code == 404
        shutil.move(spare, repository / "iris")
        assert eventually(
            lambda: client.post("/v1/models/iris:predict", json=ROW).status_code == 200
        )
        with (repository / "iris" / "2" / "model.onnx").open("ab") as artifact:
            artifact.write(b"tampered")
        # A serving version whose artifact changes to one that does not load keeps serving the
        # artifact it verified, and says so in the index.
        admin = {"Authorization": "Bearer poll-admin"}

        def stale() -> bool:
            index = client.post("/v2/repository/index", headers=admin).json()
            return any(
                e["name"] == "iris" and e.get("version") == "2" and "hash_mismatch" in e["reason"]
                for e in index
            )

        assert eventually(stale)
        assert client.get("/v2/models/iris/versions/2/ready").status_code == 200
        assert client.post("/v1/models/iris:predict", json=ROW).json()["model_version"] == "2"
        shutil.rmtree(repository / "diabetes")
        assert eventually(lambda: client.get("/v2/models/diabetes").status_code == 404)


def test_polling_logs_the_models_that_leave(repository: Path, tmp_path: Path) -> None:
    env = {
        "MODELSERVE_REPOSITORY_POLL_S": "0.3",
        "MODELSERVE_LOG_FORMAT": "json",
        "MODELSERVE_ADMIN_TOKEN": TOKEN,
    }
    with (
        run_server(repository, tmp_path, env=env) as server,
        httpx.Client(base_url=server.url, headers=ADMIN) as client,
    ):
        assert client.post("/v2/repository/models/breast_cancer/unload").status_code == 200
        shutil.rmtree(repository / "diabetes")
        shutil.rmtree(repository / "breast_cancer")  # unloaded first: known, but not served

        def left() -> list[str | None]:
            records = map(json.loads, server.output().splitlines())
            return sorted(r.get("model") for r in records if "left the repository" in r["message"])

        assert eventually(lambda: len(left()) >= 2), server.output()
        assert left() == ["breast_cancer", "diabetes"]
        # Forgotten, not "unloaded": there is nothing left to load.
        assert client.get("/v2/models/breast_cancer").status_code == 404
        assert client.get("/v2/models/diabetes").status_code == 404


def test_polling_watches_a_single_model_folder(repository: Path) -> None:
    folder = repository / "iris" / "2"
    registry = load_registry(folder, LoadOptions(model_name="flowers"))
    assert changed_models(registry, folder, "flowers") == ([], [])
    with (folder / "model.onnx").open("ab") as artifact:
        artifact.write(b"tampered")
    assert changed_models(registry, folder, "flowers") == (["flowers"], [])
