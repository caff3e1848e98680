"""Micro-batching of concurrent requests into model calls.

Requests wait in a bounded asyncio queue; a full queue refuses at once (`Overloaded`), so waiting is never
unbounded. One task forms batches: it takes the first waiting request, then keeps adding requests until the
batch holds `max_size` utterances or `max_wait_s` has passed since the first, and scores the batch on one of
`workers` model threads so the event loop never blocks on ONNX Runtime. The next batch is formed only once a model
thread is free, so requests keep gathering while every thread is busy. A request that would overflow the batch opens
the next one.
With several model threads, a thread freed while another still scores waits for its fair share of the traffic:
the most utterances recently inside the service divided by the threads (`RecentPeak`), or until a busy thread
finishes, whichever comes first. Taking only what arrived during its last call, the threads settle on small
batches under steady load (on 2 cores at 32 concurrent clients, batches of 8 where 16 per thread were in flight),
and a batch of 8 costs the encoder about 15% more CPU per utterance than one of 16 (benchmarks/encoder_calls.py).
A lone request never waits: with no other thread busy it is scored at once.
With several model threads, `max_wait_s` too only gathers up to the fair share: waiting on toward `max_size` let one
batch take every request in flight while the other threads had none (on 2 cores at 32 clients and 3 ms, one core
sat idle and throughput fell by 29 %).
Dialogues of the two context modes are scored in separate calls (`causal` is a graph input).
A batch is answered in waves (`InferenceRuntime.classify_in_waves`): the encoder scores it in length-sorted calls,
shortest first, and each request is answered once the call holding its last turn is done, so the short utterances'
callers send their next requests while the long ones still encode, and a thread freed next finds them waiting (on 2
cores at 32 clients, the cores were idle less: 7 % instead of 11 %; docs/BENCHMARKS.md "Answers in waves").
If a call fails, the requests it had not answered are retried one by one so one bad input cannot fail its neighbours.
A live stream's turn comes with the `History` of its conversation (the turns encoded before); it is scored only by
the model that encoded that history, and refused with `ModelChanged` once another model is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from api.domain_errors import ModelChanged, ModelUnavailable, Overloaded
from api.metrics import Metrics
from api.reload import LoadedModel, ModelHolder
from core.settings import Settings
from model.runtime import TurnPrediction, UtteranceInput

log = logging.getLogger(__name__)

PEAK_WINDOW_S = 1.0  # how long a past peak of the requests in service still sets the fair share of a batch


@dataclass(frozen=True)
class Scored:
    model: LoadedModel
    turns: list[TurnPrediction]


@dataclass(frozen=True)
class History:
    """The turns of a conversation a live stream keeps: embeddings [P, D] from model `version`'s encoder and the
    turns' speakers, in turn order."""

    version: str
    embeddings: np.ndarray
    speakers: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.speakers)


@dataclass(eq=False)
class _Request:
    dialogue: list[UtteranceInput]
    causal: bool
    history: History | None
    future: asyncio.Future[Scored] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.dialogue)


Outcome = list[TurnPrediction] | Exception


class RecentPeak:
    """The largest value seen in the current window of `window_s` or the one before (so older peaks fade)."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._started = time.monotonic()
        self._current = self._previous = 0

    def observe(self, value: int) -> None:
        now = time.monotonic()
        if now - self._started >= self._window_s:
            fresh = now - self._started < 2 * self._window_s
            self._previous, self._current, self._started = (self._current if fresh else 0), 0, now
        self._current = max(self._current, value)

    @property
    def value(self) -> int:
        return max(self._current, self._previous)


class MicroBatcher:
    def __init__(
        self,
        holder: ModelHolder,
        metrics: Metrics,
        *,
        max_size: int,
        max_wait_s: float,
        queue_limit: int,
        workers: int = 1,
        fair_share: bool = True,
    ) -> None:
        self._holder = holder
        self._metrics = metrics
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=queue_limit)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="equipoise-model")
        self._workers = workers
        self._gathers_share = fair_share and workers > 1
        self._free = asyncio.Semaphore(workers)  # model threads without a batch
        self._in_service = 0  # utterances of the requests inside score()
        self._in_service_peak = RecentPeak(PEAK_WINDOW_S)
        self._scoring_now = 0  # utterances in batches on a model thread
        self._changed = asyncio.Event()  # a request arrived or a batch finished
        self._scoring: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, holder: ModelHolder, metrics: Metrics, settings: Settings) -> MicroBatcher:
        return cls(
            holder,
            metrics,
            max_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            queue_limit=settings.batch_queue_limit,
            workers=settings.batch_workers,
            fair_share=settings.batch_fair_share,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="equipoise-batcher")

    async def stop(self) -> None:
        for task in (self._task, *self._scoring):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, *self._scoring) if t is not None), return_exceptions=True)
        while not self._queue.empty():
            _fail(self._queue.get_nowait(), ModelUnavailable("the service is stopping"))
        self._executor.shutdown(wait=True)

    async def score(self, dialogue: list[UtteranceInput], causal: bool, history: History | None = None) -> Scored:
        """`dialogue` scored by the served model; with a `history`, after those turns (only `dialogue` is encoded)."""
        if self._holder.current is None:
            raise ModelUnavailable(self._holder.last_error or "no model is loaded")
        request = _Request(dialogue, causal, history, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self._metrics.rejected.inc()
            raise Overloaded(f"{self._queue.maxsize} requests are already waiting") from None
        self._metrics.queue_depth.set(self._queue.qsize())
        self._in_service += request.size
        self._in_service_peak.observe(self._in_service)
        self._changed.set()
        try:
            return await request.future
        finally:
            self._in_service -= request.size

    async def _run(self) -> None:
        carry: _Request | None = None
        while True:
            await self._free.acquire()
            batch, carry = await self._collect(carry)
            self._metrics.queue_depth.set(self._queue.qsize())
            live = [request for request in batch if not request.future.done()]  # skip callers that left
            size = sum(request.size for request in live)
            self._scoring_now += size
            task = asyncio.create_task(self._score_then_free(live, size))
            self._scoring.add(task)
            task.add_done_callback(self._scoring.discard)

    async def _score_then_free(self, live: list[_Request], size: int) -> None:
        try:
            if live:
                await self._dispatch(live)
        except Exception as error:  # never let one batch kill the loop
            log.exception("batch failed")
            for request in live:
                _fail(request, error)
        finally:
            self._scoring_now -= size
            self._free.release()
            self._changed.set()

    async def _collect(self, carry: _Request | None) -> tuple[list[_Request], _Request | None]:
        first = carry or await self._queue.get()
        batch, size = [first], first.size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while size < self._max_size:
            request = await self._next(deadline - loop.time(), size)
            if request is None:
                break
            if size + request.size > self._max_size:
                return batch, request
            batch.append(request)
            size += request.size
        return batch, None

    async def _next(self, wait_s: float, size: int) -> _Request | None:
        """The next waiting request for a batch of `size` utterances, waiting up to `wait_s` for one, and while
        another thread scores, until the batch holds its fair share; None when the batch is complete."""
        while True:
            self._changed.clear()
            with contextlib.suppress(asyncio.QueueEmpty):
                return self._queue.get_nowait()
            if wait_s > 0 and not (self._gathers_share and size >= self._fair_share()):
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(self._queue.get(), wait_s)
                wait_s = 0
            if not (self._gathers_share and self._scoring_now and size < self._fair_share()):
                return None
            await self._changed.wait()

    def _fair_share(self) -> int:
        return min(self._max_size, math.ceil(self._in_service_peak.value / self._workers))

    async def _dispatch(self, batch: list[_Request]) -> None:
        model = self._holder.current
        if model is None:
            for request in batch:
                _fail(request, ModelUnavailable(self._holder.last_error or "no model is loaded"))
            return
        batch = [request for request in batch if not _kept_by_another_model(request, model)]
        if not batch:
            return
        self._metrics.batch_size.observe(sum(request.size for request in batch))
        loop = asyncio.get_running_loop()

        def answer(outcomes: dict[int, Outcome]) -> None:  # on the model thread, once per wave of the batch
            loop.call_soon_threadsafe(_settle, model, batch, outcomes)

        with self._metrics.batch_seconds.time():
            await loop.run_in_executor(self._executor, _score_batch, model, batch, answer)


def _settle(model: LoadedModel, batch: list[_Request], outcomes: dict[int, Outcome]) -> None:
    for position, outcome in outcomes.items():
        request = batch[position]
        if isinstance(outcome, Exception):
            _fail(request, outcome)
        elif not request.future.done():
            request.future.set_result(Scored(model, outcome))


def _fail(request: _Request, error: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(error)


def _kept_by_another_model(request: _Request, model: LoadedModel) -> bool:
    """A stream whose history another model encoded (a promotion came between its turns) is refused."""
    history = request.history
    if history is None or history.version == model.version:
        return False
    _fail(request, ModelChanged(history.version, model.version))
    return True


Deliver = Callable[[dict[int, Outcome]], None]  # hands outcomes, by position in the batch, to the event loop


def _score_batch(model: LoadedModel, batch: list[_Request], answer: Deliver) -> None:
    """Runs on the model thread: one call per context mode, answered wave by wave as the encoder calls finish
    (`InferenceRuntime.classify_in_waves`), then one by one for the requests of a call that failed."""
    groups: dict[bool, list[int]] = defaultdict(list)
    for position, request in enumerate(batch):
        groups[request.causal].append(position)
    for causal, positions in groups.items():
        _score_group(model, [batch[p] for p in positions], positions, causal, answer)


def _score_group(
    model: LoadedModel, requests: list[_Request], positions: list[int], causal: bool, answer: Deliver
) -> None:
    dialogues = [request.dialogue for request in requests]
    history = [(r.history.embeddings, r.history.speakers) if r.history is not None else None for r in requests]
    unanswered = set(range(len(requests)))
    try:
        for indices, scored in model.runtime.classify_in_waves(dialogues, causal, history):
            answer({positions[i]: turns for i, turns in zip(indices, scored, strict=True)})
            unanswered.difference_update(indices)
        return
    except Exception as error:
        if len(requests) == 1:
            log.exception("model call failed for one request")
            answer({positions[0]: error})
            return
    for i in sorted(unanswered):
        _score_group(model, [requests[i]], [positions[i]], causal, answer)
