"""Shared fixtures: a repository of real example models and a real server serving it.

Tests fall into two layers. The end-to-end layer (marker `e2e`) starts processes or needs the
whole trained example repository; everything else is the fast layer, `pytest -m "not e2e"`.
"""

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import serving
from tests.damage import tamper
from tests.models_for_faults import add_fault_models
from tests.prometheus import Prometheus, run_prometheus
from tests.serving import RunningServer, run_server, wait_for
from training.examples import EXAMPLES, Example, train_example

ROOT = Path(__file__).resolve().parent.parent
# A test that asks for one of these (directly or through another fixture) is end-to-end.
E2E_FIXTURES = frozenset(
    {"trained_repository", "server", "fault_server", "workers_server", "prometheus"}
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--recipes",
        action="store_true",
        help="run the README's Spark and Ray recipes (the `recipes` extra and a JRE; "
        "scripts/recipes.sh installs them and runs these tests)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Installing pyspark and Ray takes minutes: their tests run when asked for, and then a
    # missing package fails them (tests/test_recipes.py).
    recipes = config.getoption("--recipes")
    for item in items:
        if isinstance(item, pytest.Function) and E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
        if not recipes and item.get_closest_marker("recipes") is not None:
            item.add_marker(
                pytest.mark.skip(
                    reason="the Spark and Ray recipes run with --recipes: scripts/recipes.sh"
                )
            )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the test's fixtures are set up, so that a server fixture is checked too.
    serving.allow_servers(item.get_closest_marker("e2e") is not None)


def copy_examples(source: Path, target: Path, examples: Sequence[Example] = EXAMPLES) -> None:
    """The bundled example models' folders of the repository `source` (their model.toml, no
    artifacts), copied to `target`. A model a user added to `source` is not one the tests know,
    so it is left out."""
    for example in examples:
        folder = target / example.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / example.name / "model.toml", folder / "model.toml")


def example_repository(source: Path, target: Path, examples: Sequence[Example] = EXAMPLES) -> Path:
    """The example models of the repository `source`, trained into `target`."""
    copy_examples(source, target, examples)
    for example in examples:
        train_example(example, target)
    return target


@pytest.fixture(scope="session")
def trained_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models trained once per test session (seeded, from scikit-learn data)."""
    return example_repository(ROOT / "models", tmp_path_factory.mktemp("trained") / "models")


@pytest.fixture(scope="session")
def iris_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The iris example alone (version 1 joblib, version 2 ONNX), for the fast layer's tests
    that need one real model and only read it."""
    iris = [e for e in EXAMPLES if e.name == "iris"]
    return example_repository(ROOT / "models", tmp_path_factory.mktemp("iris") / "models", iris)


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


@pytest.fixture(scope="session")
def damaged_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The example models with broken versions: iris version 1 (alias `stable`) was tampered
    with, so iris serves version 2 only; both diabetes versions were, so diabetes is not ready."""
    root = tmp_path_factory.mktemp("damaged") / "models"
    shutil.copytree(trained_repository, root)
    for version_dir in (root / "iris" / "1", root / "diabetes" / "1", root / "diabetes" / "2"):
        tamper(version_dir)
    with run_server(root, tmp_path_factory.mktemp("damaged-logs")) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        yield http


# The fault server: the example iris model beside misbehaving ones, with tight limits and auth.
API_KEY = "fault-key-1"
ADMIN_TOKEN = "fault-admin-token"
FAULT_LIMITS = {
    "MODELSERVE_MAX_REQUEST_BYTES": "1000000",
    "MODELSERVE_MAX_BATCH_ROWS": "1000",
    "MODELSERVE_REQUEST_TIMEOUT_S": "3",
    "MODELSERVE_MAX_QUEUE_REQUESTS": "4",
    "MODELSERVE_BODY_IDLE_TIMEOUT_S": "2",
}


@dataclass(frozen=True)
class FaultSetup:
    root: Path  # the model repository
    base: Path  # its parent, which also holds a model folder outside the repository
    audit_log: Path  # every file the server opened under `base` (tests/audit)


def fault_env(setup: FaultSetup, **extra: str) -> dict[str, str]:
    """Environment for a server that can unpickle the test models and is audited."""
    return {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "audit"), str(ROOT)]),
        "MODELSERVE_TEST_AUDIT_LOG": str(setup.audit_log),
        "MODELSERVE_TEST_AUDIT_PREFIX": str(setup.base),
        **extra,
    }


@pytest.fixture(scope="session")
def fault_setup(trained_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultSetup:
    base = tmp_path_factory.mktemp("faults")
    root = base / "models"
    shutil.copytree(trained_repository / "iris", root / "iris")
    add_fault_models(root, tmp_path_factory.mktemp("artifacts"))
    # A servable model just outside the repository: the target of path traversal attempts.
    shutil.copytree(trained_repository / "iris", base / "outside")
    return FaultSetup(root, base, tmp_path_factory.mktemp("audit") / "audit.log")


@pytest.fixture(scope="session")
def fault_server(
    fault_setup: FaultSetup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = fault_env(
        fault_setup,
        MODELSERVE_API_KEYS=f"{API_KEY},second-key",
        MODELSERVE_ADMIN_TOKEN=ADMIN_TOKEN,
        MODELSERVE_PROTECT_METRICS="true",
        **FAULT_LIMITS,
    )
    with run_server(fault_setup.root, tmp_path_factory.mktemp("fault-logs"), env=env) as running:
        yield running


@pytest.fixture
def fault_client(fault_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fault_server.url, timeout=30.0, headers={"X-API-Key": API_KEY}
    ) as http:
        yield http


@pytest.fixture(scope="session")
def workers_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A two-worker server with JSON logs, over the examples plus iris version 3, whose
    truncated artifact fails to load (so load failures have a series)."""
    root = tmp_path_factory.mktemp("workers") / "models"
    shutil.copytree(trained_repository, root)
    broken = root / "iris" / "3"
    shutil.copytree(root / "iris" / "1", broken)
    artifact = next(broken.glob("model.*"))
    artifact.write_bytes(artifact.read_bytes()[:100])
    with run_server(
        root,
        tmp_path_factory.mktemp("workers-logs"),
        env={"MODELSERVE_LOG_FORMAT": "json", "MODELSERVE_ADMIN_TOKEN": "test-admin-token"},
        args=("--workers", "2"),
    ) as running:
        # Ready means one worker answers; the tests need both serving.
        wait_for(lambda: running.output().count("Application startup complete") >= 2)
        yield running


@pytest.fixture(scope="session")
def prometheus(
    workers_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real Prometheus scraping the two-worker server every second."""
    target = workers_server.url.removeprefix("http://")
    with run_prometheus(target, tmp_path_factory.mktemp("prometheus")) as running:
        yield running
