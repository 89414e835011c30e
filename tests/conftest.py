"""Shared fixtures: a repository of real example models and a real server serving it."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import RunningServer, run_server
from training.examples import train_examples

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def trained_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models trained once per test session (seeded, from scikit-learn data)."""
    root = tmp_path_factory.mktemp("trained") / "models"
    for config in (ROOT / "models").glob("*/model.toml"):
        (root / config.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(config, root / config.parent.name / "model.toml")
    train_examples(root)
    return root


@pytest.fixture
def repository(trained_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the trained repository that a test may break or extend."""
    copy = tmp_path / "models"
    shutil.copytree(trained_repository, copy)
    return copy


@pytest.fixture(scope="session")
def server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One real `modelserve serve` process over the example models, shared by read-only tests."""
    with run_server(
        trained_repository,
        tmp_path_factory.mktemp("logs"),
        env={"MODELSERVE_ADMIN_TOKEN": "test-admin-token"},
    ) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        yield http
