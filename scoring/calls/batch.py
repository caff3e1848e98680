"""`equipoise score --calls`: score whole recordings, resumably, as `scoring.pipeline` scores turn tables.

The resume manifest and the sinks are scoring.pipeline's: a commit follows every call, after its turns and its
summary row are durable, and lists the call as a conversation; resuming cuts the outputs back to the last commit
and skips the calls it lists. So a kill between or inside calls leaves one row per turn once the run is resumed.
A timeline PNG (`--timelines DIR`) is written before its call is committed; a call scored again rewrites it.
With `--log-to-db` a call's turns are inserted before it is committed too, under prediction ids derived from the run
and the turn (scoring.database), so a call scored again after a kill is not logged twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from core.files import fsync_dir
from scoring.calls.engines import CallEngine
from scoring.calls.scorer import CALL_SUMMARY_SCHEMA, CallSpec, ScoredCall, turn_schema
from scoring.calls.sources import CallJob, fingerprint, list_calls
from scoring.manifest import Commit, Manifest, Progress, manifest_path
from scoring.output import OUTPUT, SUMMARY, Sink, cleanup_parts, complete_run, open_sinks, output_format

if TYPE_CHECKING:
    from scoring.database import PredictionLog


@dataclass(frozen=True)
class CallRunConfig:
    input: Path  # a directory of recordings, or a CSV/JSONL list of them
    output: Path
    spec: CallSpec
    summary: Path | None = None
    audio_root: Path | None = None  # a list's paths are relative to it (default: the list's directory)
    roles: tuple[str, ...] | None = None  # channel names of the calls whose list row gives none
    timelines: Path | None = None
    restart: bool = False
    progress: bool | None = None  # None: shown when stderr is a terminal

    @property
    def outputs(self) -> list[Path]:
        return [self.output] + ([self.summary] if self.summary else [])


@dataclass
class CallRunReport:
    calls: int  # committed, this run and earlier ones
    turns: int  # output rows
    errors: Counter[str]
    resumed_calls: int
    seconds: float  # this run
    audio_s: float  # audio scored in this run
    outputs: list[Path]
    logged: int = 0  # predictions new to the database (`--log-to-db`)

    def text(self) -> str:
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(self.errors.items()))
        rate = self.audio_s / self.seconds if self.seconds > 0 else 0.0
        logged = [f"logged to the database: {self.logged:,} predictions"] if self.logged else []
        return "\n".join(
            [
                f"calls: {self.calls:,} ({self.calls - self.resumed_calls:,} scored in this run, "
                f"{self.resumed_calls:,} resumed from earlier runs); turns: {self.turns:,}",
                f"errors: {sum(self.errors.values()):,}" + (f" ({kinds})" if kinds else ""),
                f"audio: {self.audio_s / 60:,.1f} min in {self.seconds:,.1f} s ({rate:,.1f} audio min per min)",
                "written: " + ", ".join(str(path) for path in self.outputs),
                *logged,
            ]
        )


def run_calls(config: CallRunConfig, engine: CallEngine, log: PredictionLog | None = None) -> CallRunReport:
    start = time.perf_counter()
    jobs = list_calls(config.input, config.audio_root, config.roles)
    _check_outputs(config)
    header = call_run_header(config, engine, jobs)
    manifest, progress = Manifest.open(manifest_path(config.output), header, restart=config.restart)
    resumed, audio_s = progress.conversations, 0.0
    try:
        if progress.complete:
            for path in config.outputs:
                cleanup_parts(path)
        else:
            audio_s = _score(config, engine, jobs, manifest, progress, log)
    finally:
        manifest.close()
    seconds = time.perf_counter() - start
    done = progress.conversations
    logged = log.written if log is not None else 0
    return CallRunReport(done, progress.rows, progress.errors, resumed, seconds, audio_s, config.outputs, logged)


def call_run_header(config: CallRunConfig, engine: CallEngine, jobs: list[CallJob]) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return {
        **_identity(config, engine),
        "calls": fingerprint(jobs),
        "output": str(config.output.resolve()),
        "summary": str(config.summary.resolve()) if config.summary else None,
        "timelines": str(config.timelines.resolve()) if config.timelines else None,
    }


def call_run_key(config: CallRunConfig, engine: CallEngine) -> str:
    """Identifies the logged predictions of a run whatever its outputs: the input, the model and how it scores."""
    return hashlib.sha256(json.dumps(_identity(config, engine), sort_keys=True).encode()).hexdigest()


def _identity(config: CallRunConfig, engine: CallEngine) -> dict[str, Any]:
    model = engine.model
    return {
        "kind": "calls",
        "input": str(config.input.resolve()),
        "model_version": model.version,
        "model_sha256": model.sha256,
        "precision": model.precision,
        "context": "causal" if config.spec.causal else "bidirectional",
        "call_options": asdict(config.spec.options),
    }


def _check_outputs(config: CallRunConfig) -> None:
    for path in config.outputs:
        output_format(path)
        if path.resolve() == config.input.resolve():
            raise ValueError(f"{path} is the input; choose another output")
    if len({path.resolve() for path in config.outputs}) != len(config.outputs):
        raise ValueError("--out and --summary must be different files")
    if config.timelines is not None:
        config.timelines.mkdir(parents=True, exist_ok=True)


def _score(
    config: CallRunConfig,
    engine: CallEngine,
    jobs: list[CallJob],
    manifest: Manifest,
    progress: Progress,
    log: PredictionLog | None,
) -> float:
    """Scores the calls not committed yet; returns the seconds of audio scored."""
    schemas = (turn_schema(engine.model.emotions), CALL_SUMMARY_SCHEMA)
    todo = [job for job in jobs if job.call_id not in progress.done_conversations]
    with open_sinks(config.outputs, schemas, progress.positions) as sinks:
        with tqdm(
            total=len(jobs),
            initial=len(jobs) - len(todo),
            unit=" calls",
            desc="scoring calls",
            disable=None if config.progress is None else not config.progress,
            dynamic_ncols=True,
        ) as bar:
            audio_s = _score_calls(config, engine, todo, sinks, manifest, progress, bar, log)
        complete_run(sinks, manifest)
    return audio_s


def _score_calls(
    config: CallRunConfig,
    engine: CallEngine,
    todo: list[CallJob],
    sinks: dict[str, Sink],
    manifest: Manifest,
    progress: Progress,
    bar: tqdm[Any],
    log: PredictionLog | None,
) -> float:
    audio_s, start = 0.0, time.perf_counter()
    for call in engine.score(todo):
        if log is not None:
            log.write(call.logged)
        _commit(config, call, sinks, manifest, progress)
        audio_s += call.audio_s
        bar.update(1)
        minutes = (time.perf_counter() - start) / 60
        bar.set_postfix_str(f"{audio_s / minutes / 60:.1f} audio min/min", refresh=False)
    return audio_s


def _commit(
    config: CallRunConfig, call: ScoredCall, sinks: dict[str, Sink], manifest: Manifest, progress: Progress
) -> None:
    """The call's timeline, then its rows, then the manifest line that makes them count."""
    if config.timelines is not None and call.png is not None:
        _write_png(config.timelines / timeline_name(call.call_id), call.png)
    sinks[OUTPUT].append(call.rows)
    if SUMMARY in sinks:
        sinks[SUMMARY].append([call.summary])
    positions = {name: sink.commit() for name, sink in sinks.items()}
    commit = Commit(positions, [(call.call_id, len(call.rows))], [], dict(Counter(call.error_kinds)), 1)
    manifest.commit(commit)
    progress.add(commit)


def timeline_name(call_id: str) -> str:
    """The file name of a call's timeline: its id with path separators as `__`."""
    return call_id.replace("/", "__").replace("\\", "__") + ".png"


def _write_png(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)
    fsync_dir(path.parent)
