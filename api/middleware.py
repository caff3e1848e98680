"""Pure ASGI middleware: the request body limit and the HTTP metrics (latency by route, in-flight requests)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import too_large
from api.metrics import Metrics


class BodyLimitMiddleware:
    """413 as soon as the declared or the received body exceeds `max_bytes`, before it is all read. `larger` maps a
    path to a limit of its own (a whole call recording is larger than any prediction request)."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = dict(larger or {})

    def _problem(self, limit: int) -> Exception:
        return too_large("body", f"the request body exceeds the limit of {limit} bytes", limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope["path"].rstrip("/"), self.max_bytes)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # Raised from the first read, inside the app, so the app's problem+json handler answers it.
            async def refuse() -> Message:
                raise self._problem(limit)

            await self.app(scope, refuse, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._problem(limit)
            return message

        await self.app(scope, counting_receive, send)


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
