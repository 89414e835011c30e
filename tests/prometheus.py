"""Runs a real Prometheus server that scrapes a test's modelserve, and queries it."""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.serving import free_port, stop, wait_for

SCRAPE_INTERVAL_S = 1.0


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query; fails on a PromQL or server error."""
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10.0)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value an expression returns, or None when it returns nothing."""
        result = self.query(expr, at)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1])

    def sample_times(self, selector: str, window: str = "1m") -> list[float]:
        """The timestamps of the scraped samples of one series over the last `window`."""
        result = self.query(f"{selector}[{window}]")
        assert len(result) == 1, f"{selector} matched {len(result)} series"
        return [float(t) for t, _ in result[0]["values"]]


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed; scripts/prometheus.sh installs it")
    return binary


@contextmanager
def run_prometheus(target: str, workdir: Path) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port, scraping `target` (host:port) every second."""
    interval = f"{SCRAPE_INTERVAL_S:g}s"
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [{"job_name": "modelserve", "static_configs": [{"targets": [target]}]}],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = workdir / "prometheus.log"
    command = [
        prometheus_binary(),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {process.returncode}")
        try:
            return httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, what="prometheus ready")
        yield Prometheus(url, log)
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace"))
        raise
    finally:
        stop(process, timeout=20)
