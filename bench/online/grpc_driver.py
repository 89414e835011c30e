"""python -m bench.online.grpc_driver: the Python CPU of one large gRPC call, without sockets.

The real application and gRPC transport serve ModelInfer calls with raw contents (10,000 rows
by default), one at a time, on one in-memory connection, as h2load sends them: DATA frames of
16,384 bytes (HTTP/2's default, and nghttp2's) arriving in reads of 64 kB (what loopback TCP
hands over at once). The figure is process CPU time per call, the model call included and the
system calls of sockets left out: a change to the gRPC path can be told from noise in seconds
(within about 3% on a quiet core), where h2load against a server varies by more. --frame and
--read change the client's frame size and the size of the reads.
"""

import argparse
import asyncio
import os
import struct
import time
from pathlib import Path
from typing import Any

import hpack
import uvloop

from bench.online.driver import start_application, summary
from bench.online.messages import infer_request
from bench.online.servers import ROOT, prepare_repository
from bench.online.workload import Artifact, features
from tests.serving import free_port

_FRAME = struct.Struct(">BHBBI")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0, 1, 4, 8
END_STREAM, END_HEADERS = 0x1, 0x4
OPEN = 2**30  # the client's windows, as h2load's


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    size = len(payload)
    return _FRAME.pack(size >> 16, size & 0xFFFF, kind, flags, stream) + payload


class _Transport(asyncio.Transport):
    """Follows the frames the server writes, without copying them: a call has ended when its
    trailers (HEADERS with END_STREAM) have come; they must carry grpc-status 0."""

    def __init__(self, ended: "asyncio.Queue[bytes]") -> None:
        super().__init__()
        self.ended = ended
        self.head = b""  # a frame head cut by a write
        self.skip = 0  # payload bytes of the current frame still to pass over
        self.trailers = False  # the current frame is a call's trailers
        self.block = b""  # their header block, as far as it has come
        self.data = 0  # DATA payload bytes read since the client last gave its window back

    def write(self, data: Any) -> None:
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            if self.skip:
                take = min(self.skip, end - at)
                if self.trailers:
                    self.block += bytes(view[at : at + take])
                at += take
                self.skip -= take
                if not self.skip and self.trailers:
                    self.ended.put_nowait(self.block)
                continue
            need = 9 - len(self.head)
            self.head += bytes(view[at : at + need])
            at += min(need, end - at)
            if len(self.head) == 9:
                high, low, kind, flags, _ = _FRAME.unpack(self.head)
                self.head, self.skip = b"", high << 16 | low
                if kind == DATA:
                    self.data += self.skip
                self.trailers, self.block = kind == HEADERS and bool(flags & END_STREAM), b""

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)


async def measure(
    repository: Path, message: bytes, frame_size: int, read_size: int, calls: int, repeats: int
) -> list[float]:
    """µs of process CPU per call, one figure per repeat of `calls` calls."""
    os.environ["MODELSERVE_GRPC_PORT"] = str(free_port())
    config, lifespan = await start_application(repository)
    # Imported once the application has registered the protocol's messages.
    from service.server.grpc_service import GrpcServer

    app = config.loaded_app
    while not hasattr(app, "state"):  # under uvicorn's middleware
        app = app.app
    server = GrpcServer(app.state.service)
    connection = server._connection()
    ended: asyncio.Queue[bytes] = asyncio.Queue()
    transport = _Transport(ended)
    connection.connection_made(transport)
    window = struct.pack(">HI", 4, OPEN)  # SETTINGS_INITIAL_WINDOW_SIZE
    connection.data_received(
        PREFACE
        + frame(SETTINGS, 0, 0, window)
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", OPEN))
    )
    encoder = hpack.Encoder()
    body = struct.pack(">BI", 0, len(message)) + message
    status = hpack.Decoder()

    def reads(stream: int) -> list[bytes]:
        head = encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/inference.GRPCInferenceService/ModelInfer"),
                (":authority", "127.0.0.1"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        frames = [frame(HEADERS, END_HEADERS, stream, head)]
        for at in range(0, len(body), frame_size):
            last = at + frame_size >= len(body)
            frames.append(
                frame(DATA, END_STREAM if last else 0, stream, body[at : at + frame_size])
            )
        sent = b"".join(frames)
        return [sent[at : at + read_size] for at in range(0, len(sent), read_size)]

    async def call(stream: int, chunks: list[bytes]) -> None:
        for chunk in chunks:
            connection.data_received(chunk)
        trailers = dict(status.decode(await ended.get(), raw=True))
        if trailers.get(b"grpc-status") != b"0":
            raise RuntimeError(f"answered {trailers}")
        # The connection's window given back, as h2load does: without it the server stops
        # sending once the first window (1 GiB) is spent.
        connection.data_received(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", transport.data)))
        transport.data = 0

    try:
        stream = 1
        for _ in range(max(1, calls // 4)):  # warm up
            await call(stream, reads(stream))
            stream += 2
        figures = []
        for _ in range(repeats):
            # The client's side (framing) is made before the clock starts.
            prepared = [(stream + 2 * i, reads(stream + 2 * i)) for i in range(calls)]
            stream += 2 * calls
            started = time.process_time()
            for number, chunks in prepared:
                await call(number, chunks)
            figures.append((time.process_time() - started) / calls * 1e6)
        return figures
    finally:
        await lifespan.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.online.grpc_driver", description=__doc__)
    parser.add_argument("--model", default="iris_int", choices=["iris", "iris_int"])
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument(
        "--repository", type=Path, help="default: the benchmark's, trained into bench/.work"
    )
    parser.add_argument("--frame", type=int, default=16_384, help="DATA frame payload bytes")
    parser.add_argument("--read", type=int, default=65_536, help="bytes a read hands over")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repository = args.repository or prepare_repository(ROOT / "bench" / ".work")[0]
    artifact = Artifact(args.model, args.version)
    message = infer_request("modelserve", artifact, features(args.model, args.rows), "raw")
    figures = uvloop.run(
        measure(
            repository,
            message.SerializeToString(),
            args.frame,
            args.read,
            args.calls,
            args.repeats,
        )
    )
    print(summary(figures, "call"))


if __name__ == "__main__":
    main()
