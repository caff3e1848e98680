"""The Ray engine: Ray Data streams chunks of conversations through an actor pool, each actor holding its own
InferenceRuntime, and hands the scored chunks back in order.

The chunks come from one read task that runs `iter_chunks` (the local engine's reader and grouper) on the
driver's node, so the input, the spill directory and the audio root must be readable there; the actors must be
able to read the audio root too (a shared file system on a multi-node cluster). Ray Data's backpressure keeps the
number of chunks in flight bounded. Chunks travel pickled in a binary column, one chunk per row.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from scoring.conversations import SourcePlan, iter_chunks
from scoring.engine import ModelInfo, Runtime, RuntimeSpec, ScoredItem, ScoringOptions, score_chunk

RuntimeFactory = Callable[[], Runtime]


def _chunk_source(plan: SourcePlan) -> Any:
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ChunkSource(Datasource):
        @property
        def supports_distributed_reads(self) -> bool:
            return False  # read on the driver's node, where the input is

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: Any) -> list[ReadTask]:
            def read() -> Iterator[pa.Table]:
                for chunk in iter_chunks(plan):
                    yield pa.table({"chunk": pa.array([pickle.dumps(chunk)], pa.binary())})

            metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(read, metadata, per_task_row_limit=per_task_row_limit)]

    return ChunkSource()


class ChunkScorer:
    """One actor of the pool: scores one chunk per call."""

    def __init__(self, load: RuntimeFactory, options: ScoringOptions) -> None:
        self._runtime = load()
        self._options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scored = [score_chunk(self._runtime, pickle.loads(chunk), self._options) for chunk in batch["chunk"]]
        return {"scored": np.array([pickle.dumps(chunk) for chunk in scored], dtype=object)}


class RayEngine:
    def __init__(self, load: RuntimeFactory, model: ModelInfo, *, actors: int = 2, cpus_per_actor: float = 1.0) -> None:
        if actors < 1:
            raise ValueError(f"actors must be at least 1, not {actors}")
        self._load = load
        self.model = model
        self._actors = actors
        self._cpus = cpus_per_actor

    @classmethod
    def from_spec(cls, spec: RuntimeSpec, *, actors: int = 2, cpus_per_actor: float = 1.0) -> RayEngine:
        return cls(spec.load, spec.info(), actors=actors, cpus_per_actor=cpus_per_actor)

    def score(self, plan: SourcePlan, options: ScoringOptions) -> Iterator[list[ScoredItem]]:
        import ray.data

        context = ray.data.DataContext.get_current()
        saved = context.execution_options.preserve_order, context.enable_progress_bars
        context.execution_options.preserve_order = True  # outputs and manifest follow the input's order
        context.enable_progress_bars = False  # the driver's tqdm bar reports progress
        try:
            # num_cpus=0: the one read task must never wait for a CPU that the actor pool holds.
            dataset = ray.data.read_datasource(_chunk_source(plan), num_cpus=0).map_batches(
                ChunkScorer,
                fn_constructor_args=(self._load, options),
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self._actors),
                num_cpus=self._cpus,
            )
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for payload in batch["scored"]:
                    yield pickle.loads(payload)
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved
