"""The single-machine engine: chunks scored one after another in this process."""

from __future__ import annotations

from collections.abc import Iterator

from scoring.conversations import SourcePlan, iter_chunks
from scoring.engine import ModelInfo, Runtime, RuntimeSpec, ScoredItem, ScoringOptions, score_chunk


class LocalEngine:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.model = ModelInfo.of(runtime)

    @classmethod
    def load(cls, spec: RuntimeSpec) -> LocalEngine:
        return cls(spec.load())

    def score(self, plan: SourcePlan, options: ScoringOptions) -> Iterator[list[ScoredItem]]:
        for chunk in iter_chunks(plan):
            yield score_chunk(self.runtime, chunk, options)
