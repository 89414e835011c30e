"""HTTP/1.1 over a plain socket, for requests httpx will not send (lying lengths, dot paths)."""

import select
import socket
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
        while b"\r\n\r\n" not in received or len(received) < _length(received):
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return (parse_response(received) if received else None), sent


def _length(received: bytes) -> int:
    """The size of a whole answer with a Content-Length, once its head has arrived."""
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            return len(head) + 4 + int(value)
    return len(received) + 1  # no length: read until the server closes
