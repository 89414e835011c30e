"""The audit log: each admin action through the API is one `service.audit` line naming who,
what and the result, and never the credential."""

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import run_server

ADMIN_TOKEN = "audit-admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _audit_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "service.audit":
                lines.append(entry)
    return lines


@pytest.mark.e2e
def test_load_unload_and_routing_changes_are_audited(iris_repository: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(iris_repository, root)
    env = {"MODELSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "MODELSERVE_LOG_FORMAT": "json"}
    with run_server(root, tmp_path, env=env) as server:
        repository = f"{server.url}/v2/repository/models"
        routed = httpx.put(f"{repository}/iris/routing", json={"default_version": 1}, headers=ADMIN)
        assert routed.status_code == 200, routed.text
        assert httpx.post(f"{repository}/iris/unload", headers=ADMIN).status_code == 200
        assert httpx.post(f"{repository}/iris/load", headers=ADMIN).status_code == 200
        missing = httpx.post(f"{repository}/no_such_model/load", headers=ADMIN)
        assert missing.status_code == 404
        # Refused before it acts: the credential check's answer, not an admin action.
        assert httpx.post(f"{repository}/iris/unload").status_code == 401
        output = server.output()

    lines = _audit_lines(output)
    assert [(e["action"], e["model"]) for e in lines] == [
        ("routing", "iris"),
        ("unload", "iris"),
        ("load", "iris"),
        ("load", "no_such_model"),
    ]
    for entry in lines:
        assert entry["who"] == "admin_token:admin"
        assert entry["time"]
    assert [e["result"] for e in lines[:3]] == ["ok", "ok", "ok"]
    assert lines[0]["change"] == {"default_version": 1}
    assert lines[2]["versions"] == [1, 2]
    assert lines[3]["result"].startswith("ModelNotFound: ")
    assert "not in the repository" in lines[3]["result"]
    assert lines[3]["level"] == "warning"
    assert ADMIN_TOKEN not in output
