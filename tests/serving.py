"""Starts real `modelserve serve` processes for end-to-end tests."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

# Whether the running test may start servers: only an `e2e` test may (set by tests/conftest.py),
# so that the fast layer stays free of server processes as tests are added.
_servers_allowed = True


def allow_servers(allowed: bool) -> None:
    global _servers_allowed
    _servers_allowed = allowed


def _unassigned_ports() -> range:
    """Ports below the kernel's ephemeral range, from which it gives client connections theirs:
    a port picked inside it (as binding port 0 does) can be taken by some connection between
    the pick and the server binding it (a CI run failed so: "address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


_PORTS = _unassigned_ports()
_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never given before in this process."""
    for _ in range(1000):
        port = _PORTS[int.from_bytes(os.urandom(4), "big") % len(_PORTS)]
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS}")


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    # host:port of its gRPC service ("" when the test turned gRPC off).
    grpc_target: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what or condition}")
        time.sleep(0.1)


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float = 60.0,
    path: str = "/v2/health/ready",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} not ready within {timeout} s")


@contextmanager
def run_server(
    repository: Path,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    wait_for: str = "/v2/health/ready",
) -> Iterator[RunningServer]:
    """A `modelserve serve` process on a free port, once `wait_for` answers 200; stopped with
    SIGTERM afterwards."""
    if not _servers_allowed:
        raise RuntimeError(
            "this test starts a server process: mark it `@pytest.mark.e2e` or use a server "
            "fixture (tests/conftest.py E2E_FIXTURES), so that `pytest -m 'not e2e'` stays fast"
        )
    port = free_port()
    log = log_dir / f"server-{port}.log"
    # Each server its own gRPC port: a second one on the default port would not start.
    environment = {**os.environ, "MODELSERVE_GRPC_PORT": str(free_port()), **(env or {})}
    grpc_port = int(environment["MODELSERVE_GRPC_PORT"])
    grpc_target = f"127.0.0.1:{grpc_port}" if grpc_port else ""
    command = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--model-repository",
        str(repository),
        "--port",
        str(port),
        *args,
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, path=wait_for)
        yield RunningServer(url, process, log, grpc_target)
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace"))
        stop(process, timeout=30)
        raise
    # A server that ignores SIGTERM is a defect of its own (an orchestrator would kill it).
    if not stop(process, timeout=30):
        sys.stderr.write(log.read_text(errors="replace"))
        raise AssertionError("the server had not exited 30 s after SIGTERM; it was killed")


def stop(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout` seconds; False if
    it had to be killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
    return True


def memory(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process in bytes, from /proc: VmRSS (now) or VmHWM (the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(field)


def reset_peak_memory(pid: int) -> None:
    """Starts VmHWM afresh from the current resident size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
