"""HTTP/1.1 over a plain socket, for requests httpx will not send (lying lengths, dot paths)."""

import select
import selectors
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return RawResponse(status, headers, body)


def exchange(
    url: str,
    head: bytes,
    chunks: tuple[bytes, ...] = (),
    *,
    half_close: bool = False,
    timeout: float = 15.0,
) -> RawResponse | None:
    """Send a request head and body pieces, then read until the server closes.

    Returns None when the server closed without answering.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered early and stopped reading: read that answer
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return parse_response(received) if received else None


def request_head(
    method: str, path: str, headers: dict[str, str] | None = None, length: int | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes, size: int = 65536) -> tuple[bytes, ...]:
    """A body in Transfer-Encoding: chunked framing, ending with the last chunk."""
    pieces = [
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    ]
    return (*pieces, b"0\r\n\r\n")


@dataclass
class Flooded:
    """What one connection that kept sending a request head saw."""

    sent: int
    answer: RawResponse | None
    closed: bool  # the server closed the connection (or reset it)


def flood_heads(
    url: str, connections: int, *, budget: int, seconds: float, one_line: bool = False
) -> list[Flooded]:
    """Opens `connections` connections that each stream a request head of 1 KB header lines (or
    of one header line that never ends) until the server answers or closes, `budget` bytes are
    sent, or `seconds` pass. A connection that reaches its budget ends its head and waits for
    the answer, as a real client would."""
    parts = urlsplit(url)
    opening = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Flood: " * one_line
    line = b"a" * 1024 if one_line else b"X-Flood: " + b"a" * 1013 + b"\r\n"
    filler = line * 64
    selector = selectors.DefaultSelector()
    floods = []
    for _ in range(connections):
        flood = _Flood(socket.create_connection((parts.hostname, parts.port)), opening)
        selector.register(flood.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, flood)
        floods.append(flood)
    deadline = time.monotonic() + seconds
    try:
        while selector.get_map() and time.monotonic() < deadline:
            for key, events in selector.select(timeout=0.1):
                flood = key.data
                if events & selectors.EVENT_READ:
                    flood.read()
                else:
                    flood.write(filler if flood.sent < budget else b"\r\n" * (1 + one_line))
                if flood.closed:
                    selector.unregister(flood.sock)
                elif flood.received or flood.ended:
                    selector.modify(flood.sock, selectors.EVENT_READ, flood)
    finally:
        for flood in floods:
            flood.sock.close()
        selector.close()
    return [flood.outcome() for flood in floods]


class _Flood:
    def __init__(self, sock: socket.socket, opening: bytes) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.pending = opening
        self.sent = 0
        self.received = b""
        self.ending = self.ended = self.closed = False

    def write(self, more: bytes) -> None:
        """Sends what is pending, else `more`; a head ending (a blank line) ends the head."""
        if not self.pending:
            self.pending = more
            self.ending = more.startswith(b"\r\n")
        try:
            count = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return
        self.sent += count
        self.pending = self.pending[count:]
        self.ended = self.ending and not self.pending

    def read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        self.received += data
        self.closed = not data

    def outcome(self) -> Flooded:
        answer = parse_response(self.received) if self.received else None
        return Flooded(self.sent, answer, self.closed)


def frame_chunks(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Body pieces in Transfer-Encoding: chunked framing, as they are made."""
    for piece in pieces:
        if piece:
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def send_until_answered(
    url: str, head: bytes, chunks: Iterable[bytes], timeout: float = 15.0
) -> tuple[RawResponse | None, int]:
    """Send a request head and body pieces, stopping as soon as the server answers.

    Returns the answer (None if the server closed without one) and the body bytes sent.
    """
    parts = urlsplit(url)
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or the end of the connection) arrived: stop sending
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < answer_length(received):
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return (parse_response(received) if received else None), sent


def answer_length(received: bytes) -> int:
    """The size of a whole answer with a Content-Length, once its head has arrived."""
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            return len(head) + 4 + int(value)
    return len(received) + 1  # no length: read until the server closes
