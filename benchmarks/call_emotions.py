"""Per-turn emotion accuracy in whole calls against the same clips scored as separate turns (issue 22's acceptance).

    python -m benchmarks.call_emotions --data-dir ../shared/data --json /tmp/call_emotions.json

Every clip of RAVDESS's held-out actors (21-24) once, in stereo calls of `--turns` clips on alternating channels
with 0.5-2 s gaps (benchmarks/call_builder.py), at each of `--rates`. Three scorings of the served model:

- call: the call through scoring.calls.process_call with CallEmotions (the turns as one dialogue, both directions,
  text from speech to text, audio of the turn's channel); a true turn no found turn matches (same channel, start
  within 0.5 s) counts as wrong;
- separate: each true turn alone (a dialogue of one turn): its audio cut from the same decoded call at its true
  start and end, its text from the same speech to text of that audio alone, redacted the same way;
- separate, audio only: the same audio without text;
- call, audio only: the call's found turns as one dialogue as in `call`, without their text (how much of the gap
  between `call` and `separate, audio only` the transcript makes, and how much the dialogue context).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.call_builder import AssembledCall, Utterance, assemble, matched_turns, ravdess_held_out
from core.settings import available_cores, data_dir_or_exit
from model.audio import SAMPLE_RATE
from model.default_model import shipped_artifact
from model.runtime import InferenceRuntime, UtteranceInput
from model.speech_to_text import SpeechToText
from scoring.calls import CallEmotions, process_call
from scoring.calls.transcribe import redact_transcript

ROLES = ("agent", "customer")
START_TOLERANCE_S = 0.5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--model", type=Path, default=None, help="model artifact (default: the shipped default)")
    parser.add_argument("--assembly-dir", type=Path, default=Path("/tmp/equipoise-call-emotions"))
    parser.add_argument("--rates", type=int, nargs="+", default=[16_000, 8_000])
    parser.add_argument("--turns", type=int, default=20, help="clips per call (default 20)")
    parser.add_argument("--clips", type=int, default=0, help="use only the first N clips (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default: every core)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def score_rate(
    calls: Sequence[AssembledCall], rate: int, runtime: InferenceRuntime, stt: SpeechToText
) -> dict[str, Any]:
    hits = {"call": 0, "call_audio_only": 0, "separate": 0, "separate_audio_only": 0}
    matched = total = 0
    for call in calls:
        scorer = CallEmotions(runtime)
        result = process_call(call.wav(rate), ",".join(ROLES), stt=stt, emotions=scorer)
        pairs = matched_turns(call, result.turns, START_TOLERANCE_S)
        without_text = [UtteranceInput(None, turn.audio.cut(result.channels), turn.speaker) for turn in result.turns]
        voice_only = runtime.classify([without_text], False)[0] if without_text else []
        voice_label = {turn.turn: p.emotion for turn, p in zip(result.turns, voice_only, strict=True)}
        audio = [_true_cut(result.channels, truth.channel, truth.start_s, truth.end_s) for truth in call.turns]
        texts = [redact_transcript(stt.transcribe(wave))[0].text or None for wave in audio]
        speakers = [ROLES[truth.channel] for truth in call.turns]
        with_text = runtime.classify(
            [[UtteranceInput(t, a, s)] for t, a, s in zip(texts, audio, speakers, strict=True)], False
        )
        alone = runtime.classify([[UtteranceInput(None, a, s)] for a, s in zip(audio, speakers, strict=True)], False)
        for truth, found, text_turn, audio_turn in zip(call.turns, pairs, with_text, alone, strict=True):
            right = found is not None and found.emotion is not None and found.emotion.label == truth.emotion
            hits["call"] += right
            hits["call_audio_only"] += found is not None and voice_label[found.turn] == truth.emotion
            hits["separate"] += text_turn[0].emotion == truth.emotion
            hits["separate_audio_only"] += audio_turn[0].emotion == truth.emotion
            matched += found is not None
        total += len(call.turns)
    return {
        "turns": total,
        "matched": matched,
        "accuracy": {
            "call": hits["call"] / total,
            "call_matched_only": hits["call"] / max(matched, 1),
            "call_audio_only": hits["call_audio_only"] / total,
            "separate_asr_text_and_audio": hits["separate"] / total,
            "separate_audio_only": hits["separate_audio_only"] / total,
        },
    }


def _true_cut(channels: np.ndarray, channel: int, start_s: float, end_s: float) -> np.ndarray:
    return channels[channel, round(start_s * SAMPLE_RATE) : round(end_s * SAMPLE_RATE)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = data_dir_or_exit(args.data_dir)
    utterances: list[Utterance] = ravdess_held_out(data_dir, seed=args.seed)
    if args.clips:
        utterances = utterances[: args.clips]
    chunks = [utterances[i : i + args.turns] for i in range(0, len(utterances), args.turns)]
    calls = [assemble(chunk, seed=args.seed + i) for i, chunk in enumerate(chunks)]
    threads = args.threads or available_cores()
    model = args.model or shipped_artifact(args.assembly_dir)
    runtime = InferenceRuntime.load(model, device="cpu", intra_op_threads=threads)
    stt = SpeechToText("cpu", cpu_threads=threads)
    figures: dict[str, Any] = {"model": runtime.version, "clips": len(utterances), "calls": len(calls), "rates": {}}
    for rate in args.rates:
        start = time.perf_counter()
        figures["rates"][str(rate)] = score_rate(calls, rate, runtime, stt)
        figures["rates"][str(rate)]["seconds"] = time.perf_counter() - start
    return figures


def table(figures: dict[str, Any]) -> str:
    rows = [
        f"{figures['model']}: {figures['clips']} clips of RAVDESS actors 21-24 in {figures['calls']} stereo calls",
        "",
        "| rate | turns matched | call | call (matched only) | separate, ASR text + audio | separate, audio only "
        "| call, audio only |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate, row in figures["rates"].items():
        a = row["accuracy"]
        rows.append(
            f"| {rate} | {row['matched']}/{row['turns']} | {a['call']:.3f} | {a['call_matched_only']:.3f} | "
            f"{a['separate_asr_text_and_audio']:.3f} | {a['separate_audio_only']:.3f} | {a['call_audio_only']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    figures = measure(args)
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
