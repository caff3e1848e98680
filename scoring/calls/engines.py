"""Engines of `equipoise score --calls`: a call is the unit of work, and each worker loads the pipeline's models once.

Locally one CallScorer scores the calls in turn (Whisper and ONNX Runtime use the cores themselves). On Ray a pool
of CallScorer actors scores them, at most two calls per actor in flight, and the results come back in input order
so that the driver commits calls in order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from scoring.calls.scorer import CallScorer, CallSpec, ScoredCall
from scoring.calls.sources import CallJob
from scoring.engine import ModelInfo

IN_FLIGHT_PER_ACTOR = 2


class CallEngine(Protocol):
    model: ModelInfo

    def score(self, jobs: Iterable[CallJob]) -> Iterator[ScoredCall]:
        """Scored calls in the order of `jobs`."""
        ...


class LocalCallEngine:
    def __init__(self, scorer: CallScorer) -> None:
        self.scorer = scorer
        self.model = scorer.model

    @classmethod
    def load(cls, spec: CallSpec) -> LocalCallEngine:
        return cls(CallScorer(spec))

    def score(self, jobs: Iterable[CallJob]) -> Iterator[ScoredCall]:
        for job in jobs:
            yield self.scorer(job)


class RayCallEngine:
    def __init__(self, spec: CallSpec, *, actors: int = 2, cpus_per_actor: float = 1.0) -> None:
        if actors < 1:
            raise ValueError(f"actors must be at least 1, not {actors}")
        self.spec = spec
        self.model = spec.runtime.info()
        self._actors = actors
        self._cpus = cpus_per_actor

    def score(self, jobs: Iterable[CallJob]) -> Iterator[ScoredCall]:
        import ray
        from ray.util import ActorPool

        actor = ray.remote(num_cpus=self._cpus)(CallScorer)
        pool = ActorPool([actor.remote(self.spec) for _ in range(self._actors)])
        in_flight = 0
        for job in jobs:
            pool.submit(_score, job)
            in_flight += 1
            if in_flight >= IN_FLIGHT_PER_ACTOR * self._actors:
                yield pool.get_next()
                in_flight -= 1
        while pool.has_next():
            yield pool.get_next()


def _score(actor: Any, job: CallJob) -> Any:
    return actor.score.remote(job)
