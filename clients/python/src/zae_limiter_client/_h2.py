"""A small asyncio gRPC client for unary calls over HTTP/2 on a Unix socket: RateLimiter's transport.

Why not ``grpc.aio``: on a two-core machine it spent ~400 us of CPU per call in this process
(measured, docs/benchmarks.md); a rate limiter's caller pays that on every request, and under load
it was the bottleneck of the whole node. This transport does only what a unary call to the daemon
needs, on the event loop's thread, and costs ~50 us per call.

What it implements of HTTP/2 (RFC 9113): the connection preface and SETTINGS (acknowledged both
ways), one stream per call (HEADERS + DATA out; HEADERS, DATA, trailers in), flow control in both
directions (connection and stream send windows, with waiting; receive windows replenished), PING
answers, RST_STREAM, GOAWAY (calls the server did not take fail as unavailable; the next call opens a
new connection), MAX_CONCURRENT_STREAMS and MAX_FRAME_SIZE. Request headers are plain literals
(no compression state); response headers are decoded by ``_hpack``. A call that passes its deadline
resets its stream (CANCEL) and the daemon, which also gets ``grpc-timeout``, does not charge it.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import urllib.parse

from . import _hpack

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_ENABLE_PUSH = 0x2
_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_SETTINGS_MAX_FRAME_SIZE = 0x5
_MAX_WINDOW = 2**31 - 1
_CANCEL = 0x8
# What we let the server send before we replenish the connection window.
_RECEIVE_WINDOW = 1 << 24
_MAX_MESSAGE = 64 << 20

# gRPC status codes by number (as grpc.StatusCode names).
STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class CallError(Exception):
    """A call that did not return a message: the gRPC status name, the message, and the
    ``grpc-status-details-bin`` trailer (a serialized ``google.rpc.Status``) when the daemon sent
    one."""

    def __init__(self, code: str, details: str, status_details: bytes | None = None) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.status_details = status_details


def _binary(value: bytes | None) -> bytes | None:
    """A ``-bin`` header's value: base64, with or without padding (gRPC sends it without)."""
    if value is None:
        return None
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return None


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field without indexing, literal name, no Huffman coding."""
    return b"\x00" + _string(name) + _string(value)


def _string(data: bytes) -> bytes:
    if len(data) < 0x7F:
        return bytes((len(data),)) + data
    out = bytearray((0x7F,))
    rest = len(data) - 0x7F
    while rest >= 0x80:
        out.append((rest & 0x7F) | 0x80)
        rest >>= 7
    out.append(rest)
    return bytes(out) + data


def request_headers(path: str) -> bytes:
    """The header block of a call to ``path``, without its deadline."""
    return (
        b"\x83"  # :method POST (static table 3)
        b"\x86"  # :scheme http (static table 6)
        + _literal(b":path", path.encode())
        + _literal(b":authority", b"localhost")
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"te", b"trailers")
        + _literal(b"user-agent", b"zae-limiter-client-python")
    )


_timeout_headers: dict[float, bytes] = {}


def _timeout_header(seconds: float) -> bytes:
    header = _timeout_headers.get(seconds)
    if header is None:
        millis = max(1, min(int(seconds * 1000), 99_999_999))
        header = _literal(b"grpc-timeout", f"{millis}m".encode())
        if len(_timeout_headers) < 64:
            _timeout_headers[seconds] = header
    return header


class _Stream:
    __slots__ = (
        "block",
        "data",
        "end_stream_headers",
        "future",
        "headers",
        "send_window",
        "trailers",
    )

    def __init__(self, future: asyncio.Future, send_window: int) -> None:
        self.future = future
        self.data = bytearray()
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.send_window = send_window
        self.block = bytearray()
        self.end_stream_headers = False


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to the daemon, shared by every task of the limiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.streams: dict[int, _Stream] = {}
        self.next_stream = 1
        self.decoder = _hpack.Decoder()
        self.send_window = 65_535
        self.initial_stream_window = 65_535
        self.max_frame = 16_384
        self.max_streams: int | None = None
        self.received = 0
        self.closed: CallError | None = None
        self.goaway_last: int | None = None
        self.window_opened = asyncio.Event()
        self.stream_freed = asyncio.Event()
        self.block_stream: int | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = struct.pack(
            ">HIHIHI",
            _SETTINGS_ENABLE_PUSH,
            0,
            _SETTINGS_INITIAL_WINDOW_SIZE,
            _MAX_WINDOW,
            _SETTINGS_HEADER_TABLE_SIZE,
            4096,
        )
        grow = struct.pack(">I", _RECEIVE_WINDOW - 65_535)
        self.transport.write(
            _PREFACE + _frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, grow)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"the daemon closed the connection{f': {exc}' if exc else ''}"
        self._close(CallError("UNAVAILABLE", reason))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buf = self.buffer
        at = 0
        try:
            while len(buf) - at >= 9:
                length = int.from_bytes(buf[at : at + 3], "big")
                if len(buf) - at < 9 + length:
                    break
                kind, flags = buf[at + 3], buf[at + 4]
                stream = int.from_bytes(buf[at + 5 : at + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[at + 9 : at + 9 + length])
                at += 9 + length
                self._frame_received(kind, flags, stream, payload)
        except (CallError, _hpack.HpackError, ValueError, IndexError) as err:
            self._fail_connection(f"protocol error from the daemon: {err}")
            return
        finally:
            del buf[:at]

    # --- frames -----------------------------------------------------------------------------------

    def _frame_received(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self.block_stream is not None and kind != CONTINUATION:
            raise CallError("INTERNAL", "header block interrupted")
        if kind == DATA:
            self._data(flags, stream, payload)
        elif kind == HEADERS:
            body = payload
            if flags & PADDED:
                pad = body[0]
                body = body[1 : len(body) - pad]
            if flags & PRIORITY:
                body = body[5:]
            state = self.streams.get(stream)
            if state is None:
                # A stream we reset: decode to keep the table in step, then drop.
                state = _Stream(asyncio.get_running_loop().create_future(), 0)
                state.future.cancel()
                self.streams[stream] = state
            state.block = bytearray(body)
            state.end_stream_headers = bool(flags & END_STREAM)
            if flags & END_HEADERS:
                self._headers_done(stream)
            else:
                self.block_stream = stream
        elif kind == CONTINUATION:
            if self.block_stream != stream:
                raise CallError("INTERNAL", "unexpected CONTINUATION")
            self.streams[stream].block += payload
            if flags & END_HEADERS:
                self.block_stream = None
                self._headers_done(stream)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.transport.write(_frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self.transport.write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream == 0:
                self.send_window += increment
            elif stream in self.streams:
                self.streams[stream].send_window += increment
            self.window_opened.set()
        elif kind == RST_STREAM:
            state = self.streams.pop(stream, None)
            if state is not None and not state.future.done():
                code = int.from_bytes(payload[:4], "big")
                status = "UNAVAILABLE" if code in (0x7, 0x0) else "INTERNAL"
                state.future.set_exception(
                    CallError(status, f"the daemon reset the call (HTTP/2 error {code})")
                )
            self._stream_freed()
        elif kind == GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.goaway_last = last
            refused = CallError("UNAVAILABLE", "the daemon is closing the connection; retry")
            for sid in [s for s in self.streams if s > last]:
                state = self.streams.pop(sid)
                if not state.future.done():
                    state.future.set_exception(refused)
            if not self.streams:
                self._close(refused)
        # PRIORITY, PUSH_PROMISE (disabled) and unknown frames are ignored.

    def _settings(self, payload: bytes) -> None:
        for at in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack(">HI", payload[at : at + 6])
            if key == _SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.initial_stream_window
                self.initial_stream_window = value
                for state in self.streams.values():
                    state.send_window += delta
                self.window_opened.set()
            elif key == _SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value
            elif key == _SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
                self._stream_freed()

    def _data(self, flags: int, stream: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        self.received += len(payload)
        if self.received >= _RECEIVE_WINDOW // 2:
            self.transport.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        state = self.streams.get(stream)
        if state is None:
            return
        state.data += payload
        if len(state.data) > _MAX_MESSAGE:
            self._reset(stream, CallError("RESOURCE_EXHAUSTED", "answer too large"))
            return
        if flags & END_STREAM:
            self._finish(stream, state)

    def _headers_done(self, stream: int) -> None:
        state = self.streams[stream]
        fields = self.decoder.decode(bytes(state.block))
        state.block = bytearray()
        if state.headers is None:
            state.headers = fields
        else:
            state.trailers = fields
        if state.end_stream_headers:
            if state.trailers is None:  # trailers-only answer
                state.trailers = fields
            self._finish(stream, state)

    def _finish(self, stream: int, state: _Stream) -> None:
        self.streams.pop(stream, None)
        self._stream_freed()
        if state.future.done():
            return
        state.future.set_result(state)
        if self.goaway_last is not None and not self.streams:
            self._close(CallError("UNAVAILABLE", "the daemon closed the connection; retry"))

    def _stream_freed(self) -> None:
        self.stream_freed.set()

    def _reset(self, stream: int, error: CallError) -> None:
        state = self.streams.pop(stream, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(RST_STREAM, 0, stream, struct.pack(">I", _CANCEL)))
        if state is not None and not state.future.done():
            state.future.set_exception(error)
        self._stream_freed()
        self.window_opened.set()

    def _fail_connection(self, reason: str) -> None:
        self._close(CallError("UNAVAILABLE", reason))
        if self.transport is not None:
            self.transport.close()

    def _close(self, error: CallError) -> None:
        if self.closed is None:
            self.closed = error
        streams, self.streams = self.streams, {}
        for state in streams.values():
            if not state.future.done():
                state.future.set_exception(error)
        self.window_opened.set()
        self.stream_freed.set()
        if self.transport is not None and self.goaway_last is not None:
            self.transport.close()

    # --- calls ------------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.closed is None and self.goaway_last is None

    async def call(self, headers: bytes, message: bytes, timeout: float) -> bytes:
        """Sends one request message; returns the answer message or raises CallError. The
        deadline (``timeout`` seconds) covers waiting for a stream and for window too."""
        loop = self.loop
        if self.max_streams is not None and len(self.streams) >= self.max_streams:
            await asyncio.wait_for(self._stream_slot(), timeout)
        if self.closed is not None:
            raise self.closed
        stream = self.next_stream
        self.next_stream += 2
        if self.next_stream > _MAX_WINDOW:
            self.goaway_last = stream  # ids exhausted: the next call opens a new connection
        future = loop.create_future()
        state = _Stream(future, self.initial_stream_window)
        self.streams[stream] = state
        timer = loop.call_later(timeout, self._expire, stream, timeout)
        try:
            block = headers + _timeout_header(timeout)
            body = b"\x00" + len(message).to_bytes(4, "big") + message
            size = len(body)
            if (
                size <= self.max_frame
                and size <= self.send_window
                and size <= state.send_window
                and len(block) <= self.max_frame
            ):
                # The usual case: the whole call in one write.
                self.send_window -= size
                state.send_window -= size
                self.transport.write(
                    _frame(HEADERS, END_HEADERS, stream, block)
                    + _frame(DATA, END_STREAM, stream, body)
                )
            else:
                self._send_headers(stream, block)
                await self._send_data(stream, state, body)
            done = await future
        except asyncio.CancelledError:
            self._reset(stream, CallError("CANCELLED", "the call was cancelled"))
            raise
        finally:
            timer.cancel()
        return self._message(done)

    async def _stream_slot(self) -> None:
        while self.max_streams is not None and len(self.streams) >= self.max_streams:
            if self.closed is not None:
                return
            self.stream_freed.clear()
            await self.stream_freed.wait()

    def _expire(self, stream: int, timeout: float) -> None:
        self._reset(stream, CallError("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s"))

    def _send_headers(self, stream: int, block: bytes) -> None:
        first, rest = block[: self.max_frame], block[self.max_frame :]
        frames = [_frame(HEADERS, 0 if rest else END_HEADERS, stream, first)]
        while rest:
            piece, rest = rest[: self.max_frame], rest[self.max_frame :]
            frames.append(_frame(CONTINUATION, 0 if rest else END_HEADERS, stream, piece))
        self.transport.write(b"".join(frames))

    async def _send_data(self, stream: int, state: _Stream, body: bytes) -> None:
        while body:
            allowed = min(len(body), self.max_frame, self.send_window, state.send_window)
            if self.closed is not None:
                raise self.closed
            if allowed <= 0:
                self.window_opened.clear()
                await self.window_opened.wait()
                continue
            piece, body = body[:allowed], body[allowed:]
            self.send_window -= allowed
            state.send_window -= allowed
            self.transport.write(_frame(DATA, 0 if body else END_STREAM, stream, piece))

    @staticmethod
    def _message(state: _Stream) -> bytes:
        trailers = dict(state.trailers or [])
        headers = dict(state.headers or [])
        status = headers.get(b":status")
        if status != b"200":
            raise CallError("UNAVAILABLE", f"the daemon answered HTTP status {status!r}")
        code = int(trailers.get(b"grpc-status", b"2"))
        if code != 0:
            details = urllib.parse.unquote(
                trailers.get(b"grpc-message", b"").decode("utf-8", "replace")
            )
            raise CallError(
                STATUS_NAMES.get(code, "UNKNOWN"),
                details,
                _binary(trailers.get(b"grpc-status-details-bin")),
            )
        data = state.data
        if len(data) < 5:
            raise CallError("INTERNAL", "the daemon's answer has no message")
        if data[0] != 0:
            raise CallError("INTERNAL", "compressed answers are not supported")
        length = int.from_bytes(data[1:5], "big")
        return bytes(data[5 : 5 + length])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Channel:
    """Opens a connection on first use and a new one after it closes; shared by all tasks."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.connection: Connection | None = None
        self.connecting: asyncio.Future | None = None
        self.headers: dict[str, bytes] = {}

    async def _connection(self, timeout: float) -> Connection:
        conn = self.connection
        if conn is not None and conn.usable:
            return conn
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self._connect(timeout))
        connecting = self.connecting
        try:
            conn = await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self.connecting = None
        return conn

    async def _connect(self, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_unix_connection(Connection, self.socket), timeout
            )
        except asyncio.TimeoutError:
            raise CallError("DEADLINE_EXCEEDED", "connecting timed out") from None
        except OSError as err:
            raise CallError("UNAVAILABLE", f"connect failed: {err}") from None
        old, self.connection = self.connection, conn
        if old is not None:
            old.close()
        return conn

    async def unary(
        self, path: str, message: bytes, timeout: float, metadata: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        headers = self.headers.get(path)
        if headers is None:
            headers = self.headers[path] = request_headers(path)
        for name, value in metadata:
            headers += _literal(name.encode(), value.encode())
        conn = self.connection
        if conn is None or not conn.usable:
            conn = await self._connection(timeout)
        try:
            return await conn.call(headers, message, timeout)
        except asyncio.TimeoutError:
            raise CallError("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s") from None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
