"""Starts the servers under test, pinned to one core, and reads their CPU time."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.online.workload import DATASETS, Artifact, Kind
from service.store.conversion import convert_version
from tests.serving import free_port
from training.examples import EXAMPLES, IRIS_INTEGER, train_example

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / "bench" / ".peers-venv"
TRITON_VENV = ROOT / "bench" / ".triton-venv"
TICKS = os.sysconf("SC_CLK_TCK")


def prepare_repository(work: Path) -> tuple[Path, Path]:
    """The example models trained once, and a copy of the repository with batching off."""
    batched, unbatched = work / "models", work / "models-unbatched"
    chosen = [e for e in EXAMPLES if e.name in ("iris", "breast_cancer")] + [IRIS_INTEGER]
    for example in chosen:
        folder = batched / example.name
        if not (folder / "2" / "metadata.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            # Iris with integer labels is served as iris is.
            config = ROOT / "models" / (example.dataset or example.name) / "model.toml"
            shutil.copy(config, folder / "model.toml")
            train_example(example, batched)
    _serve_converted_forest(batched / "breast_cancer")
    shutil.rmtree(unbatched, ignore_errors=True)
    shutil.copytree(batched, unbatched)
    for config in unbatched.glob("*/model.toml"):
        config.write_text("[batching]\nmax_batch_rows = 0\n")
    return batched, unbatched


def _serve_converted_forest(folder: Path) -> None:
    """The forest's ONNX version as `modelserve convert` makes it from the joblib version
    (double-precision thresholds, parity-checked), not as the training script exports it."""
    metadata = folder / "2" / "metadata.json"
    if json.loads(metadata.read_text()).get("converted_from"):
        return
    shutil.rmtree(folder / "2")
    convert_version(folder.parent, folder.name, "1", new_version=2)


@dataclass
class Server:
    """A running server process (and its children) listening on 127.0.0.1."""

    name: str
    kind: Kind
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    versions: frozenset[int] = field(default_factory=lambda: frozenset({1, 2}))
    models: frozenset[str] = frozenset({"iris", "breast_cancer"})
    binary: bool = True
    # Large requests fill a call on their own: a variant that differs only in batching skips them.
    large_requests: bool = True
    # Its gRPC port, when the benchmark calls it over gRPC too.
    grpc_port: int | None = None
    # Where its /metrics is served, when not on `port`.
    metrics_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port or self.port}/metrics"

    def serves(self, artifact: Artifact) -> bool:
        return artifact.model in self.models and artifact.version in self.versions

    def cpu_seconds(self) -> float:
        """User + system time of the process and every descendant alive now."""
        return sum(_cpu_ticks(pid) for pid in _tree(self.process.pid)) / TICKS

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for pid in _tree(self.process.pid):
                    os.kill(pid, signal.SIGKILL)
                self.process.wait()


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields after the command name


def _cpu_ticks(pid: int) -> int:
    try:
        fields = _stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def _tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found = [root]
    for pid in found:
        found.extend(child for child, parent in parents.items() if parent == pid)
    return found


def _start(
    name: str,
    kind: Kind,
    command: list[str],
    work: Path,
    port: int,
    env: Mapping[str, str],
    cores: str,
    ready_path: str,
) -> Server:
    log = work / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}.log"
    environment = {**os.environ, **env}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["taskset", "-c", cores, *command],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=work,
        )
    server = Server(name, kind, port, process, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited; see {log}")
        try:
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"{name} not ready in 180 s; see {log}")


def start_modelserve(
    name: str,
    repository: Path,
    work: Path,
    env: Mapping[str, str] | None = None,
    cores: str = "0",
    workers: int = 1,
    large_requests: bool = True,
) -> Server:
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "service", "serve", "--model-repository", str(repository)]
    command += ["--port", str(port), "--workers", str(workers), "--grpc-port", str(grpc_port)]
    environment = dict(env or {})  # as a user starts it: access log on at info
    server = _start(name, "modelserve", command, work, port, environment, cores, "/v2/health/ready")
    server.large_requests, server.grpc_port = large_requests, grpc_port
    server.models = frozenset(DATASETS)
    return server


def start_mlserver(
    name: str, repository: Path, work: Path, adaptive_batching: bool, cores: str = "0"
) -> Server:
    """MLServer with its defaults, serving the joblib versions through mlserver-sklearn."""
    folder = work / name.replace(" ", "-").replace("(", "").replace(")", "")
    folder.mkdir(parents=True, exist_ok=True)
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port}
    settings["metrics_port"] = metrics_port
    (folder / "settings.json").write_text(json.dumps(settings))
    for model in ("iris", "breast_cancer"):
        artifact = Artifact(model, 1).path(repository)
        model_settings: dict[str, object] = {
            "name": model,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(artifact)},
        }
        if adaptive_batching:
            model_settings.update(max_batch_size=64, max_batch_time=0.005)
        (folder / model).mkdir(exist_ok=True)
        (folder / model / "model-settings.json").write_text(json.dumps(model_settings))
    command = [str(PEERS_VENV / "bin" / "mlserver"), "start", str(folder)]
    server = _start(name, "mlserver", command, work, port, {}, cores, "/v2/health/ready")
    server.versions, server.binary = frozenset({1}), False
    server.large_requests = not adaptive_batching
    server.grpc_port, server.metrics_port = grpc_port, metrics_port
    for model in ("iris", "breast_cancer"):
        wait_for_model(server, f"/v2/models/{model}/ready")
    return server


def start_tutorial(name: str, repository: Path, work: Path, cores: str = "0") -> Server:
    """The tutorial FastAPI app on uvicorn, serving the joblib versions."""
    models = work / "tutorial-models"
    models.mkdir(parents=True, exist_ok=True)
    for model in ("iris", "breast_cancer"):
        link = models / f"{model}.joblib"
        link.unlink(missing_ok=True)
        link.symlink_to(Artifact(model, 1).path(repository))
    port = free_port()
    command = [str(PEERS_VENV / "bin" / "uvicorn"), "--app-dir", str(ROOT / "bench" / "peers")]
    command += ["tutorial_app:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log"]
    server = _start(
        name, "tutorial", command, work, port, {"TUTORIAL_MODELS": str(models)}, cores, "/docs"
    )
    server.versions, server.binary = frozenset({1}), False
    return server


def start_triton(name: str, repository: Path, work: Path, cores: str = "0") -> Server:
    """Triton through PyTriton, serving the ONNX versions from an onnxruntime session.

    tritonserver and its Python-backend stubs are children of the PyTriton process, so they
    run on the same core and their CPU time is counted; SIGINT stops them all.
    """
    workspace = work / "triton-workspace"
    shutil.rmtree(workspace, ignore_errors=True)  # PyTriton refuses an existing one
    port = free_port()
    command = [str(TRITON_VENV / "bin" / "python"), str(ROOT / "bench" / "peers" / "triton_app.py")]
    command += ["--repository", str(repository), "--version", "2"]
    command += ["--model", "iris", "--model", "breast_cancer", "--workspace", str(workspace)]
    command += ["--http-port", str(port), "--grpc-port", str(free_port())]
    command += ["--metrics-port", str(free_port())]
    server = _start(name, "triton", command, work, port, {}, cores, "/v2/health/ready")
    server.versions = frozenset({2})
    for model in ("iris", "breast_cancer"):
        wait_for_model(server, f"/v2/models/{model}/versions/2/ready")
    return server


def wait_for_model(server: Server, path: str, timeout: float = 120.0) -> None:
    """Until `path` answers 200; a server whose model is not ready by then is stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(server.url + path, timeout=2.0).status_code == 200:
            return
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"{server.name}: {path} not ready; see {server.log}")
