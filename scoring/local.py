"""The single-machine engine: chunks read in this thread and scored by `workers` threads sharing one runtime.

ONNX Runtime releases the GIL while it runs and one session may run several calls at once, so on a CPU host
`workers` threads with one intra-op thread each keep every core busy, where one call with an intra-op pool
leaves cores idle between its operators. Chunks come back in input order; at most `workers + 1` are in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from scoring.conversations import SourcePlan, iter_chunks
from scoring.engine import ModelInfo, Runtime, RuntimeSpec, ScoredItem, ScoringOptions, score_chunk


class LocalEngine:
    def __init__(self, runtime: Runtime, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.runtime = runtime
        self.model = ModelInfo.of(runtime)
        self.workers = workers

    @classmethod
    def load(cls, spec: RuntimeSpec, workers: int = 1) -> LocalEngine:
        return cls(spec.load(), workers)

    def score(self, plan: SourcePlan, options: ScoringOptions) -> Iterator[list[ScoredItem]]:
        if self.workers == 1:
            for chunk in iter_chunks(plan):
                yield score_chunk(self.runtime, chunk, options)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="scoring")
        pending: deque[Future[list[ScoredItem]]] = deque()
        try:
            for chunk in iter_chunks(plan):
                pending.append(pool.submit(score_chunk, self.runtime, chunk, options))
                if len(pending) > self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
