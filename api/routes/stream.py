"""`/v1/stream`: a live conversation over a WebSocket (message formats in api/stream_messages.py, README "Live
streams").

Every connection is accepted, so that every client, a browser included, reads why it is refused: an `error` message
(problem+json) and then a close code. The key comes in the handshake's headers (as for /v1) or, for clients that
cannot set headers, in the `open` message; never in the URL, which proxies and access logs keep.

Two tasks serve an open stream. The reader takes every message as it arrives (so pings, `close` and refusals are
answered at once) and queues turns, at most `max_pending_turns` of them: a turn beyond that is refused with a 503
error rather than queued. The writer answers queued turns one at a time, in order, through the conversation. The
stream is closed when the client asks (after its turns are answered), after `idle_timeout_s` without a message
while nothing is in progress, at the turn limit, on a message over the size limit, or when the served model changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import IntEnum

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.types import Message

from api import stream_messages as messages
from api.auth import HEADER_HINT, authorize_key, presented_key
from api.deps import ServiceState
from api.domain_errors import DomainError, ModelChanged
from api.errors import FieldError, Problem, domain_problem, invalid, too_large, unavailable
from api.inputs import RawTurn, checked_utterance
from api.stream import LiveConversation, OpenStreams, StreamLimits, new_conversation_id
from api.stream_messages import CloseMessage, MessageRefused, OpenMessage, PingMessage, TurnMessage
from core.db.models import Role
from core.settings import CUSTOMER_SPEAKER

log = logging.getLogger(__name__)
router = APIRouter(tags=["stream"])


class CloseCode(IntEnum):
    """WebSocket close codes: the protocol's own where one fits, else 4000 + the HTTP status of the same refusal."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the served model changed (or the server is stopping): open a new stream
    TRY_AGAIN_LATER = 1013  # too many open streams, no model loaded, or keys cannot be checked now
    BAD_REQUEST = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    IDLE = 4408
    TOO_MANY_TURNS = 4413
    INVALID_OPEN = 4422


AUTH_CODES = {401: CloseCode.UNAUTHORIZED, 403: CloseCode.FORBIDDEN, 503: CloseCode.TRY_AGAIN_LATER}
KEY_HINT = f"{HEADER_HINT} in the handshake, or `api_key` in the `open` message"


class StreamEnd(Exception):
    """Why the stream ends: the close code, and the problem to send as an `error` message before closing."""

    def __init__(self, code: CloseCode, problem: Problem | None = None, turn_id: str | None = None) -> None:
        super().__init__(problem.detail if problem else code.name)
        self.code = code
        self.problem = problem
        self.turn_id = turn_id

    @property
    def reason(self) -> str:
        """The close frame's reason: at most 123 bytes, so the `error` message carries the full detail."""
        return (self.problem.detail if self.problem else self.code.name.lower()).encode()[:123].decode(errors="ignore")


@dataclass(frozen=True)
class _Pending:
    turn: RawTurn
    turn_id: str | None
    started: float


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """A live conversation: `open`, then `turn` messages as they happen, each answered with its prediction."""
    await websocket.accept()
    await _Session(websocket, websocket.app.state.service, websocket.app.state.open_streams).run()


class _Session:
    def __init__(self, websocket: WebSocket, state: ServiceState, open_streams: OpenStreams) -> None:
        self._websocket = websocket
        self._state = state
        self._open_streams = open_streams
        self._limits = StreamLimits.from_settings(state.settings)
        self._send_lock = asyncio.Lock()
        self._pending: asyncio.Queue[_Pending | None] = asyncio.Queue()  # bounded by the reader, not by maxsize
        self._in_flight = False
        self._conversation: LiveConversation | None = None
        self._speakers: set[str] | None = None

    async def run(self) -> None:
        try:
            code = await self._serve()
        except WebSocketDisconnect as gone:
            code = gone.code
        except Exception:
            log.exception("live stream failed")
            code = CloseCode.INTERNAL_ERROR
            with contextlib.suppress(Exception):
                await self._websocket.close(code, "internal error; it has been logged")
        self._state.metrics.stream_closes.labels(str(int(code))).inc()

    async def _serve(self) -> int:
        """Open, converse, and close as the ending says; the close code."""
        try:
            if not self._open_streams.enter():
                limit = self._open_streams.limit
                raise StreamEnd(
                    CloseCode.TRY_AGAIN_LATER, unavailable(f"{limit} streams are open; the limit is {limit}")
                )
            try:
                self._conversation = await self._open()
                end = await self._converse()
            finally:
                self._open_streams.leave()
        except StreamEnd as raised:
            end = raised
        await self._finish(end)
        return end.code

    # -------------------------------------------------------------------------------------------- opening

    async def _open(self) -> LiveConversation:
        header_key = presented_key(self._websocket)
        if header_key is not None:
            await self._authorize(header_key)
        request = await self._first_message()
        if header_key is None:
            await self._authorize(request.api_key)
        elif request.api_key is not None:
            raise StreamEnd(CloseCode.BAD_REQUEST, invalid("api_key", "send the API key once: headers or `open`"))
        customer = request.customer or CUSTOMER_SPEAKER
        if request.speakers is not None and customer not in request.speakers:
            problem = invalid("customer", f"the customer {customer!r} is not one of the declared speakers")
            raise StreamEnd(CloseCode.INVALID_OPEN, problem)
        model = self._state.holder.current
        if model is None:
            detail = f"No model is being served: {self._state.holder.last_error or 'not loaded yet'}."
            raise StreamEnd(CloseCode.TRY_AGAIN_LATER, unavailable(detail, kind="no-model"))
        self._speakers = set(request.speakers) if request.speakers is not None else None
        conversation = LiveConversation(
            self._state.predictor,
            request.conversation_id or new_conversation_id(),
            customer,
            self._state.settings.stream_escalation_threshold,
        )
        limits = self._limits.describe()
        await self._send(messages.opened(conversation.conversation_id, customer, model.version, limits))
        return conversation

    async def _authorize(self, key: str | None) -> None:
        try:
            await authorize_key(key, self._state.auth, Role.PREDICT, where=KEY_HINT)
        except Problem as problem:
            raise StreamEnd(AUTH_CODES.get(problem.status_code, CloseCode.BAD_REQUEST), problem) from None

    async def _first_message(self) -> OpenMessage:
        message = await self._receive(self._limits.open_timeout_s, "the `open` message")
        try:
            request = self._parse(message)
        except MessageRefused as refused:
            code = CloseCode.INVALID_OPEN if refused.problem.status_code == 422 else CloseCode.BAD_REQUEST
            raise StreamEnd(code, refused.problem) from None
        if not isinstance(request, OpenMessage):
            raise StreamEnd(CloseCode.BAD_REQUEST, invalid("type", "the first message must be `open`", status=400))
        return request

    # -------------------------------------------------------------------------------------------- conversing

    async def _converse(self) -> StreamEnd:
        """Read and answer until the stream ends; the ending (a StreamEnd raised by either task propagates)."""
        reader = asyncio.create_task(self._read(), name="stream-reader")
        writer = asyncio.create_task(self._answer_turns(), name="stream-writer")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if (error := task.exception()) is not None:
                    raise error
            return reader.result()
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read(self) -> StreamEnd:
        """Take client messages until the client closes or a limit ends the stream; queued turns are answered
        before the ending is returned."""
        while True:
            message = await self._receive(self._limits.idle_timeout_s, "a message", wait_while_busy=True)
            try:
                request = self._parse(message)
                ending = await self._handle(request)
            except MessageRefused as refused:
                await self._send(messages.error(refused.problem, refused.turn_id))
                continue
            if ending is not None:
                self._pending.put_nowait(None)  # the writer stops after the turns already queued
                return ending

    async def _handle(self, request: messages.ClientMessage) -> StreamEnd | None:
        match request:
            case TurnMessage():
                return self._queue_turn(request)
            case PingMessage():
                await self._send(messages.PONG)
            case CloseMessage():
                return StreamEnd(CloseCode.NORMAL)
            case OpenMessage():
                raise MessageRefused(invalid("type", "the stream is already open"))
        return None

    def _queue_turn(self, request: TurnMessage) -> StreamEnd | None:
        started = time.perf_counter()
        limit = self._limits.max_turns
        if self._turns_accepted() >= limit:
            problem = too_large("turns", f"a stream holds at most {limit} turns; open a new stream", limit)
            return StreamEnd(CloseCode.TOO_MANY_TURNS, problem, request.id)
        waiting = self._pending.qsize()
        if waiting >= self._limits.max_pending_turns:
            detail = f"{waiting} turns of this stream are waiting to be answered; wait for their answers and resend"
            raise MessageRefused(unavailable(detail, kind="overloaded"), request.id)
        try:
            turn = checked_utterance(request, self._state.settings)
        except Problem as problem:
            raise MessageRefused(problem, request.id) from None
        if self._speakers is not None and turn.speaker not in self._speakers:
            raise MessageRefused(invalid("speaker", f"{turn.speaker!r} is not a declared speaker"), request.id)
        self._pending.put_nowait(_Pending(turn, request.id, started))
        return None

    def _turns_accepted(self) -> int:
        assert self._conversation is not None
        return self._conversation.turns + self._pending.qsize() + int(self._in_flight)

    async def _answer_turns(self) -> None:
        while (pending := await self._pending.get()) is not None:
            self._in_flight = True
            try:
                await self._answer(pending)
            finally:
                self._in_flight = False

    async def _answer(self, pending: _Pending) -> None:
        assert self._conversation is not None
        try:
            reply = await self._conversation.add(pending.turn, pending.started)
        except ModelChanged as error:
            raise StreamEnd(CloseCode.SERVICE_RESTART, domain_problem(error), pending.turn_id) from None
        except DomainError as error:
            await self._send(messages.error(domain_problem(error), pending.turn_id))
            return
        await self._send(messages.prediction(reply.prediction, pending.turn_id))
        if reply.escalation is not None:
            self._state.metrics.escalations.inc()
            await self._send(reply.escalation.message(pending.turn_id))

    # -------------------------------------------------------------------------------------------- transport

    async def _receive(self, timeout_s: float, what: str, wait_while_busy: bool = False) -> Message:
        """The next message; StreamEnd after `timeout_s` without one (not while a turn is in progress, when
        `wait_while_busy`), WebSocketDisconnect when the client has gone."""
        while True:
            try:
                message = await asyncio.wait_for(self._websocket.receive(), timeout_s)
            except TimeoutError:
                if wait_while_busy and (self._in_flight or not self._pending.empty()):
                    continue
                detail = f"no message for {timeout_s:g} s: the stream is closed (waiting for {what})"
                raise StreamEnd(CloseCode.IDLE, Problem(408, detail, kind="idle")) from None
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
            return message

    def _parse(self, message: Message) -> messages.ClientMessage:
        text = message.get("text")
        if text is None:
            detail = "binary frames are not accepted: send JSON text messages (audio as base64)"
            raise MessageRefused(Problem(415, detail, errors=[FieldError("message", detail, "text")]))
        data = text.encode("utf-8")
        limit = self._limits.max_message_bytes
        if len(data) > limit:
            problem = too_large("message", f"the message has {len(data)} bytes; the limit is {limit}", limit)
            raise StreamEnd(CloseCode.MESSAGE_TOO_BIG, problem)
        return messages.parse_message(data)

    async def _send(self, message: dict[str, object]) -> None:
        async with self._send_lock:  # the reader and the writer both answer
            await self._websocket.send_json(message)

    async def _finish(self, end: StreamEnd) -> None:
        """The last words of a stream the server ends: the error (or, on a normal close, `closed`), then the close."""
        with contextlib.suppress(Exception):  # the client may be gone already
            if end.problem is not None:
                await self._send(messages.error(end.problem, end.turn_id))
            elif end.code == CloseCode.NORMAL and self._conversation is not None:
                await self._send(messages.closed(self._conversation.conversation_id, self._conversation.turns))
            await self._websocket.close(end.code, end.reason)
