"""python -m bench.online.driver: the Python CPU of one request, without sockets.

The real application and connection protocol (the one uvicorn runs) serve single-row V2 JSON
requests from CONNECTIONS in-memory transports at once, round after round, in this process;
the figure is process CPU time per request, the model's calls included and the system calls
of reading and writing sockets left out. On a quiet core it repeats within about 1%, where a
server under wrk varies by 10% from run to run, so a change to the request path can be told
from noise in seconds; py-spy on this process shows each step's cost as it is when requests
interleave (two to three times its cost timed alone in a loop). Access lines go to standard
error, as a server's do.
"""

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from bench.online.servers import ROOT, prepare_repository
from service.server.connection import HeadLimits, http_protocol


class _Transport(asyncio.Transport):
    """Takes the answers, and keeps those that are not a 200."""

    def __init__(self, answered: "asyncio.Queue[bytes | None]") -> None:
        super().__init__()
        self.answered = answered
        self.closing = False

    def write(self, data: Any) -> None:
        head = bytes(data[:12])
        self.answered.put_nowait(None if head == b"HTTP/1.1 200" else bytes(data[:300]))

    def writelines(self, pieces: Any) -> None:
        self.write(b"".join(pieces))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def request_bytes(model: str, version: int, row: list[float]) -> bytes:
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": [row]}]}
    )
    head = (
        f"POST /v2/models/{model}/versions/{version}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def summary(figures: list[float], unit: str) -> str:
    """The median µs of CPU per `unit`, and every repeat's figure."""
    each = ", ".join(f"{f:.1f}" for f in figures)
    return f"{statistics.median(figures):.1f} µs of CPU a {unit} (median of {len(figures)}; {each})"


async def start_application(repository: Path) -> tuple[Config, LifespanOn]:
    """The application as a server runs it, started on `repository` in this process."""
    os.environ["MODELSERVE_MODEL_REPOSITORY"] = str(repository)
    config = Config(
        "service.server.main:app_from_environment",
        factory=True,
        loop="uvloop",
        http=http_protocol(HeadLimits(65536, 30.0)),
        log_config=None,
        access_log=False,
    )
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    return config, lifespan


async def measure(
    repository: Path, request: bytes, connections: int, rounds: int, repeats: int
) -> list[float]:
    """µs of process CPU per request, one figure per repeat of `rounds` rounds."""
    config, lifespan = await start_application(repository)
    loop = asyncio.get_running_loop()
    answered: asyncio.Queue[bytes | None] = asyncio.Queue()
    protocols = []
    for _ in range(connections):
        protocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=ServerState(), app_state=lifespan.state, _loop=loop
        )
        protocol.connection_made(_Transport(answered))
        protocols.append(protocol)

    async def one_round() -> None:
        for protocol in protocols:
            protocol.data_received(request)
        for _ in protocols:
            failure = await answered.get()
            if failure is not None:
                raise RuntimeError(f"answered {failure!r}")

    try:
        for _ in range(max(1, rounds // 2)):  # warm up: batch sizes and inline calls settle
            await one_round()
        figures = []
        for _ in range(repeats):
            started = time.process_time()
            for _ in range(rounds):
                await one_round()
            figures.append((time.process_time() - started) / (rounds * connections) * 1e6)
        return figures
    finally:
        await lifespan.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.online.driver", description=__doc__)
    parser.add_argument("--model", default="iris", help="a model with four float features")
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument(
        "--repository", type=Path, help="default: the benchmark's, trained into bench/.work"
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repository = args.repository or prepare_repository(ROOT / "bench" / ".work")[0]
    request = request_bytes(args.model, args.version, [5.1, 3.5, 1.4, 0.2])
    figures = uvloop.run(measure(repository, request, args.connections, args.rounds, args.repeats))
    print(summary(figures, "request"))


if __name__ == "__main__":
    main()
