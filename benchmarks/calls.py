"""Whole calls end to end: a stereo 8 kHz call of the held-out RAVDESS actors' clips, tiled to 5 minutes, through
scoring.calls.process_call with the served model's emotions, then logged as the service logs it, with the time of
each stage and the real-time factor.

    python -m benchmarks.calls --data-dir ../shared/data --seconds 300 --json /tmp/calls.json

The call alternates the channels with 0.5-2 s gaps (benchmarks/call_builder.py builds it), then repeats until it
lasts `--seconds`; it is sent as the bytes of a 16-bit WAV file at `--rate`. Model loading is timed apart and a
short call warms the models up first. Stages: decode, VAD (voice activity and turns), ASR (Whisper tiny.en per
turn, with redaction), emotion (the model over the call as one dialogue: scoring.calls.CallEmotions), analytics,
logging (the turns' prediction rows and the result written to a fresh SQLite database in one transaction, as the
service's call runner does). Real-time factor: processing seconds / call seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from benchmarks.call_builder import AssembledCall, assemble, ravdess_utterances, tile
from core.db import migrate
from core.db.calls import claim_call, finish_call, queue_call
from core.db.crud import prediction_row
from core.db.models import ContextMode, ModelStatus, ModelVersion
from core.db.session import make_engine
from core.redaction import Redaction
from core.settings import available_cores, data_dir_or_exit
from model.default_model import shipped_artifact
from model.runtime import InferenceRuntime
from model.speech_to_text import SpeechToText
from scoring.calls import CallEmotions, CallResult, process_call
from scoring.calls.pipeline import STAGES
from scoring.calls.records import call_document, call_records

UTTERANCES = 40  # about 2.5 minutes before tiling


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the call (default 300)")
    parser.add_argument("--rate", type=int, default=8_000, help="sample rate of the recording (default 8000)")
    parser.add_argument("--threads", type=int, default=0, help="CTranslate2 threads (default: every core)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="model artifact (default: the shipped default)")
    parser.add_argument("--assembly-dir", type=Path, default=Path("/tmp/equipoise-call-emotions"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = data_dir_or_exit(args.data_dir)
    call = assemble(ravdess_utterances(data_dir, UTTERANCES, seed=args.seed), seed=args.seed)
    recording = AssembledCall(tile(call, args.seconds), ()).wav(args.rate)
    threads = args.threads or available_cores()
    start = time.perf_counter()
    stt = SpeechToText(args.device, cpu_threads=threads)
    model = args.model or shipped_artifact(args.assembly_dir)
    runtime = InferenceRuntime.load(model, device=args.device, intra_op_threads=threads)
    load_s = time.perf_counter() - start
    process_call(AssembledCall(tile(call, 10.0), ()).wav(args.rate), stt=stt, emotions=CallEmotions(runtime))
    start = time.perf_counter()
    scorer = CallEmotions(runtime)
    result = process_call(recording, "agent,customer", stt=stt, emotions=scorer)
    processing_s = time.perf_counter() - start
    logging_s = log_call(result, scorer, runtime.version, processing_s)
    total_s = processing_s + logging_s
    return {
        "call_seconds": result.duration_s,
        "sample_rate": args.rate,
        "channels": len(result.speakers),
        "turns": len(result.turns),
        "words": sum(len(turn.words) for turn in result.turns),
        "model": runtime.version,
        "model_load_s": load_s,
        "stages_s": {**{stage: result.timings[stage] for stage in STAGES}, "logging": logging_s},
        "total_s": total_s,
        "real_time_factor": total_s / result.duration_s,
        "device": stt.device,
        "threads": threads,
        "cores": available_cores(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def log_call(result: CallResult, scorer: CallEmotions, version: str, processing_s: float) -> float:
    """Seconds to store the call as the service does: its turns' rows and result, one transaction (the database is
    created before the clock starts)."""
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{directory}/calls.db"
        migrate.upgrade(url)
        engine = make_engine(url)
        call_id = uuid.uuid4()
        with Session(engine) as session:
            session.add(
                ModelVersion(version=version, status=ModelStatus.CHAMPION, artifact_path="-", artifact_sha256="-")
            )
            session.commit()
            queue_call(session, call_id, audio_path="-", audio_bytes=1, roles=None, context=ContextMode.BIDIRECTIONAL)
        assert claim_call(engine, "benchmark", lease_s=600) is not None
        start = time.perf_counter()
        records = call_records(
            call_id,
            result,
            scorer.predictions,
            model_version=version,
            context=ContextMode.BIDIRECTIONAL,
            created_at=datetime.now(UTC),
            latency_ms=processing_s * 1000,
        )
        redaction = Redaction(enabled=True, key=secrets.token_bytes(32))
        rows = [prediction_row(record, redaction=redaction, audio_path=None) for record in records]
        assert finish_call(engine, call_id, "benchmark", call_document(call_id, result, version), rows)
        seconds = time.perf_counter() - start
        engine.dispose()
        return seconds


def table(figures: dict[str, Any]) -> str:
    total = figures["total_s"]
    rows = [
        f"call: {figures['call_seconds']:.1f} s, {figures['channels']} channels at {figures['sample_rate']} Hz, "
        f"{figures['turns']} turns, {figures['words']} words; {figures['device']}, {figures['threads']} threads "
        f"on {figures['cores']} cores; model load {figures['model_load_s']:.2f} s (not counted)",
        "",
        "| stage | seconds | share |",
        "|---|---:|---:|",
        *(f"| {stage} | {seconds:.2f} | {seconds / total:.0%} |" for stage, seconds in figures["stages_s"].items()),
        f"| **total** | **{total:.2f}** | real-time factor **{figures['real_time_factor']:.3f}** |",
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    figures = measure(args)
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
