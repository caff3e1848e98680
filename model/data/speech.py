"""Acted-speech corpora (RAVDESS, TESS, EmoDB): `<data_dir>/{corpus}/labels.csv` plus the audio files it names.

Every clip keeps its corpus label (`original_emotion`) and carries the MELD emotion it is mapped to
(`emotion`, one of model/labels.py EMOTIONS). EMOTION_MAP and MAPPING_NOTES are the documented mapping the
model card prints. Splits are speaker-independent and fixed (no randomness), never by file.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from model.labels import EMOTIONS

CORPORA: tuple[str, ...] = ("ravdess", "tess", "emodb")

_IDENTITY = {name: name for name in EMOTIONS}
EMOTION_MAP: Mapping[str, Mapping[str, str]] = {
    "ravdess": {**_IDENTITY, "calm": "neutral"},
    "tess": dict(_IDENTITY),
    "emodb": {**_IDENTITY, "boredom": "neutral"},
}
"""corpus -> label in its labels.csv -> MELD emotion. Every label not listed is refused when reading."""

MAPPING_NOTES: Mapping[str, Mapping[str, str]] = {
    "ravdess": {"calm": "no MELD counterpart; a low-arousal neutral delivery, mapped to neutral"},
    "tess": {"surprise": "'pleasant surprise' (file code 'ps') only; MELD surprise also covers negative surprise"},
    "emodb": {"boredom": "no MELD counterpart; low-arousal and without a clear valence, mapped to neutral"},
}

LANGUAGES: Mapping[str, str] = {"ravdess": "en", "tess": "en", "emodb": "de"}
_TEXT_COLUMN: Mapping[str, str] = {"ravdess": "text", "tess": "text", "emodb": "text_de"}
# TESS names one file of the 64-year-old speaker OAF "OA_bite_neutral"; it is the same speaker.
_SPEAKER_ALIASES: Mapping[tuple[str, str], str] = {("tess", "OA"): "OAF"}

# Speakers per gender held out for (dev, test). With speakers of each gender in ascending id order, the last
# ones go to test and the ones before them to dev. RAVDESS: 16/4/4 actors, EmoDB: 6/2/2 speakers, each held-out
# partition one half female; TESS has two speakers, both female: OAF trains, YAF tests, dev is empty.
HELD_OUT_PER_GENDER: Mapping[str, tuple[int, int]] = {"ravdess": (2, 2), "emodb": (1, 1), "tess": (0, 1)}


@dataclass(frozen=True, slots=True)
class Clip:
    corpus: str
    path: Path
    speaker: str
    gender: str
    text: str
    original_emotion: str
    emotion: str
    language: str


@dataclass(frozen=True, slots=True)
class Splits:
    train: tuple[Clip, ...]
    dev: tuple[Clip, ...]
    test: tuple[Clip, ...]


def read_clips(data_dir: Path, corpus: str) -> list[Clip]:
    """The clips of one corpus in labels.csv order, with absolute audio paths."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {', '.join(CORPORA)}")
    root = Path(data_dir) / corpus
    with (root / "labels.csv").open(encoding="utf-8", newline="") as file:
        return [_clip(corpus, root, row, number) for number, row in enumerate(csv.DictReader(file), start=1)]


def split_by_speaker(clips: Iterable[Clip]) -> Splits:
    """Speaker-independent train/dev/test, per corpus as HELD_OUT_PER_GENDER says."""
    clips = list(clips)
    partition: dict[tuple[str, str], str] = {}
    for corpus, gender in sorted({(c.corpus, c.gender) for c in clips}):
        speakers = sorted({c.speaker for c in clips if (c.corpus, c.gender) == (corpus, gender)})
        names = _tail_assignment(len(speakers), *HELD_OUT_PER_GENDER[corpus])
        partition.update({(corpus, speaker): name for speaker, name in zip(speakers, names, strict=True)})
    return _partition(clips, lambda clip: partition[(clip.corpus, clip.speaker)])


def split_by_text(clips: Iterable[Clip]) -> Splits:
    """Text-independent train/dev/test: of each corpus's distinct texts in sorted order, every tenth from the
    ninth goes to dev and every tenth from the tenth to test (TESS: 160/20/20 target words; EmoDB: 8/1/1
    sentences). For TESS this is the split by target word; it is not speaker-independent.
    """
    clips = list(clips)
    bucket: dict[tuple[str, str], int] = {}
    for corpus in {c.corpus for c in clips}:
        texts = sorted({c.text for c in clips if c.corpus == corpus})
        bucket.update({(corpus, text): index % 10 for index, text in enumerate(texts)})
    names = {8: "dev", 9: "test"}
    return _partition(clips, lambda clip: names.get(bucket[(clip.corpus, clip.text)], "train"))


def _tail_assignment(count: int, n_dev: int, n_test: int) -> list[str]:
    if n_dev + n_test >= count:
        raise ValueError(f"cannot hold out {n_dev} + {n_test} of {count} speakers and keep one for training")
    return ["train"] * (count - n_dev - n_test) + ["dev"] * n_dev + ["test"] * n_test


def _partition(clips: list[Clip], assign: Callable[[Clip], str]) -> Splits:
    parts: dict[str, list[Clip]] = {"train": [], "dev": [], "test": []}
    for clip in clips:
        parts[assign(clip)].append(clip)
    return Splits(**{name: tuple(members) for name, members in parts.items()})


def _clip(corpus: str, root: Path, row: dict[str, str], number: int) -> Clip:
    try:
        original = row["emotion"].strip().lower()
        speaker = row["speaker"].strip()
        mapping = EMOTION_MAP[corpus]
        if original not in mapping:
            raise ValueError(f"emotion {original!r} has no mapping; known: {', '.join(sorted(mapping))}")
        return Clip(
            corpus=corpus,
            path=root / row["file"],
            speaker=_SPEAKER_ALIASES.get((corpus, speaker), speaker),
            gender=row["gender"].strip().lower(),
            text=row[_TEXT_COLUMN[corpus]].strip(),
            original_emotion=original,
            emotion=mapping[original],
            language=LANGUAGES[corpus],
        )
    except (KeyError, ValueError) as error:
        raise ValueError(f"{corpus} labels.csv row {number}: {error}") from error
