"""Per-turn emotion accuracy in whole calls against the same clips scored as separate turns (issue 22's acceptance).

    python -m benchmarks.call_emotions --data-dir ../shared/data --json /tmp/call_emotions.json

Every clip of RAVDESS's held-out actors (21-24) once, in stereo calls of `--turns` clips on alternating channels
with 0.5-2 s gaps (benchmarks/call_builder.py), at each of `--rates`, once per seed of `--seeds` (each seed another
order of the clips and other gaps). The gap between the call and the clips alone comes with a 95% interval from
resampling clips (a clip's assemblies together). Five scorings of the served model:

- call: the call through scoring.calls.process_call with CallEmotions (the turns as one dialogue, both directions,
  text from speech to text, audio of the turn's channel); a true turn no found turn matches (same channel, start
  within 0.5 s) counts as wrong;
- separate: each true turn alone (a dialogue of one turn): its audio cut from the same decoded call at its true
  start and end, its text from the same speech to text of that audio alone, redacted the same way;
- separate, audio only: the same audio without text;
- call, turns alone: the call's found turns with their transcript and audio, each a dialogue of one turn (how much
  of the gap between `call` and `separate` the dialogue context makes, and how much the found turns' cut and text);
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="call assemblies (default 0 1 2)")
    return parser.parse_args(argv)


# "matched": a found turn matches the clip's (same channel, start within 0.5 s)
SCORINGS = ("matched", "call", "call_turns_alone", "call_audio_only", "separate", "separate_audio_only")
INTERVAL_REPLICATES = 5_000


def score_rate(
    calls: Sequence[tuple[AssembledCall, Sequence[Utterance]]],
    rate: int,
    runtime: InferenceRuntime,
    stt: SpeechToText,
) -> dict[str, dict[str, bool]]:
    """For each scoring, whether each clip (by its file name) was labelled right in `calls` at `rate`."""
    hits: dict[str, dict[str, bool]] = {name: {} for name in SCORINGS}
    for call, clips in calls:
        scorer = CallEmotions(runtime)
        result = process_call(call.wav(rate), ",".join(ROLES), stt=stt, emotions=scorer)
        pairs = matched_turns(call, result.turns, START_TOLERANCE_S)
        without_text = [UtteranceInput(None, turn.audio.cut(result.channels), turn.speaker) for turn in result.turns]
        voice_only = runtime.classify([without_text], False)[0] if without_text else []
        voice_label = {turn.turn: p.emotion for turn, p in zip(result.turns, voice_only, strict=True)}
        each = [[UtteranceInput(t.text or None, t.audio.cut(result.channels), t.speaker)] for t in result.turns]
        alone_label = {t.turn: p[0].emotion for t, p in zip(result.turns, runtime.classify(each, False), strict=True)}
        audio = [_true_cut(result.channels, truth.channel, truth.start_s, truth.end_s) for truth in call.turns]
        texts = [redact_transcript(stt.transcribe(wave))[0].text or None for wave in audio]
        speakers = [ROLES[truth.channel] for truth in call.turns]
        with_text = runtime.classify(
            [[UtteranceInput(t, a, s)] for t, a, s in zip(texts, audio, speakers, strict=True)], False
        )
        alone = runtime.classify([[UtteranceInput(None, a, s)] for a, s in zip(audio, speakers, strict=True)], False)
        for clip, truth, found, text_turn, audio_turn in zip(clips, call.turns, pairs, with_text, alone, strict=True):
            hits["matched"][clip.source] = found is not None
            hits["call"][clip.source] = (
                found is not None and found.emotion is not None and (found.emotion.label == truth.emotion)
            )
            hits["call_turns_alone"][clip.source] = found is not None and alone_label[found.turn] == truth.emotion
            hits["call_audio_only"][clip.source] = found is not None and voice_label[found.turn] == truth.emotion
            hits["separate"][clip.source] = text_turn[0].emotion == truth.emotion
            hits["separate_audio_only"][clip.source] = audio_turn[0].emotion == truth.emotion
    return hits


def paired_gap(call: np.ndarray, separate: np.ndarray, seed: int) -> dict[str, float]:
    """Accuracy in calls minus accuracy alone, with a 95% percentile interval from resampling clips; `call` and
    `separate` are [seeds, clips] hits, so a clip's assemblies (one per seed) are resampled together."""
    per_clip = (call.astype(float) - separate.astype(float)).mean(axis=0)
    rng = np.random.default_rng(seed)
    draws = per_clip[rng.integers(0, len(per_clip), size=(INTERVAL_REPLICATES, len(per_clip)))].mean(axis=1)
    lower, upper = np.quantile(draws, [0.025, 0.975])
    return {"estimate": float(per_clip.mean()), "lower": float(lower), "upper": float(upper)}


def _true_cut(channels: np.ndarray, channel: int, start_s: float, end_s: float) -> np.ndarray:
    return channels[channel, round(start_s * SAMPLE_RATE) : round(end_s * SAMPLE_RATE)]


def assembled_calls(data_dir: Path, seed: int, clips: int, turns: int) -> list[tuple[AssembledCall, list[Utterance]]]:
    """Every held-out clip once (the first `clips` if set), in calls of `turns`, shuffled and spaced by `seed`."""
    utterances: list[Utterance] = ravdess_held_out(data_dir, seed=seed)
    if clips:
        utterances = sorted(utterances, key=lambda u: u.source)[:clips]
    chunks = [utterances[i : i + turns] for i in range(0, len(utterances), turns)]
    return [(assemble(chunk, seed=seed * 1_000 + i), chunk) for i, chunk in enumerate(chunks)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = data_dir_or_exit(args.data_dir)
    threads = args.threads or available_cores()
    model = args.model or shipped_artifact(args.assembly_dir)
    runtime = InferenceRuntime.load(model, device="cpu", intra_op_threads=threads)
    stt = SpeechToText("cpu", cpu_threads=threads)
    figures: dict[str, Any] = {"model": runtime.version, "seeds": list(args.seeds), "rates": {}}
    hits: dict[int, list[dict[str, dict[str, bool]]]] = {rate: [] for rate in args.rates}
    for seed in args.seeds:
        calls = assembled_calls(data_dir, seed, args.clips, args.turns)
        figures["clips"], figures["calls_per_seed"] = sum(len(c) for _, c in calls), len(calls)
        for rate in args.rates:
            start = time.perf_counter()
            hits[rate].append(score_rate(calls, rate, runtime, stt))
            print(f"seed {seed}, {rate} Hz: {time.perf_counter() - start:.0f} s", flush=True)
    for rate, per_seed in hits.items():
        figures["rates"][str(rate)] = _pooled(per_seed, min(args.seeds))
    return figures


def _pooled(per_seed: list[dict[str, dict[str, bool]]], seed: int) -> dict[str, Any]:
    clips = sorted(per_seed[0]["call"])
    matrix = {name: np.array([[run[name][clip] for clip in clips] for run in per_seed]) for name in SCORINGS}
    return {
        "accuracy": {name: float(values.mean()) for name, values in matrix.items()},
        "accuracy_per_seed": {name: values.mean(axis=1).round(4).tolist() for name, values in matrix.items()},
        "call_minus_separate": paired_gap(matrix["call"], matrix["separate"], seed),
    }


def table(figures: dict[str, Any]) -> str:
    rows = [
        f"{figures['model']}: {figures['clips']} clips of RAVDESS actors 21-24 in {figures['calls_per_seed']} stereo "
        f"calls, assembled with seeds {figures['seeds']}; accuracy pooled over the seeds",
        "",
        "| rate | turns matched | call | separate, ASR text + audio | call - separate [95% CI] "
        "| call, turns alone | separate, audio only | call, audio only |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate, row in figures["rates"].items():
        a, gap = row["accuracy"], row["call_minus_separate"]
        rows.append(
            f"| {rate} | {a['matched']:.3f} | {a['call']:.3f} | {a['separate']:.3f} | {gap['estimate']:+.3f} "
            f"[{gap['lower']:+.3f}, {gap['upper']:+.3f}] | {a['call_turns_alone']:.3f} | "
            f"{a['separate_audio_only']:.3f} | {a['call_audio_only']:.3f} |"
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
