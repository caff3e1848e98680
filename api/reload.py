"""The model being served, and its hot reload from the registry's champion.

`ModelHolder.current` is the one reference to the serving model; the batcher reads it once per batch, so a
swap is a single attribute assignment and a batch that already started finishes on the model it took.
A new champion is loaded in a worker thread, its hashes checked and a fixed probe scored; only a model whose
probe gives finite probabilities summing to one replaces the old one. A refused version is remembered (with
its sha256) so the poll does not reload it again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from api.metrics import Metrics
from core.db.models import ModelVersion
from core.heap import REFREEZE_DELAY_S, thaw_then_refreeze
from core.settings import Settings
from model.artifact import load_artifact
from model.labels import LabelSet
from model.registry import ModelRegistry
from model.runtime import EmbeddedDialogue, InferenceRuntime, TurnPrediction, UtteranceInput

log = logging.getLogger(__name__)
PROBE_TOLERANCE = 1e-3


class Runtime(Protocol):
    """What the service needs of model.runtime.InferenceRuntime (tests substitute fakes)."""

    version: str
    emotions: LabelSet
    sentiments: LabelSet
    providers: Sequence[str]
    precision: str  # "fp32" or "int8"
    rescore_margin: float  # int8 near ties re-scored in fp32 below this top-two gap; 0 when off
    hears_audio: bool  # False for a model trained on text alone: a turn with audio alone is refused

    def classify(
        self,
        dialogues: list[list[UtteranceInput]],
        causal: bool,
        history: Sequence[EmbeddedDialogue | None] | None = None,
    ) -> list[list[TurnPrediction]]: ...

    def classify_in_waves(
        self,
        dialogues: list[list[UtteranceInput]],
        causal: bool,
        history: Sequence[EmbeddedDialogue | None] | None = None,
    ) -> Iterator[tuple[list[int], list[list[TurnPrediction]]]]: ...


ModelLoader = Callable[[ModelVersion], Runtime]


class ModelRefused(RuntimeError):
    """The artifact does not match its registered hash, or the model fails the probe."""


@dataclass(frozen=True)
class LoadedModel:
    runtime: Runtime
    version: str
    sha256: str


class ModelHolder:
    def __init__(self) -> None:
        self.current: LoadedModel | None = None
        self.last_error: str | None = None


def runtime_loader(settings: Settings) -> ModelLoader:
    """The production loader: verify every file against the registered hash, then open ONNX Runtime."""

    def load(row: ModelVersion) -> Runtime:
        artifact = load_artifact(row.artifact_path)
        if artifact.sha256 != row.artifact_sha256:
            raise ModelRefused(f"{row.version}: artifact sha256 {artifact.sha256} is not the registered one")
        return InferenceRuntime.load(
            artifact,
            device=settings.device,
            intra_op_threads=settings.intra_op_threads,
            audio_intra_op_threads=settings.audio_intra_op_threads,
            precision=settings.precision,
            max_batch_size=settings.batch_bucket_size,
            rescore_margin=settings.int8_rescore_margin,
            packed_text_path=settings.packed_text_path,
        )

    return load


def log_load(version: str, runtime: Runtime, role: str) -> None:
    """The one start-up line of each model load."""
    providers = ", ".join(runtime.providers)
    log.info("loaded model %s (%s): provider %s, precision %s", version, role, providers, runtime.precision)


def probe_dialogue(hears_audio: bool = True) -> list[UtteranceInput]:
    """Text only, audio only and both: every path through the encoder (a model trained on text alone is not
    asked to score audio alone, which it refuses)."""
    tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000)).astype(np.float32)
    audio_only = [UtteranceInput(text=None, audio=tone, speaker="agent")] if hears_audio else []
    return [
        UtteranceInput(text="Hello, I am calling about my bill.", audio=None, speaker="customer"),
        *audio_only,
        UtteranceInput(text="Thank you, that is great.", audio=tone, speaker="customer"),
    ]


def probe(runtime: Runtime) -> None:
    dialogue = probe_dialogue(runtime.hears_audio)
    for causal in (False, True):
        (turns,) = runtime.classify([dialogue], causal)
        if len(turns) != len(dialogue):
            raise ModelRefused(f"probe: {len(turns)} predictions for {len(dialogue)} turns")
        for turn in turns:
            _check_distribution("emotion", turn.emotion_probs, runtime.emotions)
            _check_distribution("sentiment", turn.sentiment_probs, runtime.sentiments)


def _check_distribution(head: str, probabilities: np.ndarray, labels: LabelSet) -> None:
    values = np.asarray(probabilities, dtype=np.float64)
    if values.shape != (len(labels),):
        raise ModelRefused(f"probe: {head} probabilities have shape {values.shape}, expected ({len(labels)},)")
    if not np.isfinite(values).all():
        raise ModelRefused(f"probe: {head} probabilities are not finite")
    total = float(values.sum())
    if not math.isclose(total, 1.0, abs_tol=PROBE_TOLERANCE) or (values < 0).any():
        raise ModelRefused(f"probe: {head} probabilities sum to {total:.6f}, not 1")


class ModelReloader:
    """Polls the registry's champion and swaps the served model when it changes."""

    def __init__(
        self,
        registry: ModelRegistry,
        holder: ModelHolder,
        loader: ModelLoader,
        metrics: Metrics,
        interval_s: float,
        refreeze_delay_s: float = REFREEZE_DELAY_S,
    ) -> None:
        self._registry = registry
        self._holder = holder
        self._loader = loader
        self._metrics = metrics
        self._interval_s = interval_s
        self._refreeze_delay_s = refreeze_delay_s
        self._refused: set[tuple[str, str]] = set()
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._poll(), name="equipoise-model-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def poke(self) -> None:
        """Check now rather than at the next poll (after a promotion through the API)."""
        self._poked.set()

    async def check(self) -> None:
        try:
            champion = await asyncio.to_thread(self._registry.champion)
        except Exception as error:  # the database may be down; keep serving what we have
            log.warning("cannot read the champion from the registry: %s", error)
            return
        if champion is None:
            if self._holder.current is None:
                self._holder.last_error = "no champion model is registered"
            return
        current = self._holder.current
        key = (champion.version, champion.artifact_sha256)
        if (current is not None and current.version == champion.version) or key in self._refused:
            return
        await self._swap_to(champion)

    async def _swap_to(self, champion: ModelVersion) -> None:
        try:
            runtime = await asyncio.to_thread(self._load_and_probe, champion)
        except Exception as error:
            self._refused.add((champion.version, champion.artifact_sha256))
            self._holder.last_error = f"model {champion.version} refused: {error}"
            self._metrics.reloads.labels("refused").inc()
            log.error("refusing model %s, keeping %s: %s", champion.version, self._serving(), error)
            return
        replacing = self._holder.current is not None
        self._holder.current = LoadedModel(runtime, champion.version, champion.artifact_sha256)
        self._holder.last_error = None
        if replacing:  # the model replaced was frozen with start-up's objects (core/heap.py)
            thaw_then_refreeze(self._refreeze_delay_s)
        self._metrics.reloads.labels("loaded").inc()
        self._metrics.model_loaded.set(1)
        self._metrics.model_info.info(
            {
                "version": champion.version,
                "sha256": champion.artifact_sha256,
                "providers": ",".join(runtime.providers),
                "precision": runtime.precision,
                "int8_rescore_margin": str(runtime.rescore_margin),
            }
        )
        self._metrics.rescored.labels(champion.version)  # the series exists, at 0, from the first load
        log_load(champion.version, runtime, "champion")

    def _load_and_probe(self, champion: ModelVersion) -> Runtime:
        runtime = self._loader(champion)
        probe(runtime)
        return runtime

    def _serving(self) -> str:
        return self._holder.current.version if self._holder.current else "no model"

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._interval_s)
            self._poked.clear()
            await self.check()
