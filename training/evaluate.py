"""A model artifact scored on the data sets through the serving runtime (model/runtime.py, the code path of the
API and batch scoring): MELD dialogues as text with bidirectional context, and the held-out speakers of the
acted-speech corpora as audio only (each clip a one-turn dialogue, no transcript)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from model.artifact import ModelArtifact
from model.audio import decode_audio
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import read_clips, split_by_speaker
from model.labels import DEFAULT_MINORITY
from model.quantize import ActivationRanges
from model.runtime import InferenceRuntime, TurnPrediction, UtteranceInput
from training.channel import CHANNELS
from training.metrics import MetricsReport, compute_metrics, conversation_intervals

if TYPE_CHECKING:
    from training.calibration import CalibrationFit

DIALOGUES_PER_CALL = 64


@dataclass(frozen=True)
class Scored:
    labels: np.ndarray  # [N] true class index
    probs: np.ndarray  # [N, C] calibrated probabilities
    rescored: np.ndarray  # [N] bool, int8 near ties re-encoded in fp32 (model/runtime.py)
    conversations: np.ndarray | None = None  # [N] the dialogue of each turn (MELD)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def report(self, emotions: Sequence[str]) -> MetricsReport:
        minority = [m for m in DEFAULT_MINORITY if m in emotions]
        return compute_metrics(self.labels, self.predicted, emotions, self.probs, minority=minority)


def _score(runtime: InferenceRuntime, dialogues: list[list[UtteranceInput]], labels: list[str], what: str) -> Scored:
    turns: list[TurnPrediction] = []
    for start in tqdm(range(0, len(dialogues), DIALOGUES_PER_CALL), desc=what, unit="call", leave=False):
        for scored in runtime.classify(dialogues[start : start + DIALOGUES_PER_CALL], causal=False):
            turns += scored
    index = np.array([runtime.emotions.index(name) for name in labels], dtype=np.int64)
    conversations = np.repeat(np.arange(len(dialogues)), [len(d) for d in dialogues])
    probs, rescored = np.stack([turn.emotion_probs for turn in turns]), np.array([turn.rescored for turn in turns])
    return Scored(index, probs, rescored, conversations)


def score_meld(runtime: InferenceRuntime, data_dir: Path, split: str = "test") -> Scored:
    """Every MELD dialogue of `split` as text turns with their speakers, bidirectional context."""
    dialogues = group_dialogues(read_utterances(data_dir, split))
    turns = [[UtteranceInput(u.text, None, u.speaker) for u in d.utterances] for d in dialogues]
    labels = [u.emotion for d in dialogues for u in d.utterances]
    return _score(runtime, turns, labels, f"MELD {split}")


def score_speech(
    runtime: InferenceRuntime, data_dir: Path, corpus: str, split: str = "test", line: str = "clean"
) -> Scored:
    """The clips of `corpus`'s speaker-independent `split`, audio only, through the telephone `line`
    (training/channel.py CHANNELS: "clean" is the 16 kHz recording)."""
    clips = getattr(split_by_speaker(read_clips(data_dir, corpus)), split)
    turns = [[UtteranceInput(None, CHANNELS[line](decode_audio(clip.path)), None)] for clip in clips]
    return _score(runtime, turns, [clip.emotion for clip in clips], f"{corpus} {split} audio ({line})")


def audio_only_key(line: str) -> str:
    """Where a release's metrics keep the audio-only reports through `line`."""
    return "audio_only" if line == "clean" else f"audio_only_{line}"


def evaluate_artifact(
    artifact_dir: Path,
    data_dir: Path,
    corpora: Sequence[str] = ("ravdess", "tess", "emodb"),
    precision: str = "fp32",
    lines: Sequence[str] = ("clean",),
) -> dict[str, Any]:
    """{"meld_test": report, "meld_test_intervals": its 95% intervals over dialogues, "audio_only": {corpus: report},
    "audio_only_<line>": ... for every other line} as dicts (training/metrics.py)."""
    runtime = InferenceRuntime.load(artifact_dir, device="cpu", precision=precision)  # type: ignore[arg-type]
    emotions = runtime.emotions.names
    audio = {
        audio_only_key(line): {
            c: score_speech(runtime, data_dir, c, line=line).report(emotions).to_dict() for c in corpora
        }
        for line in lines
    }
    meld = score_meld(runtime, data_dir)
    spread = conversation_intervals(meld.labels, meld.predicted, meld.conversations, emotions)
    return {"meld_test": meld.report(emotions).to_dict(), "meld_test_intervals": spread, **audio}


@dataclass(frozen=True)
class Int8Agreement:
    """How the int8 runtime's MELD labels compare with fp32's at one near-tie re-scoring margin."""

    margin: float  # 0: the int8 encoder alone
    split: str
    turns: int
    changed: int  # labels that differ from fp32's
    rescored: int  # turns re-encoded in fp32

    @property
    def share(self) -> float:
        """Share of labels unchanged."""
        return 1 - self.changed / self.turns


def int8_agreements(
    artifact: Path | ModelArtifact, data_dir: Path, split: str = "dev", margins: Sequence[float] = (0.0,)
) -> list[Int8Agreement]:
    """MELD `split` scored once in fp32, then in int8 at each re-scoring margin, labels compared."""
    reference = score_meld(InferenceRuntime.load(artifact, device="cpu"), data_dir, split).predicted
    results = []
    for margin in tqdm(margins, desc=f"int8 margins on MELD {split}", unit="margin"):
        runtime = InferenceRuntime.load(artifact, device="cpu", precision="int8", rescore_margin=margin)
        scored = score_meld(runtime, data_dir, split)
        changed = int((scored.predicted != reference).sum())
        results.append(Int8Agreement(margin, split, len(reference), changed, int(scored.rescored.sum())))
    return results


def meld_calibration(artifact_dir: Path, data_dir: Path) -> CalibrationFit:
    """The artifact's calibration record measured through the serving runtime: fitted on MELD dev scored as text
    with bidirectional context (the modality mix the shipped model serves, and nothing else: no acted speech), with
    the training prior of MELD train's labels."""
    from model.artifact import ClassPrior, DataSource
    from training.calibration import fit_calibration_record
    from training.common import class_prior

    runtime = InferenceRuntime.load(artifact_dir, device="cpu")
    emotions = runtime.emotions.names
    dev = score_meld(runtime, data_dir, "dev")
    assert dev.conversations is not None
    train = [runtime.emotions.index(u.emotion) for u in read_utterances(data_dir, "train")]
    logits = runtime.artifact.calibration.temperature * np.log(np.clip(dev.probs.astype(np.float64), 1e-30, None))
    dev_source = DataSource("MELD dev", "text", len(dev.labels), len(np.unique(dev.conversations)))
    training = ClassPrior(
        tuple(class_prior(np.bincount(train, minlength=len(emotions)))), DataSource("MELD train", "text", len(train))
    )
    return fit_calibration_record(
        logits,
        dev.labels,
        dev.conversations,
        emotions,
        dev_source=dev_source,
        training_prior=training,
        sentiment_temperature=runtime.artifact.calibration.sentiment_temperature,
    )


def meld_int8_ranges(artifact_dir: Path, data_dir: Path, texts: int = 2_000, seed: int = 0) -> ActivationRanges:
    """Activation ranges of the artifact's fp32 encoder for the int8 encoder's smoothing (model/quantize.py),
    measured on `texts` random MELD train utterances: never dev, where the int8 agreement is reported."""
    from model.artifact import load_artifact
    from model.preprocess import Preprocessor
    from model.quantize import measure_activation_ranges, text_calibration

    artifact = load_artifact(artifact_dir)
    train = [u.text for u in read_utterances(data_dir, "train") if u.text]
    chosen = np.random.default_rng(seed).choice(len(train), size=min(texts, len(train)), replace=False)
    preprocessor = Preprocessor.from_file(artifact.tokenizer_path, artifact.preprocessing)
    calibration = text_calibration(preprocessor, [train[i] for i in sorted(chosen)])
    return measure_activation_ranges(artifact.encoder_path, calibration)
