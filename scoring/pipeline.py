"""The scoring driver: scan the input, resume from the manifest, stream chunks through an engine, write the rows
and commit them (outputs fsync'd first, then a manifest line), and report."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from core.settings import Settings
from scoring.conversations import DEFAULT_RUN_ROWS, InputScan, SourcePlan, scan_input
from scoring.engine import Engine, LoggedTurn, ModelInfo, ScoredItem, ScoringOptions
from scoring.inputs import InputOptions
from scoring.manifest import Commit, Manifest, Progress, manifest_path
from scoring.output import (
    OUTPUT,
    SUMMARY,
    Sink,
    cleanup_parts,
    complete_run,
    open_sinks,
    output_format,
    prediction_schema,
)
from scoring.summary import SUMMARY_SCHEMA, SummaryOptions, summarize

if TYPE_CHECKING:
    from scoring.database import PredictionLog


@dataclass(frozen=True)
class ScoreConfig:
    input: Path
    output: Path
    summary: Path | None = None
    audio_root: Path | None = None  # default: the input's directory
    causal: bool = False
    batch_turns: int = 256  # turns per classify call (whole conversations, so a chunk may hold more)
    commit_rows: int = 5_000  # commit at least every this many output rows...
    commit_seconds: float = 30.0  # ...or this often, whichever comes first
    run_rows: int = DEFAULT_RUN_ROWS  # turns per sorted run when the input must be sorted first
    max_turns: int = 2_000
    # The service's limits (settings), so that a turn the API would refuse is an error row here too.
    max_text_chars: int = Settings.model_fields["max_text_chars"].default
    max_audio_bytes: int = Settings.model_fields["max_audio_bytes"].default
    max_audio_seconds: float = Settings.model_fields["max_audio_seconds"].default
    max_audio_channels: int = Settings.model_fields["max_audio_channels"].default
    channel_silence_dbfs: float = Settings.model_fields["channel_silence_dbfs"].default
    channel_names: tuple[str, ...] | None = None  # speakers of the channels of multi-channel audio (--channels)
    summary_options: SummaryOptions = field(default_factory=SummaryOptions)
    restart: bool = False
    progress: bool | None = None  # None: shown when stderr is a terminal

    @property
    def audio_dir(self) -> Path:
        return (self.audio_root or self.input.parent).resolve()


@dataclass
class RunReport:
    rows: int  # output rows, this run and earlier ones
    conversations: int
    errors: Counter[str]
    resumed_rows: int  # rows committed by earlier runs
    seconds: float  # this run
    outputs: list[Path]
    logged: int = 0

    @property
    def scored_rows(self) -> int:
        return self.rows - self.resumed_rows

    @property
    def throughput(self) -> float:
        return self.scored_rows / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        errors = sum(self.errors.values())
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(self.errors.items()))
        lines = [
            f"turns: {self.rows:,} in {self.conversations:,} conversations "
            f"({self.scored_rows:,} scored in this run, {self.resumed_rows:,} resumed from earlier runs)",
            f"errors: {errors:,}" + (f" ({kinds})" if kinds else ""),
            f"throughput: {self.throughput:,.1f} turns/s ({self.seconds:,.1f} s)",
            "written: " + ", ".join(str(path) for path in self.outputs),
        ]
        if self.logged:
            lines.append(f"logged to the database: {self.logged:,} predictions")
        return "\n".join(lines)


def run_scoring(config: ScoreConfig, engine: Engine, *, log: PredictionLog | None = None) -> RunReport:
    start = time.perf_counter()
    check_paths(config)
    scan = scan_input(config.input)
    header = run_header(config, engine.model)
    manifest, progress = Manifest.open(manifest_path(config.output), header, restart=config.restart)
    resumed = progress.rows
    try:
        if progress.complete:
            for path in _outputs(config):
                cleanup_parts(path)
        else:
            _score(config, engine, scan, manifest, progress, log)
    finally:
        manifest.close()
    return RunReport(
        progress.rows,
        progress.conversations,
        progress.errors,
        resumed,
        time.perf_counter() - start,
        _outputs(config),
        log.written if log is not None else 0,
    )


def check_paths(config: ScoreConfig) -> None:
    if not config.input.is_file():
        raise ValueError(f"input {config.input} not found")
    outputs = _outputs(config)
    for path in outputs:
        output_format(path)
        if path.resolve() == config.input.resolve():
            raise ValueError(f"{path} is the input; choose another output")
    if len({path.resolve() for path in outputs}) != len(outputs):
        raise ValueError("--out and --summary must be different files")
    if not config.audio_dir.is_dir():
        raise ValueError(f"audio root {config.audio_dir} is not a directory")


def run_header(config: ScoreConfig, model: ModelInfo) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    stat = config.input.stat()
    return {
        "input": str(config.input.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "model_version": model.version,
        "model_sha256": model.sha256,
        "precision": model.precision,
        "context": "causal" if config.causal else "bidirectional",
        "audio_root": str(config.audio_dir),
        "max_turns": config.max_turns,
        "max_text_chars": config.max_text_chars,
        "max_audio_bytes": config.max_audio_bytes,
        "max_audio_seconds": config.max_audio_seconds,
        "max_audio_channels": config.max_audio_channels,
        "channel_silence_dbfs": config.channel_silence_dbfs,
        "channel_names": list(config.channel_names) if config.channel_names is not None else None,
        "output": str(config.output.resolve()),
        "summary": str(config.summary.resolve()) if config.summary else None,
        "summary_options": asdict(config.summary_options),
    }


def run_key(header: dict[str, Any]) -> str:
    """Identifies the predictions of a run whatever its outputs: the input, the model and the context."""
    keys = (
        "input",
        "input_size",
        "input_mtime_ns",
        "model_version",
        "model_sha256",
        "precision",
        "context",
        "audio_root",
    )
    return hashlib.sha256(json.dumps([header[key] for key in keys]).encode()).hexdigest()


def _outputs(config: ScoreConfig) -> list[Path]:
    return [config.output] + ([config.summary] if config.summary else [])


def _score(
    config: ScoreConfig,
    engine: Engine,
    scan: InputScan,
    manifest: Manifest,
    progress: Progress,
    log: PredictionLog | None,
) -> None:
    schemas = (prediction_schema(engine.model.emotions), SUMMARY_SCHEMA)
    with open_sinks(_outputs(config), schemas, progress.positions) as sinks:
        committer = _Committer(config, engine.model, sinks, manifest, progress, log)
        with tqdm(
            total=scan.records,
            initial=progress.input_records,
            unit=" turns",
            desc="scoring",
            disable=_hidden(config),
            dynamic_ncols=True,
            smoothing=0.05,
        ) as bar:
            for chunk in engine.score(_plan(config, scan, progress), _options(config, log, engine.model)):
                for item in chunk:
                    committer.add(item)
                    bar.update(item.input_records)
                committer.commit_if_due()
        committer.commit()
        complete_run(sinks, manifest)


def _hidden(config: ScoreConfig) -> bool | None:
    return None if config.progress is None else not config.progress


def _plan(config: ScoreConfig, scan: InputScan, progress: Progress) -> SourcePlan:
    return SourcePlan(
        path=config.input,
        grouped=scan.grouped,
        spill_dir=config.output.resolve().parent,
        batch_turns=config.batch_turns,
        run_rows=config.run_rows,
        done_conversations=frozenset(progress.done_conversations),
        done_records=frozenset(progress.done_records),
    )


def _options(config: ScoreConfig, log: PredictionLog | None, model: ModelInfo) -> ScoringOptions:
    inputs = InputOptions(
        config.audio_dir,
        config.max_text_chars,
        config.max_audio_bytes,
        config.max_audio_seconds,
        config.max_turns,
        config.max_audio_channels,
        config.channel_silence_dbfs,
        config.channel_names,
        model.hears_audio,
    )
    return ScoringOptions(causal=config.causal, inputs=inputs, keep_logged=log is not None)


class _Committer:
    """Collects the rows written since the last commit and commits them: database, outputs, then the manifest."""

    def __init__(
        self,
        config: ScoreConfig,
        model: ModelInfo,
        sinks: dict[str, Sink],
        manifest: Manifest,
        progress: Progress,
        log: PredictionLog | None,
    ) -> None:
        self._config, self._model, self._sinks = config, model, sinks
        self._manifest, self._progress, self._log = manifest, progress, log
        self._reset()

    def _reset(self) -> None:
        self._conversations: list[tuple[str, int]] = []
        self._records: list[int] = []
        self._errors: Counter[str] = Counter()
        self._logged: list[LoggedTurn] = []
        self._rows = self._input_records = 0
        self._since = time.monotonic()

    def add(self, item: ScoredItem) -> None:
        self._sinks[OUTPUT].append(item.rows)
        if item.record is not None:
            self._records.append(item.record)
        elif item.conversation_id is not None:
            self._conversations.append((item.conversation_id, len(item.rows)))
            if SUMMARY in self._sinks:
                options = self._config.summary_options
                summary = summarize(item.conversation_id, item.rows, self._model.version, options)
                self._sinks[SUMMARY].append([summary])
        self._errors.update(item.error_kinds)
        self._logged.extend(item.logged)
        self._rows += len(item.rows)
        self._input_records += item.input_records

    def commit_if_due(self) -> None:
        if self._rows >= self._config.commit_rows or time.monotonic() - self._since >= self._config.commit_seconds:
            self.commit()

    def commit(self) -> None:
        if not self._rows:
            return
        if self._log is not None:
            self._log.write(self._logged)
        positions = {name: sink.commit() for name, sink in self._sinks.items()}
        commit = Commit(positions, self._conversations, self._records, dict(self._errors), self._input_records)
        self._manifest.commit(commit)
        self._progress.add(commit)
        self._reset()
