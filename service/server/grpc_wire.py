"""gRPC over HTTP/2, server side: the part of HTTP/2 that gRPC uses, on the worker's event loop.

gRPC's own Python server (`grpc.aio`) spends about 250 µs of CPU on a call that does nothing,
more than our whole REST path spends on a prediction; this one spends under 40. It speaks
HTTP/2 as RFC 9113 has it (frames, HPACK header decoding through the `hpack` package, flow
control both ways, SETTINGS, PING, GOAWAY, RST_STREAM) and gRPC's framing of messages on it
(length-prefixed messages, `grpc-timeout`, `grpc-encoding` gzip/deflate, trailers with
`grpc-status` and `grpc-message`). No TLS, no server push, no HTTP/1.1 upgrade: gRPC clients
use none of them in the clear.

Memory a call holds is bounded as an HTTP body's is: its message is reserved in the memory
budget as it arrives (refused at once past `max_request_bytes`, or when the budget is full),
and the reservation is held until the answer has been handed to the socket, so a client that
does not read its answers holds them within the budget.
"""

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Never

from google.protobuf.message import Message
from grpc import StatusCode
from hpack import Decoder, HPACKError

from service import errors
from service.server import access
from service.server.grpc_status import grpc_code_of
from service.server.memory import MemoryBudget, Reservation

logger = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
# Frames a client may send us. Larger frames mean fewer of them to parse for a large message;
# gRPC's C core sends up to what the server allows.
OUR_MAX_FRAME = 1 << 20
_FRAME_HEAD = struct.Struct(">BHBBI")  # length as 8 + 16 bits, type, flags, stream
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_MESSAGE_HEAD = struct.Struct(">BI")  # compressed flag, length

# Header blocks longer than this are decoded each time: the cache is for the few blocks a
# client repeats, not for what a client can make it hold.
_CACHED_BLOCK = 1024
# After a connection error, what the client still sends is read and dropped for this long.
LINGER_S = 2.0
_MESSAGE_BYTES = 4096
# Messages a streaming call's client may send ahead of the answers to them.
_INBOX = 64
# Calls in flight per connection (SETTINGS_MAX_CONCURRENT_STREAMS); past it a client's gRPC
# queues its calls, and a stream opened anyway is refused (REFUSED_STREAM, which clients retry).
MAX_STREAMS = 1000
# Calls a client may cancel (RST_STREAM) while they are in progress: a burst of MAX_STREAMS
# (a client ending all its calls at once), then RESET_RATE a second. A reset frees the stream
# for another call at once, so without a bound a client could make the server start calls
# without limit while never having more than a few open (HTTP/2 "rapid reset",
# CVE-2023-44487); past it the connection ends with GOAWAY ENHANCE_YOUR_CALM.
RESET_BURST = MAX_STREAMS
RESET_RATE = 100.0
# Answers up to this long that have the window are written whole, at once; a longer one goes
# out as the socket takes it, so that what a client does not read waits in the call's
# reservation in the memory budget, not copied into the socket's buffer past it.
_AT_ONCE = 1 << 20
# The memory budget's measure of a request is its body; a gRPC message is one.
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, stream) + payload


def _hpack_int(value: int, bits: int) -> bytes:
    """An HPACK integer with a `bits`-bit prefix (RFC 7541 §5.1), the prefix's flags zero."""
    limit = (1 << bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field "without indexing", name and value as plain strings: it leaves the
    client's decoding table as it is, so answers need no encoder state of their own."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# ":status: 200" is entry 8 of HPACK's static table.
_RESPONSE_HEAD = b"\x88" + literal(b"content-type", b"application/grpc")
_ACCEPT_ENCODING = literal(b"grpc-accept-encoding", b"identity,deflate,gzip")
_OK = literal(b"grpc-status", b"0")
# ":status: 415", its name entry 8 of the static table.
_UNSUPPORTED_TYPE = b"\x08\x03415"


def _percent_encoded(message: str) -> bytes:
    """grpc-message's encoding: printable ASCII as it is, other bytes (and '%') as %XX; at
    most _MESSAGE_BYTES of it (gRPC clients refuse trailers past 8 kB by default, and would
    report that instead of the status)."""
    raw = message.encode()
    if not all(0x20 <= byte <= 0x7E and byte != 0x25 for byte in raw):
        raw = b"".join(
            bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
            for byte in raw
        )
    if len(raw) > _MESSAGE_BYTES:
        cut = raw[: _MESSAGE_BYTES - 3]
        cut = cut[: cut.rfind(b"%")] if b"%" in cut[-2:] else cut  # not inside a %XX
        raw = cut + b"..."
    return raw


def _timeout_s(value: bytes) -> float | None:
    """grpc-timeout: up to 8 digits and a unit (H, M, S, m, u, n)."""
    scale = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if scale is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * scale


class Aborted(Exception):
    """A call's end with a status other than OK, raised by a handler."""

    def __init__(
        self, code: StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


class CallContext:
    """What a handler knows of its call, and how it ends it with a status."""

    __slots__ = ("_loop", "deadline", "metadata", "peer", "reservation", "trailers")

    def __init__(
        self,
        metadata: dict[str, str],
        peer: str,
        deadline: float | None,
        reservation: Reservation,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.metadata = metadata
        self.peer = peer
        self.deadline = deadline  # on the loop's clock
        self.reservation = reservation
        self.trailers: tuple[tuple[str, str], ...] = ()
        self._loop = loop

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self._loop.time()

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def abort(
        self, code: StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> Never:
        raise Aborted(code, message, trailers)


# A message as it came: a view of the read that brought it whole in one frame (reads are
# immutable bytes: the view holds it, and copies nothing), else the buffer it was gathered in.
Received = bytes | bytearray | memoryview
# An answer serialized already, in pieces joined on the wire (large byte fields are sent from
# their own buffers instead of copied into the message's encoding).
Pieces = tuple[bytes | memoryview, ...]
Unary = Callable[[Received, CallContext], Awaitable[Message | Pieces]]
Streaming = Callable[[AsyncIterator[Received], CallContext], AsyncIterator[Message]]


@dataclass
class Methods:
    """Handlers by path ("/package.Service/Method")."""

    unary: dict[bytes, Unary] = field(default_factory=dict)
    streaming: dict[bytes, Streaming] = field(default_factory=dict)


class _Stream:
    __slots__ = (
        "body",
        "compressed",
        "context",
        "drained",
        "encoding",
        "expected",
        "filled",
        "headers_sent",
        "id",
        "inbox",
        "last_data",
        "messages",
        "opened",
        "outbox",
        "path",
        "prelude",
        "receiving",
        "refused",
        "started",
        "task",
        "trailer_block",
        "window",
    )

    def __init__(self, stream_id: int, path: bytes, window: int) -> None:
        self.id = stream_id
        self.path = path
        self.context: CallContext | None = None
        self.body = bytearray()  # the message being received, its 5-byte prefix first
        self.expected = -1  # its length once the prefix is in
        self.filled = 0  # bytes of it received, once it is
        self.messages: list[Received] = []  # complete messages of a unary call
        self.inbox: asyncio.Queue[Received | None] | None = None  # a streaming call's messages
        self.encoding = b"identity"
        self.compressed = False  # the message being received
        self.receiving = True  # the client has not ended its side
        self.task: asyncio.Task[None] | None = None
        self.window = window  # what the client lets us send on this stream
        self.outbox: list[memoryview] = []  # answer bytes waiting for window
        self.prelude = b""  # headers to send before them
        self.drained: asyncio.Future[None] | None = None  # a streaming call's answer sent
        self.trailer_block: bytes | None = None  # sent once the outbox is empty
        self.headers_sent = False
        self.refused = False  # answered already; what else the client sends is dropped
        self.started = time.perf_counter()
        # When the client last sent some of it, or read some of the answer; when it opened.
        # On the loop's clock.
        self.last_data = self.opened = 0.0


class GrpcConnection(asyncio.Protocol):
    """One client connection: frames in, calls dispatched, answers framed out."""

    def __init__(
        self,
        methods: Methods,
        budget: MemoryBudget,
        max_message_bytes: int,
        max_header_bytes: int,
        connections: set["GrpcConnection"],
    ) -> None:
        self.methods = methods
        self.budget = budget
        self.max_message_bytes = max_message_bytes
        self.max_header_bytes = max_header_bytes
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.decoder = Decoder()
        self.decoder.max_header_list_size = max_header_bytes
        self.heads: dict[bytes, _Head] = {}  # see _decoded
        self.pending = bytearray()  # bytes of a frame not yet whole
        self.need = len(PREFACE)  # bytes `pending` must reach before it is parsed
        self.preface = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0  # highest stream accepted: what GOAWAY names
        self.seen_stream = 0  # highest stream id the client used (ids only increase)
        self.header_block: bytearray | None = None  # a HEADERS frame's block, continued
        self.header_stream = 0
        self.header_flags = 0
        self.window = DEFAULT_WINDOW  # connection window: what the client lets us send
        self.initial_window = DEFAULT_WINDOW  # each new stream's, from the client's SETTINGS
        self.max_frame = 16_384  # largest frame the client takes
        self.received = 0  # DATA bytes since our last connection WINDOW_UPDATE
        # Streams with answers waiting, in the order they began to wait: for the connection's
        # window (or the socket), and for their own. Kept apart so that a WINDOW_UPDATE visits
        # only the streams it can move: a client with many stalled streams cannot make each of
        # its frames cost a pass over all of them.
        self.blocked: dict[_Stream, None] = {}
        self.stalled: dict[_Stream, None] = {}
        self.reset_tokens = float(RESET_BURST)  # calls the client may still cancel now
        self.reset_at = self.loop.time()
        self.paused = False  # the socket's buffer is full: wait before sending more
        self.going_away = False
        self.failed = False  # a connection error was answered: the socket closes soon
        self.opened = self.loop.time()
        self.partial_since = 0.0  # when the frame or header block now unfinished began

    # The connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream server's transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self.connections.add(self)
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (S_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                # Windows as large as HTTP/2 allows: what bounds a client's bytes in flight is
                # the memory budget, which each message is reserved in as it arrives.
                (S_INITIAL_WINDOW_SIZE, MAX_WINDOW),
                (S_MAX_FRAME_SIZE, OUR_MAX_FRAME),
                (S_MAX_HEADER_LIST_SIZE, self.max_header_bytes),
            )
        )
        opening = frame(SETTINGS, 0, 0, settings)
        opening += frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - DEFAULT_WINDOW))
        self._write(opening)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        for stream in list(self.streams.values()):
            self._forget(stream)  # (its handler cancelled)
        self.blocked.clear()
        self.stalled.clear()

    def pause_writing(self) -> None:
        # The client is not reading: nor do we, so what it sends cannot make us write more
        # (PING and SETTINGS answers, refusals) into a buffer that is not draining.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._flush_blocked()

    def close(self) -> None:
        """Close now (the server stops): GOAWAY, unless the connection is ending already."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.failed:
            transport.write(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(0)))
        transport.close()

    def go_away(self) -> None:
        """No new calls on this connection (GOAWAY); it closes once its calls are answered."""
        if self.transport is None or self.going_away or self.failed:
            return
        self.going_away = True
        goaway = frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(NO_ERROR))
        self.transport.write(goaway)
        if not self.streams:
            self._close_soon()

    def expire(self, now: float, limits: "Timeouts") -> None:
        """Close a connection that has not sent its preface in time. Answer a call whose
        message stopped coming, or trickles in past the request timeout (as HTTP answers such
        a body with 408), and reset one whose client stopped reading its answer: each would
        hold its share of the memory budget and a stream for as long as its client liked."""
        if self.failed:
            return
        if not self.preface:
            if now - self.opened > limits.header_s and self.transport is not None:
                self.transport.close()
            return
        if (self.pending or self.header_block is not None) and (
            now - self.partial_since > limits.body_idle_s
        ):  # a frame (or header block) left unfinished holds its bytes outside any budget
            logger.info("gRPC connection from %s closed: a frame left unfinished", self.peer)
            self._fail(ENHANCE_YOUR_CALM)
            return
        for stream in list(self.streams.values()):
            if stream.outbox and now - stream.last_data > limits.body_idle_s:
                logger.info(
                    "gRPC call %s reset: its client read none of its answer for %g s "
                    "(MODELSERVE_BODY_IDLE_TIMEOUT_S)",
                    stream.path.decode("latin-1"),
                    limits.body_idle_s,
                )
                self._reset_stream(stream, CANCEL)
                continue
            if not stream.receiving or stream.inbox is not None or stream.refused:
                continue  # (a streaming call's client may wait between messages)
            if now - stream.last_data > limits.body_idle_s:
                self._refuse(
                    stream,
                    StatusCode.DEADLINE_EXCEEDED,
                    f"the request message stopped coming: none of it for "
                    f"{limits.body_idle_s:g} s (MODELSERVE_BODY_IDLE_TIMEOUT_S)",
                )
            elif now - stream.opened > limits.request_s:
                self._refuse(
                    stream,
                    StatusCode.DEADLINE_EXCEEDED,
                    f"the request message did not arrive within {limits.request_s:g} s "
                    "(MODELSERVE_REQUEST_TIMEOUT_S)",
                )

    # Frames in

    def _close_soon(self) -> None:
        """Close once the client has read what was sent: our side ends now (FIN), what the
        client still sends (a last WINDOW_UPDATE, a call that crossed the GOAWAY) is read and
        dropped, and the socket closes after LINGER_S. Closing it at once, with such bytes
        unread, makes the kernel reset the connection, which can destroy the last answer."""
        transport = self.transport
        if transport is None or self.failed or transport.is_closing():
            return
        self.failed = True
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)

    def _fail(self, code: int) -> None:
        """A connection error: GOAWAY with its code, then what the client still sends is read
        and dropped for a while before the socket closes. Closing a socket with unread data
        makes the kernel reset the connection, which can destroy the GOAWAY unread."""
        transport = self.transport
        if transport is None or self.failed:
            return
        self.failed = True
        self.pending.clear()
        transport.write(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(code)))
        self.loop.call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            start = 0
            # A frame left unfinished by the last read is finished from this one's head, and
            # parsed alone; the rest of the read is parsed where it is (a read can be 256 kB:
            # joining it to the unfinished frame would copy it twice).
            while self.pending:
                missing = self.need - len(self.pending)
                if len(data) - start < missing:
                    self.pending += memoryview(data)[start:]
                    return
                self.pending += memoryview(data)[start : start + missing]
                start += missing
                block = bytes(self.pending)
                self.pending.clear()
                self._keep(block, self._frames(block, 0))
            self._keep(data, self._frames(data, start))
        except _ConnectionError as exc:
            # A client over a limit is the operator's business; a broken one is its own.
            level = logging.INFO if exc.code == ENHANCE_YOUR_CALM else logging.DEBUG
            logger.log(level, "gRPC connection from %s closed: %s", self.peer, exc.reason)
            self._fail(exc.code)

    def _keep(self, data: bytes, pos: int) -> None:
        """Keep what is left of `data` from `pos` (at most one frame) for the next read."""
        if pos == len(data):
            return
        rest = memoryview(data)[pos:]
        if not self.pending:
            self.partial_since = self.loop.time()
        self.pending += rest
        if self.preface and len(rest) >= 9:
            size = rest[0] << 16 | rest[1] << 8 | rest[2]
            if size > OUR_MAX_FRAME:  # refused before it is gathered
                raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {size} bytes")
            self.need = 9 + size
        else:
            self.need = 9 if self.preface else len(PREFACE)

    def _frames(self, data: bytes, pos: int) -> int:
        """Handle the whole frames in `data` from `pos`; returns where the first unfinished
        one starts."""
        end = len(data)
        if not self.preface:
            if end - pos < len(PREFACE):
                return pos
            if data[pos : pos + len(PREFACE)] != PREFACE:
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self.preface = True
            pos += len(PREFACE)
        while end - pos >= 9:
            high, low, kind, flags, stream_id = _FRAME_HEAD.unpack_from(data, pos)
            size = high << 16 | low
            if size > OUR_MAX_FRAME:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {size} bytes")
            if end - pos - 9 < size:
                break
            start = pos + 9
            pos = start + size
            stream_id &= 0x7FFFFFFF
            if self.header_block is not None and kind != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "a header block left unfinished")
            if kind == DATA:
                self._data(stream_id, flags, data, start, pos)
            elif kind == HEADERS:
                self._headers(stream_id, flags, data[start:pos])
            else:
                self._other_frame(kind, stream_id, flags, data[start:pos])
        return pos

    def _other_frame(self, kind: int, stream_id: int, flags: int, payload: bytes) -> None:
        if kind == CONTINUATION:
            self._continuation(stream_id, flags, payload)
        elif kind == SETTINGS:
            self._settings(stream_id, flags, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a PING not of 8 bytes")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._reset(stream_id, payload)
        elif kind == GOAWAY:
            self.going_away = True
            if not self.streams:
                self._close_soon()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY, and frame types this server does not know, are ignored (RFC 9113 §5.5).

    def _write(self, data: bytes) -> None:
        # Once the connection is ending (after GOAWAY and our FIN), nothing more is written.
        if self.transport is not None and not self.failed:
            self.transport.write(data)

    def _settings(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS not of 6-byte entries")
        initial = self.initial_window
        for key, value in _SETTING.iter_unpack(payload):
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "a window over 2^31 - 1")
                initial = value
            elif key == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise _ConnectionError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.max_frame = value
        self._initial_window(initial)
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _initial_window(self, value: int) -> None:
        """A new SETTINGS_INITIAL_WINDOW_SIZE, applied once per SETTINGS frame whatever number
        of entries set it: a frame costs one pass over the streams (RFC 9113 moves every
        stream's window by the change), not one per entry."""
        delta, self.initial_window = value - self.initial_window, value
        if not delta:
            return
        for stream in self.streams.values():
            stream.window += delta
        if delta > 0:  # the stalled streams that can send now wait for the connection's window
            opened = [stream for stream in self.stalled if stream.window > 0]
            for stream in opened:
                del self.stalled[stream]
                self.blocked[stream] = None

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "a WINDOW_UPDATE not of 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.window += increment
            if self.window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection window past 2^31 - 1")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.window += increment
            if not increment or stream.window > MAX_WINDOW:  # RFC 9113 §6.9: a stream error
                self._reset_stream(stream, FLOW_CONTROL_ERROR if increment else PROTOCOL_ERROR)
            elif stream in self.stalled:  # (one in `blocked` waits for the connection)
                del self.stalled[stream]
                self._flush(stream)
            return
        self._flush_blocked()

    def _reset(self, stream_id: int, payload: bytes) -> None:
        """The client ended the call (cancelled, or its deadline passed)."""
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "a RST_STREAM not of 4 bytes")
        if not stream_id & 1 or stream_id > self.seen_stream:  # (0 and even ids: never ours)
            raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        now = self.loop.time()
        tokens = self.reset_tokens + (now - self.reset_at) * RESET_RATE
        self.reset_tokens, self.reset_at = min(tokens, RESET_BURST) - 1, now
        if self.reset_tokens < 0:
            raise _ConnectionError(
                ENHANCE_YOUR_CALM,
                f"calls cancelled faster than {RESET_RATE:g} a second "
                f"(after a burst of {RESET_BURST})",
            )
        self._forget(stream)

    def _reset_stream(self, stream: _Stream, code: int) -> None:
        """End a call from our side (RST_STREAM): it is forgotten, its handler cancelled."""
        self._write(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self._forget(stream)

    # Calls

    def _headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(PROTOCOL_ERROR, "padding past the frame")
            payload = payload[1 : len(payload) - payload[0]]
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        self._check_header_size(len(payload))
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self.header_block = bytearray(payload)
            self.header_stream, self.header_flags = stream_id, flags
            self.partial_since = self.loop.time()

    def _continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self.header_block is None or stream_id != self.header_stream:
            raise _ConnectionError(PROTOCOL_ERROR, "a CONTINUATION out of place")
        self.header_block += payload
        self._check_header_size(len(self.header_block))
        if flags & END_HEADERS:
            block, self.header_block = bytes(self.header_block), None
            self._header_block(stream_id, self.header_flags, block)

    def _check_header_size(self, size: int) -> None:
        if size > self.max_header_bytes:
            raise _ConnectionError(
                ENHANCE_YOUR_CALM, f"a header block over {self.max_header_bytes} bytes"
            )

    def _decoded(self, block: bytes) -> "_Head":
        """A header block's call head. A client sends the same block for call after call once
        its fields are in its decoding table: such a block, one that left the table as it was,
        is decoded once per connection and table state (HPACK decoding costs ~10 µs a call)."""
        head = self.heads.get(block)
        if head is not None:
            return head
        entries = self.decoder.header_table.dynamic_entries
        before = (len(entries), entries[0] if entries else None, self.decoder.header_table_size)
        try:
            head = self._request_head(self.decoder.decode(block, raw=True))
        except HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"header block: {exc}") from None
        after = (len(entries), entries[0] if entries else None, self.decoder.header_table_size)
        if before[0] != after[0] or before[1] is not after[1] or before[2] != after[2]:
            self.heads.clear()  # the table changed: what was decoded with it may not hold
        elif len(self.heads) < 64 and len(block) <= _CACHED_BLOCK:
            self.heads[block] = head
        return head

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        head = self._decoded(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client end its side
            if flags & END_STREAM and stream.receiving:
                self._end_of_request(stream)
            return
        if stream_id <= self.seen_stream or not stream_id & 1:
            if stream_id == 0 or not stream_id & 1:
                raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
            return  # a stream already closed
        self.seen_stream = stream_id
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            self._write(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        self.last_stream = stream_id
        path = head.path
        now = self.loop.time()
        stream = _Stream(stream_id, path, self.initial_window)
        stream.last_data = stream.opened = now
        self.streams[stream_id] = stream
        stream.encoding = head.encoding
        deadline = None if head.timeout_s is None else now + head.timeout_s
        stream.context = CallContext(
            head.metadata, self.peer, deadline, Reservation(self.budget), self.loop
        )
        if not head.grpc:
            # Not a gRPC call (RFC: answer 415, and no gRPC status).
            self._write(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, _UNSUPPORTED_TYPE))
            self._reset_stream(stream, NO_ERROR)
            return
        streaming = self.methods.streaming.get(path)
        if streaming is not None:
            stream.inbox = asyncio.Queue()
            stream.task = self.loop.create_task(self._streaming(stream, streaming))
        elif path not in self.methods.unary:
            self._refuse(stream, StatusCode.UNIMPLEMENTED, f"no method {path.decode('latin-1')}")
        if flags & END_STREAM:
            self._end_of_request(stream)

    @staticmethod
    def _request_head(fields: Iterable[tuple[bytes, bytes]]) -> "_Head":
        head = _Head()
        for name, value in fields:
            if name[:1] == b":":
                if name == b":path":
                    head.path = value
            elif name == b"content-type":
                head.grpc = value.startswith(b"application/grpc")
            elif name == b"grpc-timeout":
                head.timeout_s = _timeout_s(value)
            elif name == b"grpc-encoding":
                head.encoding = value
            elif not name.endswith(b"-bin"):  # binary metadata carries nothing we read
                head.metadata[name.decode("latin-1")] = value.decode("latin-1")
        return head

    def _data(self, stream_id: int, flags: int, data: bytes, start: int, end: int) -> None:
        size = end - start
        self.received += size
        if self.received > MAX_WINDOW // 2:  # give the connection window back
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.received)))
            self.received = 0
        if flags & PADDED and size:
            pad = data[start]
            if pad >= size:
                raise _ConnectionError(PROTOCOL_ERROR, "padding past the frame")
            start, end = start + 1, end - pad
        stream = self.streams.get(stream_id)
        if stream is None or not stream.receiving:
            return  # a stream answered, reset or closed: what it still sends is dropped
        if not stream.refused and end > start:
            stream.last_data = self.loop.time()
            self._take(stream, data, start, end)
        if flags & END_STREAM:
            self._end_of_request(stream)

    def _take(self, stream: _Stream, data: bytes, start: int, end: int) -> None:
        """Message bytes of a stream: reserved in the budget, split into messages."""
        view = memoryview(data)
        while start < end and not stream.refused:
            body = stream.body
            if stream.expected < 0:  # the message's 5-byte prefix
                if not body and end - start >= 5:
                    compressed, length = _MESSAGE_HEAD.unpack_from(data, start)
                    start += 5
                else:
                    take = min(5 - len(body), end - start)
                    body += view[start : start + take]
                    start += take
                    if len(body) < 5:
                        return
                    compressed, length = _MESSAGE_HEAD.unpack_from(body)
                    body.clear()
                if not self._admit(stream, compressed, length):
                    return
                if end - start >= length:  # the whole message in this frame: no buffer
                    start += length
                    self._deliver(stream, view[start - length : start])
                    continue
                # Its whole length at once, filled in place as frames come: appending frame
                # by frame would copy it again each time the buffer grew. (The length is
                # reserved in the memory budget already.)
                stream.body = body = bytearray(length)
                stream.filled = 0
            filled = stream.filled
            take = min(stream.expected - filled, end - start)
            body[filled : filled + take] = view[start : start + take]
            start += take
            stream.filled = filled = filled + take
            if filled == stream.expected:
                stream.body = bytearray()  # the message is handed over, not copied
                self._deliver(stream, body)

    def _admit(self, stream: _Stream, compressed: int, length: int) -> bool:
        """A message's prefix read: within the limits and reserved, or the call refused."""
        context = stream.context
        assert context is not None
        if stream.id not in self.streams:
            return False
        if stream.inbox is None and stream.messages:
            self._refuse(
                stream,
                StatusCode.INVALID_ARGUMENT,
                "a unary call carries one request message; this one carried more",
            )
            return False
        if stream.inbox is not None and stream.inbox.qsize() >= _INBOX:
            self._refuse(
                stream,
                StatusCode.RESOURCE_EXHAUSTED,
                f"more than {_INBOX} messages sent ahead of their answers",
            )
            return False
        if length > self.max_message_bytes:
            self._refuse(
                stream,
                StatusCode.RESOURCE_EXHAUSTED,
                f"the message is {length} bytes, over the limit of "
                f"{self.max_message_bytes} (MODELSERVE_MAX_REQUEST_BYTES)",
            )
            return False
        if compressed and stream.encoding not in (b"gzip", b"deflate"):
            # Compressed with what the call did not name (INTERNAL, as gRPC has it), or with
            # an encoding this server does not have (UNIMPLEMENTED).
            identity = stream.encoding == b"identity"
            self._refuse(
                stream,
                StatusCode.INTERNAL if identity else StatusCode.UNIMPLEMENTED,
                f"a message compressed as {stream.encoding.decode('latin-1')!r}: this "
                "server takes gzip, deflate or identity",
            )
            return False
        try:
            # At least a little per message: empty ones cost their bookkeeping.
            context.reservation.grow(max(length, 64))
        except errors.Overloaded as exc:
            self._refuse(stream, grpc_code_of(exc), exc.message)
            return False
        stream.expected = length
        stream.compressed = bool(compressed)
        return True

    def _deliver(self, stream: _Stream, message: Received) -> None:
        stream.expected = -1
        if stream.compressed:
            decoded = self._decompressed(stream, message)
            if decoded is None:
                return
            message = decoded
        if stream.inbox is not None:
            stream.inbox.put_nowait(message)
        else:
            stream.messages.append(message)

    def _decompressed(self, stream: _Stream, message: Received) -> bytes | None:
        # gzip has a header of its own; deflate is zlib's format.
        inflater = zlib.decompressobj(31 if stream.encoding == b"gzip" else 15)
        try:
            out = inflater.decompress(message, self.max_message_bytes + 1)
        except zlib.error as exc:
            self._refuse(stream, StatusCode.INTERNAL, f"the message does not inflate: {exc}")
            return None
        if len(out) > self.max_message_bytes:
            self._refuse(
                stream,
                StatusCode.RESOURCE_EXHAUSTED,
                f"the message inflates past the limit of {self.max_message_bytes} bytes "
                "(MODELSERVE_MAX_REQUEST_BYTES)",
            )
            return None
        if not inflater.eof:
            self._refuse(stream, StatusCode.INTERNAL, "the compressed message is cut short")
            return None
        context = stream.context
        assert context is not None
        try:  # the inflated message is what the call holds
            context.reservation.grow(len(out))
        except errors.Overloaded as exc:
            self._refuse(stream, grpc_code_of(exc), exc.message)
            return None
        return out

    def _end_of_request(self, stream: _Stream) -> None:
        stream.receiving = False
        if stream.refused:
            if stream.trailer_block is None and not stream.outbox:
                self._forget(stream)
            return
        if stream.inbox is not None:
            stream.inbox.put_nowait(None)
            return
        if stream.expected >= 0 or stream.body:
            self._refuse(stream, StatusCode.INVALID_ARGUMENT, "the call ended inside its message")
        elif len(stream.messages) != 1:
            self._refuse(
                stream,
                StatusCode.INVALID_ARGUMENT,
                f"a unary call carries one request message; this one carried "
                f"{len(stream.messages)}",
            )
        else:
            handler = self.methods.unary[stream.path]
            stream.task = self.loop.create_task(self._unary(stream, handler, stream.messages.pop()))

    def _refuse(self, stream: _Stream, code: StatusCode, message: str) -> None:
        """Answer a call the transport cannot give its handler; what it still sends is
        dropped. It has an access line, as refused HTTP requests have."""
        stream.refused = True
        stream.body = bytearray()
        stream.messages.clear()
        context = stream.context
        assert context is not None
        request_id = access.request_id_from(context.metadata.get("x-request-id"))
        access.log_request(
            request_id,
            "POST",
            stream.path.decode("latin-1"),
            _HTTP_OF.get(code, 500),
            time.perf_counter() - stream.started,
            protocol="grpc",
            error=code.name,
        )
        self._finish(stream, code, message, ((access.REQUEST_ID.decode(), request_id),))

    async def _unary(self, stream: _Stream, handler: Unary, message: Received) -> None:
        context = stream.context
        assert context is not None
        try:
            result = await handler(message, context)
        except Aborted as exc:
            self._finish(stream, exc.code, exc.message, exc.trailers)
            return
        except asyncio.CancelledError:
            return  # the client reset the call, or left: there is nobody to answer
        except Exception:
            logger.exception("gRPC call %s failed", stream.path.decode("latin-1"))
            self._finish(stream, StatusCode.INTERNAL, "internal error")
            return
        try:
            self._answer(stream, result, context)
        except Exception:  # a fault of ours: the call still ends, with a status
            logger.exception("gRPC call %s failed", stream.path.decode("latin-1"))
            self._finish(stream, StatusCode.INTERNAL, "internal error")

    def _answer(self, stream: _Stream, result: Message | Pieces, context: CallContext) -> None:
        pieces = (result.SerializeToString(),) if isinstance(result, Message) else result
        length = sum(len(piece) for piece in pieces)
        size = length + 5
        if not self.paused and size <= min(self.window, stream.window, _AT_ONCE):
            # The common case: headers, the answer and the trailers in one write.
            if stream.id not in self.streams:
                return
            self.window -= size
            stream.window -= size
            block = _OK
            for name, value in context.trailers:
                block += literal(name.encode("latin-1"), value.encode("latin-1"))
            head = self._header_frames(stream.id, 0, _RESPONSE_HEAD + _ACCEPT_ENCODING)
            trailers = self._header_frames(stream.id, END_STREAM, block)
            framed = _MESSAGE_HEAD.pack(0, length)
            if size <= self.max_frame:
                data_head = _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, DATA, 0, stream.id)
                self._write(b"".join((head, data_head, framed, *pieces, trailers)))
            else:
                out = [head, *self._frames_of((framed, *pieces), stream.id), trailers]
                self._writelines(out)
            self._forget(stream)
            if self.going_away and not self.streams:
                self._close_soon()
            return
        self._send(stream, pieces, now=False)
        self._finish(stream, StatusCode.OK, "", context.trailers)

    def _frames_of(
        self, pieces: Iterable[bytes | memoryview], stream_id: int
    ) -> list[bytes | memoryview]:
        """`pieces` as DATA frames of the largest size the client takes, views of the pieces
        with a head before each: what _flush makes of an answer that has the window, in one
        pass instead of a pass over the outbox for each frame."""
        limit = self.max_frame
        full = _FRAME_HEAD.pack(limit >> 16, limit & 0xFFFF, DATA, 0, stream_id)
        out: list[bytes | memoryview] = []
        frame_pieces: list[bytes | memoryview] = []
        room = limit
        for piece in pieces:
            at, left = 0, len(piece)
            view = memoryview(piece)
            while left:
                take = min(room, left)
                frame_pieces.append(view[at : at + take] if take < len(piece) else piece)
                at += take
                left -= take
                room -= take
                if not room:
                    out.append(full)
                    out += frame_pieces
                    frame_pieces.clear()
                    room = limit
        if frame_pieces:
            size = limit - room
            out.append(_FRAME_HEAD.pack(size >> 16, size & 0xFFFF, DATA, 0, stream_id))
            out += frame_pieces
        return out

    async def _streaming(self, stream: _Stream, handler: Streaming) -> None:
        inbox, context = stream.inbox, stream.context
        assert inbox is not None
        assert context is not None

        async def messages() -> AsyncIterator[Received]:
            while (message := await inbox.get()) is not None:
                yield message

        try:
            async for answer in handler(messages(), context):
                self._send(stream, (answer.SerializeToString(),))
                if stream.outbox:  # the next answer waits until the client reads this one
                    stream.drained = self.loop.create_future()
                    await stream.drained
        except Aborted as exc:
            self._finish(stream, exc.code, exc.message, exc.trailers)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            logger.exception("gRPC call %s failed", stream.path.decode("latin-1"))
            self._finish(stream, StatusCode.INTERNAL, "internal error")
            return
        self._finish(stream, StatusCode.OK, "", context.trailers)

    # Frames out

    def _send(self, stream: _Stream, pieces: Pieces, now: bool = True) -> None:
        """One answer message on a stream, as far as the windows let it go now (or, not
        `now`, at the next flush: a unary answer's flush sends its trailers with it)."""
        if stream.id not in self.streams:
            return
        head = b""
        if not stream.headers_sent:
            stream.headers_sent = True
            head = self._header_frames(stream.id, 0, _RESPONSE_HEAD + _ACCEPT_ENCODING)
        length = sum(len(piece) for piece in pieces)
        framed = _MESSAGE_HEAD.pack(0, length)
        size = length + 5
        if (
            not stream.outbox
            and not self.paused
            and size <= min(self.window, stream.window, self.max_frame)
        ):  # the common case: one DATA frame, sent now
            self.window -= size
            stream.window -= size
            data_head = _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, DATA, 0, stream.id)
            self._write(b"".join((head, data_head, framed, *pieces)))
            return
        if not stream.outbox:  # the client's reading is timed from here
            stream.last_data = self.loop.time()
        stream.prelude += head
        stream.outbox += [memoryview(framed), *(memoryview(piece) for piece in pieces)]
        if now:
            self._flush(stream)

    def _finish(
        self,
        stream: _Stream,
        code: StatusCode,
        message: str,
        trailers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """The call's status, in trailers after its answer (or alone, as trailers-only)."""
        if stream.id not in self.streams or stream.trailer_block is not None:
            return
        block = _OK if code is StatusCode.OK else literal(b"grpc-status", b"%d" % code.value[0])
        if message:
            block += literal(b"grpc-message", _percent_encoded(message))
        for name, value in trailers:
            block += literal(name.encode("latin-1"), value.encode("latin-1"))
        if not stream.headers_sent:  # trailers-only: the status in the answer's headers
            stream.headers_sent = True
            block = _RESPONSE_HEAD + block
        stream.trailer_block = block
        self._flush(stream)

    def _close_stream(self, stream: _Stream, out: list[bytes | memoryview]) -> None:
        block = stream.trailer_block
        assert block is not None
        out.append(self._header_frames(stream.id, END_STREAM, block))
        if stream.receiving:  # the client need send no more of it
            out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream, None)
        self.stalled.pop(stream, None)
        if stream.context is not None:
            stream.context.reservation.release()
        stream.outbox.clear()
        stream.receiving = False
        task = stream.task
        if task is not None and not task.done() and task is not asyncio.current_task(self.loop):
            task.cancel()  # a handler still running for a call that has ended
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)

    def _header_frames(self, stream_id: int, flags: int, block: bytes) -> bytes:
        if len(block) <= self.max_frame:
            return frame(HEADERS, flags | END_HEADERS, stream_id, block)
        size = self.max_frame
        parts = [block[at : at + size] for at in range(0, len(block), size)]
        out = [frame(HEADERS, flags, stream_id, parts[0])]
        for index, part in enumerate(parts[1:], 2):
            out.append(
                frame(CONTINUATION, END_HEADERS if index == len(parts) else 0, stream_id, part)
            )
        return b"".join(out)

    def _flush(self, stream: _Stream) -> None:
        """Send what the windows allow of a stream's waiting answer, then its trailers: its
        headers, frames and trailers in one write when they can all go."""
        if stream.id not in self.streams:
            return
        outbox = stream.outbox
        out: list[bytes | memoryview] = []
        if stream.prelude:  # headers: not flow-controlled
            out.append(stream.prelude)
            stream.prelude = b""
        while outbox and not self.paused:
            allowed = min(self.window, stream.window, self.max_frame)
            if allowed <= 0:
                break
            out += self._data_frame(stream, allowed)
            if len(out) > 64 and self.transport is not None:
                self._writelines(out)
                out = []
        if not outbox and stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        if not outbox and stream.trailer_block is not None:
            self._close_stream(stream, out)
        elif outbox:  # waits in one queue, at its back if it was in neither
            stalled = stream.window <= 0
            (self.blocked if stalled else self.stalled).pop(stream, None)
            (self.stalled if stalled else self.blocked)[stream] = None
        if out:
            self._writelines(out)
        if self.going_away and not self.streams:
            self._close_soon()

    def _writelines(self, out: list[bytes | memoryview]) -> None:
        if self.transport is not None and not self.failed:
            self.transport.writelines(out)

    def _data_frame(self, stream: _Stream, allowed: int) -> list[bytes | memoryview]:
        """A DATA frame of at most `allowed` bytes from the head of the stream's outbox."""
        outbox = stream.outbox
        chunk: list[bytes | memoryview] = []
        taken = 0
        while outbox and taken < allowed:
            piece = outbox[0]
            if len(piece) <= allowed - taken:
                chunk.append(outbox.pop(0))
                taken += len(piece)
            else:
                cut = allowed - taken
                chunk.append(piece[:cut])
                outbox[0] = piece[cut:]
                taken += cut
        self.window -= taken
        stream.window -= taken
        stream.last_data = self.loop.time()
        return [_FRAME_HEAD.pack(taken >> 16, taken & 0xFFFF, DATA, 0, stream.id), *chunk]

    def _flush_blocked(self) -> None:
        """Send what waited for the connection's window or the socket, in the order it began
        to wait, until one of them runs out: each stream visited sends or waits again."""
        blocked = self.blocked
        while blocked and self.window > 0 and not self.paused:
            stream = next(iter(blocked))
            del blocked[stream]
            self._flush(stream)  # back in a queue if some of it still waits


@dataclass(frozen=True)
class Timeouts:
    """The limits `GrpcConnection.expire` holds calls and connections to, in seconds."""

    header_s: float  # to start HTTP/2
    body_idle_s: float  # without any of a message arriving, or of an answer being read
    request_s: float  # for a whole message to arrive


class _Head:
    """What a call's header block says: its path, metadata (shared by the calls whose blocks
    were the same: handlers read it, never change it), timeout, encoding, and whether its
    content type is gRPC's."""

    __slots__ = ("encoding", "grpc", "metadata", "path", "timeout_s")

    def __init__(self) -> None:
        self.path = b""
        self.metadata: dict[str, str] = {}
        self.timeout_s: float | None = None
        self.encoding = b"identity"
        self.grpc = False


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


# The HTTP status an access line gives a call the transport answered (as REST would have).
_HTTP_OF = {
    StatusCode.DEADLINE_EXCEEDED: 408,
    StatusCode.RESOURCE_EXHAUSTED: 413,
    StatusCode.UNAVAILABLE: 503,
    StatusCode.INVALID_ARGUMENT: 400,
    StatusCode.UNIMPLEMENTED: 404,
    StatusCode.INTERNAL: 400,
}
