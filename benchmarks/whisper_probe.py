"""Frozen Whisper tiny.en features on held-out RAVDESS speakers: what slicing the positional table to the clip
costs against Whisper's 30 s padding, and what an 8 kHz G.711 mu-law phone line costs.

    flock -w 1800 /tmp/equipoise-cpu.lock python -m benchmarks.whisper_probe --data-dir ../shared/data

Every clip goes through the exported ONNX graph (front end + encoder, model/whisper_encoder.py) one at a time,
either as it is ("sliced": the positional table cut to its frames) or followed by zeros to 30 s ("padded", as
Whisper). Either way the features are means over the encoder frames that cover the clip: of the conv stem, of
each layer's output and of the final-norm output, plus the concatenated means of stem and layers. A logistic
regression (standardised inputs, C picked from a grid by 3-fold cross-validation over training actors) is
trained on actors 1-18 and scored on actors 19-24, clean and through the phone line (the probe stays trained on
clean speech). Labels are the MELD emotions of model/data/speech.py (calm -> neutral, 7 classes). Intervals:
95% percentile bootstrap over test clips; "sliced - padded" is paired (same resamples). Time: the ONNX Runtime
call per clip, after a warm-up, on the clean clips.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from core.resampling import turn_weights
from core.settings import data_dir_or_exit
from model.audio import SAMPLE_RATE, decode_audio
from model.data.speech import read_clips
from model.labels import EMOTIONS
from model.whisper_encoder import clip_frames, export_whisper_encoder, load_whisper_encoder, pad_to_window
from training.channel import mulaw_line as phone_line

MODES = ("sliced", "padded")
CONDITIONS = ("clean", "phone")
LAST_TRAIN_ACTOR = 18  # actors 1-18 train, 19-24 test
# Pooled rows per clip: stem, layers 1-4 (before the final norm), final-norm output.
POOLED = ("stem", "layer 1", "layer 2", "layer 3", "layer 4", "final norm")
FEATURE_SETS: dict[str, tuple[int, ...]] = {
    **{name: (index,) for index, name in enumerate(POOLED)},
    "stem + layers 1-4 concatenated": (0, 1, 2, 3, 4),
}
C_GRID = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Encoded:
    pooled: np.ndarray  # [clips, len(POOLED), D]
    ms: np.ndarray  # [clips] ONNX Runtime call per clip


@dataclass(frozen=True)
class Score:
    estimate: float
    replicates: np.ndarray  # [R] macro F1 of each bootstrap resample

    def __sub__(self, other: Score) -> Score:
        """The paired difference: both were scored on the same resamples."""
        return Score(self.estimate - other.estimate, self.replicates - other.replicates)

    def cell(self, sign: str = "") -> str:
        lower, upper = np.quantile(self.replicates, [0.025, 0.975])
        return f"{self.estimate:{sign}.3f} [{lower:{sign}.3f}, {upper:{sign}.3f}]"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--replicates", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--cache", type=Path, default=None, help="npz of encoded features: reused if present")
    parser.add_argument("--limit", type=int, default=0, help="every n-th clip only, for a quick trial (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def encode(session: ort.InferenceSession, clips: Sequence[np.ndarray], mode: str, what: str) -> Encoded:
    def run(audio: np.ndarray) -> list[np.ndarray]:
        window = pad_to_window(audio) if mode == "padded" else audio
        return session.run(None, {"audio": window[None], "audio_lengths": np.array([len(window)])})

    run(clips[0])  # warm-up
    pooled, ms = [], []
    for audio in tqdm(clips, desc=f"{what} {mode}", mininterval=30):
        start = time.perf_counter()
        last, hidden, _ = run(audio)
        ms.append(1000 * (time.perf_counter() - start))
        frames = clip_frames(len(audio))
        pooled.append(np.concatenate([hidden[0, :, :frames].mean(axis=1), last[0, None, :frames].mean(axis=1)]))
    return Encoded(np.stack(pooled), np.array(ms))


def encode_all(args: argparse.Namespace, clean: list[np.ndarray], phone: list[np.ndarray]) -> dict[str, np.ndarray]:
    """{f"{mode}/{condition}/pooled" | f"{mode}/{condition}/ms": array}, read from --cache when it is there."""
    if args.cache and args.cache.is_file():
        with np.load(args.cache) as stored:
            return dict(stored)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        path = export_whisper_encoder(load_whisper_encoder(), Path(tmp) / "whisper.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        found = {}
        for mode in MODES:
            for condition, clips in (("clean", clean), ("phone", phone)):
                encoded = encode(session, clips, mode, condition)
                found |= {f"{mode}/{condition}/pooled": encoded.pooled, f"{mode}/{condition}/ms": encoded.ms}
    if args.cache:
        np.savez(args.cache, **found)
    return found


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[Pipeline, float]:
    """The probe refitted on all of x with the C of the best grouped 3-fold macro F1."""

    def probe(c: float) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    def cv_score(c: float) -> float:
        folds = GroupKFold(n_splits=3).split(x, y, groups)
        return float(np.mean([_macro_f1(y[v], probe(c).fit(x[t], y[t]).predict(x[v])) for t, v in folds]))

    best = max(C_GRID, key=cv_score)
    return probe(best).fit(x, y), best


def _macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(f1_score(truth, predicted, labels=range(len(EMOTIONS)), average="macro", zero_division=0))


def bootstrap_macro_f1(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> Score:
    """Macro F1 over the classes present in `truth`, and of each resample given as clip multiplicities [R, n]."""
    classes = np.unique(truth)
    is_true = (truth[:, None] == classes).astype(float)
    is_predicted = (predicted[:, None] == classes).astype(float)
    support, guessed, hits = weights @ is_true, weights @ is_predicted, weights @ (is_true * is_predicted)
    f1 = np.divide(2 * hits, support + guessed, out=np.zeros_like(hits), where=support + guessed > 0)
    estimate = float(f1_score(truth, predicted, labels=classes, average="macro", zero_division=0))
    return Score(estimate, f1.mean(axis=1))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    clips = read_clips(data_dir_or_exit(args.data_dir), "ravdess")[:: args.limit or 1]
    train = np.array([int(c.speaker) <= LAST_TRAIN_ACTOR for c in clips])
    y = np.array([EMOTIONS.index(c.emotion) for c in clips])
    groups = np.array([c.speaker for c in clips])
    clean = [decode_audio(c.path) for c in tqdm(clips, desc="decode", mininterval=30)]
    phone = [phone_line(audio) for audio, is_train in zip(clean, train, strict=True) if not is_train]
    encoded = encode_all(args, clean, phone)
    weights = turn_weights(np.arange(int((~train).sum())), args.replicates, args.seed)

    scores: dict[tuple[str, str, str], Score] = {}
    chosen: dict[tuple[str, str], float] = {}
    for mode in MODES:
        pooled = encoded[f"{mode}/clean/pooled"]
        for name, rows in FEATURE_SETS.items():
            features = pooled[:, rows].reshape(len(pooled), -1)
            probe, chosen[(mode, name)] = fit_probe(features[train], y[train], groups[train])
            for condition in CONDITIONS:
                test = features[~train] if condition == "clean" else encoded[f"{mode}/phone/pooled"][:, rows]
                predicted = probe.predict(test.reshape(len(test), -1))
                scores[(mode, condition, name)] = bootstrap_macro_f1(y[~train], predicted, weights)
    seconds = np.array([len(audio) for audio in clean]) / SAMPLE_RATE
    report(args, train, seconds, encoded, scores, chosen)


def report(
    args: argparse.Namespace,
    train: np.ndarray,
    seconds: np.ndarray,
    encoded: dict[str, np.ndarray],
    scores: dict[tuple[str, str, str], Score],
    chosen: dict[tuple[str, str], float],
) -> None:
    print(f"RAVDESS: {int(train.sum())} train clips (actors 1-{LAST_TRAIN_ACTOR}), {int((~train).sum())} test clips")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ORT threads {args.threads}")
    print("\nMacro F1 on actors 19-24 [95% bootstrap interval]; C chosen (sliced / padded)\n")
    columns = [f"{mode} {condition}" for condition in CONDITIONS for mode in MODES]
    columns += ["sliced - padded (clean)", "phone - clean (sliced)", "phone - clean (padded)", "C"]
    print("| features | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in FEATURE_SETS:
        cells = [scores[(mode, condition, name)].cell() for condition in CONDITIONS for mode in MODES]
        cells.append((scores[("sliced", "clean", name)] - scores[("padded", "clean", name)]).cell("+"))
        cells += [(scores[(mode, "phone", name)] - scores[(mode, "clean", name)]).cell("+") for mode in MODES]
        cells.append(f"{chosen[('sliced', name)]:g} / {chosen[('padded', name)]:g}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nEncode time per clip (ONNX Runtime, batch 1, {len(seconds)} clean clips, {seconds.mean():.2f} s mean)\n")
    print("| mode | median ms | p90 ms | mean ms |")
    print("|---|---|---|---|")
    for mode in MODES:
        ms = encoded[f"{mode}/clean/ms"]
        print(f"| {mode} | {np.median(ms):.1f} | {np.percentile(ms, 90):.1f} | {ms.mean():.1f} |")


if __name__ == "__main__":
    main()
