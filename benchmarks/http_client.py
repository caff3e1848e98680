"""The load generator's HTTP/1.1 client: one keep-alive connection that sends a request and reads its answer.

The load generator shares the cores it measures, so every microsecond it spends per request is taken from the
server under test. aiohttp took about 0.34 ms of CPU per request at concurrency 32 (0.11 of 2 cores at 325
requests/s, against 0.05 of 2 cores for this one); it does only what a closed-loop benchmark needs: the request
written as bytes, a status line, `Content-Length` or chunked bodies, and the headers with their names lower-cased.
It speaks to every server the same way, so no peer gains from it over another (docs/BENCHMARKS.md, "Answers in
waves, and a lighter load generator").
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

HEADER_LIMIT = 64 * 1024  # bytes of a status line and headers before the answer is refused as malformed


class HttpError(Exception):
    """The connection failed, closed early, or the server's answer was not HTTP/1.1 this client can read."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


def request_bytes(
    method: str, host: str, path: str, body: bytes = b"", content_type: str = "application/json"
) -> bytes:
    """One request as it goes on the wire."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: equipoise-load\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


class _Reader(asyncio.Protocol):
    """Collects one answer at a time from the transport; `expect` arms it for the next."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[Answer] | None = None
        self._closed: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def expect(self) -> asyncio.Future[Answer]:
        self._answer = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            self._answer.set_exception(self._closed)
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._answer is None or self._answer.done():
            return
        try:
            answer = _parse(self._buffer)
        except HttpError as error:
            self._answer.set_exception(error)
            return
        if answer is not None:
            self._answer.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = HttpError(f"the connection closed: {exc}" if exc else "the server closed the connection")
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(self._closed)


def _parse(buffer: bytearray) -> Answer | None:
    """The first complete answer in `buffer`, removed from it; None until it has all arrived."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > HEADER_LIMIT:
            raise HttpError(f"no end of headers within {HEADER_LIMIT} bytes")
        return None
    status_line, *lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parsed = _dechunk(buffer, start)
        if parsed is None:
            return None
        body, used = parsed
    else:
        length = _content_length(headers, int(rest[:3]))
        if len(buffer) < start + length:
            return None
        body, used = bytes(buffer[start : start + length]), start + length
    del buffer[:used]
    return Answer(int(rest[:3]), headers, body)


def _content_length(headers: dict[str, str], status: int) -> int:
    declared = headers.get("content-length")
    if declared is None:
        if status < 200 or status in (204, 304):
            return 0
        raise HttpError("an answer without Content-Length or a chunked body (read until close: not supported)")
    if not declared.isdigit():
        raise HttpError(f"a malformed Content-Length: {declared[:40]!r}")
    return int(declared)


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body from `start`: (the body, where it ends in `buffer`), or None while it is incomplete."""
    chunks, at = [], start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        except ValueError:
            raise HttpError("a malformed chunk size") from None
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", line_end)  # the last chunk's empty line, after any trailers
            return (b"".join(chunks), trailer_end + 4) if trailer_end >= 0 else None
        data_start = line_end + 2
        if len(buffer) < data_start + size + 2:
            return None
        chunks.append(bytes(buffer[data_start : data_start + size]))
        at = data_start + size + 2


class Connection:
    """A keep-alive connection to one server; `send` one request at a time. Reconnects when the server closed it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"an http:// URL with a host is needed, not {url!r}")
        self.host = parts.netloc
        self._address = (parts.hostname, parts.port or 80)
        self._reader: _Reader | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._reader = await loop.create_connection(_Reader, *self._address)

    async def send(self, request: bytes, timeout_s: float) -> Answer:
        """`request` (from `request_bytes`) sent and its answer read within `timeout_s` (TimeoutError past it)."""
        if self._reader is None or self._reader.transport is None or self._reader.transport.is_closing():
            await self.open()
        assert self._reader is not None and self._reader.transport is not None
        answer = self._reader.expect()
        self._reader.transport.write(request)
        try:
            async with asyncio.timeout(timeout_s):
                result = await answer
        except BaseException:
            self.close()  # an answer may still come; it must not be read as the next request's
            raise
        if result.headers.get("connection", "").lower() == "close":
            self.close()
        return result

    def close(self) -> None:
        if self._reader is not None and self._reader.transport is not None:
            self._reader.transport.close()
        self._reader = None

    async def __aenter__(self) -> Connection:
        with contextlib.suppress(OSError):
            await self.open()  # connect before the clock starts; a refusal shows on the first send instead
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()
