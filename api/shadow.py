"""Shadow scoring: a share of live requests is scored again by a challenger version in the background; its
predictions are logged, each linked to the live prediction it pairs with, and never answered.

- Which requests: `shadow_share` of them, chosen by a keyed hash of the request's first prediction id
  (core/audit.py `selected_for_shadow`): random, reproducible from the id, independent of audit sampling. A
  request is shadowed whole, in the context mode it was answered in. Live streams are not shadowed: each of their
  turns is scored after context the champion's encoder computed, which a challenger cannot reuse.
- Which challenger: `shadow_challenger`, else the newest registered candidate (registered, not yet promoted or
  rejected); looked up again every `model_poll_interval_s`. Without one, or when it is the version that answered,
  the request is skipped.
- Never on the request path: the predictor offers a request once its answer is computed; `offer` only puts it on
  a bounded queue (`shadow_queue_limit`) and a full queue drops it. One task takes the requests one at a time and
  scores them with the challenger's own micro-batcher (api/versions.py), so shadow work never waits in the
  champion's queue nor holds more than one request's model calls at a time (it does share the CPU). Any error is
  logged and counted; a challenger that cannot be loaded (its artifact or probe fails) is given up until the
  service restarts, one not registered (yet) is looked for again after `model_poll_interval_s`.
- Rows: one `shadow_predictions` row per turn, handed to the prediction logger after the live rows they point at
  (so they are written behind them, through a database outage too). They are not served traffic for the monitor
  and not offered for audit or feedback; the gate pairs them with the live predictions (retraining/shadow.py).
- Metrics: turns by outcome (`equipoise_shadow_predictions_total`) and the share of the challenger's last
  `AGREEMENT_WINDOW` turns whose emotion is the champion's answer (`equipoise_shadow_agreement_ratio`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from api.metrics import Metrics
from api.prediction_log import PredictionLogger
from api.schemas import UtterancePrediction
from api.versions import VersionPool, VersionUnavailable
from core.audit import selected_for_shadow
from core.db.crud import ShadowRecord
from core.db.models import ModelStatus
from core.settings import Settings
from model.registry import ModelRegistry, UnknownVersion
from model.runtime import TurnPrediction, UtteranceInput

log = logging.getLogger(__name__)
AGREEMENT_WINDOW = 1_000  # turns behind the agreement ratio: recent enough to follow a change of traffic


@dataclass(frozen=True)
class _Request:
    dialogues: list[list[UtteranceInput]]
    live: list[UtterancePrediction]
    causal: bool


class ShadowScorer:
    def __init__(
        self, pool: VersionPool, registry: ModelRegistry, logger: PredictionLogger, metrics: Metrics, settings: Settings
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._logger = logger
        self._metrics = metrics
        self._share = settings.shadow_share
        self._named = settings.shadow_challenger
        self._lookup_s = settings.model_poll_interval_s
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=settings.shadow_queue_limit)
        self._task: asyncio.Task[None] | None = None
        self._challenger: str | None = None
        self._looked_up = -math.inf
        self._retry_at: dict[str, float] = {}  # a challenger that could not be served: when to try it again
        self._agreement: dict[str, deque[bool]] = {}

    def offer(self, dialogues: list[list[UtteranceInput]], live: list[UtterancePrediction], causal: bool) -> None:
        """A request the champion answered (api/predictor.py `ShadowOffer`): queued when selected, dropped when the
        queue is full. Never blocks and never raises."""
        if not live or not selected_for_shadow(live[0].prediction_id, self._share):
            return
        try:
            self._queue.put_nowait(_Request(dialogues, live, causal))
        except asyncio.QueueFull:
            self._count("dropped", live)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="equipoise-shadow")

    async def stop(self) -> None:
        """Stop scoring; requests still waiting are dropped (and counted)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            self._count("dropped", self._queue.get_nowait().live)

    async def _run(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                await self._shadow(request)
            except Exception:  # shadow scoring must outlive any single failure
                log.exception("shadow scoring: unexpected error")
                self._count("failed", request.live)

    async def _shadow(self, request: _Request) -> None:
        version = await self._current_challenger()
        if version is None or version == request.live[0].model_version:
            self._count("skipped", request.live)
            return
        started = time.perf_counter()
        turns = await self._score(version, request) if time.monotonic() >= self._retry_at.get(version, 0) else None
        if turns is None:
            self._count("failed", request.live)
            return
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        created_at = datetime.now(UTC)
        pairs = list(zip(request.live, turns, strict=True))
        self._logger.submit([_record(live, turn, version, latency_ms, created_at) for live, turn in pairs])
        self._count("scored", request.live)
        self._agree(version, [live.emotion == turn.emotion for live, turn in pairs])

    async def _score(self, version: str, request: _Request) -> list[TurnPrediction] | None:
        """The challenger's predictions of the request's turns; None (logged) when it cannot give them."""
        try:
            async with self._pool.batcher(version) as batcher:
                scored = await asyncio.gather(*(batcher.score(turns, request.causal) for turns in request.dialogues))
        except UnknownVersion as error:  # perhaps named before it is registered: looked for again later
            self._retry_at[version] = time.monotonic() + self._lookup_s
            log.warning("shadow scoring: %s", error)
            return None
        except VersionUnavailable as error:  # its artifact or probe fails, and a version's artifact never changes
            self._retry_at[version] = math.inf
            log.error("shadow scoring: challenger %s is given up until the service restarts: %s", version, error)
            return None
        except Exception as error:
            log.warning("shadow scoring: challenger %s failed on %d turns: %r", version, len(request.live), error)
            return None
        return [turn for result in scored for turn in result.turns]

    async def _current_challenger(self) -> str | None:
        if time.monotonic() - self._looked_up >= self._lookup_s:
            self._looked_up = time.monotonic()
            found = self._named or await asyncio.to_thread(self._newest_candidate)
            if found != self._challenger:
                log.info("shadow scoring: the challenger is %s", found or "none (no candidate is registered)")
            self._challenger = found
        return self._challenger

    def _newest_candidate(self) -> str | None:
        return next((row.version for row in self._registry.list() if row.status == ModelStatus.CANDIDATE), None)

    def _count(self, outcome: str, live: list[UtterancePrediction]) -> None:
        self._metrics.shadow.labels(outcome).inc(len(live))

    def _agree(self, version: str, agreed: list[bool]) -> None:
        window = self._agreement.setdefault(version, deque(maxlen=AGREEMENT_WINDOW))
        window.extend(agreed)
        self._metrics.shadow_agreement.labels(version).set(sum(window) / len(window))


def _record(
    live: UtterancePrediction, turn: TurnPrediction, version: str, latency_ms: float, created_at: datetime
) -> ShadowRecord:
    return ShadowRecord(
        id=uuid.uuid4(),
        created_at=created_at,
        live_prediction_id=live.prediction_id,
        model_version=version,
        latency_ms=latency_ms,
        **turn.logged_fields(),
    )
