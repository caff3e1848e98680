"""Pure ASGI middleware: the request body limit, compressed request bodies, and the HTTP metrics (latency by route,
in-flight requests)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import Problem, invalid, too_large, unsupported
from api.metrics import Metrics

# Content-Encoding of a request body -> zlib's wbits for it. "deflate" is the zlib format (RFC 9110 8.4.1.2), which
# is what tritonclient's request_compression_algorithm="deflate" sends.
DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


@dataclass(frozen=True)
class BodyLimits:
    """The most bytes of a request body: `max_bytes`, or `larger[path]` for a path with a limit of its own (a whole
    call recording is larger than any prediction request)."""

    max_bytes: int
    larger: Mapping[str, int] = field(default_factory=dict)

    def of(self, scope: Scope) -> int:
        return self.larger.get(scope["path"].rstrip("/"), self.max_bytes)


def _too_large(limit: int, once: str = "") -> Problem:
    return too_large("body", f"the request body exceeds the limit of {limit} bytes{once}", limit)


class BodyLimitMiddleware:
    """413 as soon as the declared or the received body exceeds its limit, before it is all read."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.of(scope)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self.app(scope, _refusing(_too_large(limit)), send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


class ContentDecodingMiddleware:
    """Request bodies sent with Content-Encoding gzip or deflate reach the app decompressed, held to the body limit
    once decompressed too (413); a body that does not decompress is a 400, another content coding a 415."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        coding = Headers(scope=scope).get("content-encoding", "").strip().lower() if scope["type"] == "http" else ""
        if coding in ("", "identity"):
            await self.app(scope, receive, send)
            return
        encoded = (b"content-encoding", b"content-length")  # neither describes the body the app will read
        decoded = {**scope, "headers": [(key, value) for key, value in scope["headers"] if key not in encoded]}
        if coding not in DECODABLE:
            await self.app(decoded, _refusing(_unsupported_coding(coding)), send)
            return
        await self.app(decoded, _Decompressing(receive, coding, self.limits.of(scope)).receive, send)


class _Decompressing:
    def __init__(self, receive: Receive, coding: str, limit: int) -> None:
        self._receive = receive
        self._coding = coding
        self._limit = limit
        self._zlib = zlib.decompressobj(DECODABLE[coding])
        self._produced = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        more = message.get("more_body", False)
        return {"type": "http.request", "body": self._decompress(message.get("body", b""), more), "more_body": more}

    def _decompress(self, data: bytes, more: bool) -> bytes:
        try:
            out = self._zlib.decompress(data, self._limit - self._produced + 1)  # a bomb stops at the limit
            while self._zlib.eof and self._zlib.unused_data and len(out) <= self._limit - self._produced:
                following = self._zlib.unused_data  # the next member of a multi-member gzip file
                self._zlib = zlib.decompressobj(DECODABLE[self._coding])
                out += self._zlib.decompress(following, self._limit - self._produced - len(out) + 1)
            if not more and not self._zlib.eof and not self._zlib.unconsumed_tail:
                raise zlib.error("the compressed data ends early")
        except zlib.error as error:
            raise invalid("body", f"the request body is not valid {self._coding} data: {error}", status=400) from None
        self._produced += len(out)
        if self._produced > self._limit:
            raise _too_large(self._limit, " once decompressed")
        return out


def _unsupported_coding(coding: str) -> Problem:
    accepted = ", ".join(sorted(DECODABLE))
    detail = f"Content-Encoding {coding} is not supported; send the body as it is or compressed with {accepted}."
    headers = {"Accept-Encoding": accepted}  # RFC 7694: the codings the 415 would have accepted, as the detail lists
    return unsupported("content-encoding", detail, "unsupported content coding", accepted, headers)


def _refusing(problem: Problem) -> Receive:
    """A receive that raises `problem` on the first read, inside the app, so its problem+json handler answers."""

    async def refuse() -> Message:
        raise problem

    return refuse


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"  # templates only: bounded label values
            self.metrics.request_latency.labels(label, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )
