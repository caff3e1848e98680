from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from model.data.speech import (
    CORPORA,
    EMOTION_MAP,
    MAPPING_NOTES,
    Clip,
    Splits,
    read_clips,
    split_by_speaker,
    split_by_text,
)
from model.labels import EMOTIONS

pytestmark = pytest.mark.data

COUNTS = {"ravdess": 1440, "tess": 2800, "emodb": 535}


@pytest.fixture(scope="module")
def clips(data_dir: Path) -> dict[str, list[Clip]]:
    return {corpus: read_clips(data_dir, corpus) for corpus in CORPORA}


def _speakers(part: tuple[Clip, ...]) -> set[str]:
    return {clip.speaker for clip in part}


def _parts(splits: Splits) -> tuple[tuple[Clip, ...], ...]:
    return splits.train, splits.dev, splits.test


def test_counts_and_records(clips: dict[str, list[Clip]]) -> None:
    assert {corpus: len(rows) for corpus, rows in clips.items()} == COUNTS
    for corpus, rows in clips.items():
        assert all(clip.corpus == corpus and clip.path.is_file() for clip in rows)
        assert {clip.language for clip in rows} == {"de" if corpus == "emodb" else "en"}
        assert {clip.gender for clip in rows} <= {"female", "male"}
    assert Counter(c.original_emotion for c in clips["emodb"])["boredom"] == 81
    assert {c.speaker for c in clips["tess"]} == {"OAF", "YAF"}  # the one "OA" file is OAF's


def test_mapping_covers_every_label_present(clips: dict[str, list[Clip]]) -> None:
    for corpus, rows in clips.items():
        present = {clip.original_emotion for clip in rows}
        assert present <= EMOTION_MAP[corpus].keys()
        assert set(EMOTION_MAP[corpus].values()) <= set(EMOTIONS)
        assert set(MAPPING_NOTES[corpus]) <= present
        assert all(clip.emotion == EMOTION_MAP[corpus][clip.original_emotion] for clip in rows)
    neutral = Counter(c.emotion for c in clips["ravdess"])["neutral"]
    assert neutral == 96 + 192  # neutral plus calm
    assert Counter(c.emotion for c in clips["emodb"])["neutral"] == 79 + 81  # neutral plus boredom


def test_speaker_splits_are_disjoint_balanced_and_fixed(clips: dict[str, list[Clip]]) -> None:
    expected_test = {"ravdess": {"21", "22", "23", "24"}, "emodb": {"15", "16"}, "tess": {"YAF"}}
    for corpus, rows in clips.items():
        splits = split_by_speaker(rows)
        train, dev, test = (_speakers(part) for part in _parts(splits))
        assert not (train & dev or train & test or dev & test)
        assert sum(len(part) for part in _parts(splits)) == len(rows)
        assert _speakers(splits.test) == expected_test[corpus]
        assert split_by_speaker(list(reversed(rows))) == Splits(*(tuple(reversed(p)) for p in _parts(splits)))
        for held_out in (splits.dev, splits.test):
            genders = Counter(clip.gender for clip in {c.speaker: c for c in held_out}.values())
            assert len(set(genders.values())) <= 1  # as many female as male speakers
    ravdess = split_by_speaker(clips["ravdess"])
    assert [len(_speakers(part)) for part in _parts(ravdess)] == [16, 4, 4]


def test_mixed_corpora_are_split_per_corpus(clips: dict[str, list[Clip]]) -> None:
    mixed = split_by_speaker(clips["emodb"] + clips["ravdess"])
    alone = split_by_speaker(clips["emodb"])
    assert tuple(c for c in mixed.test if c.corpus == "emodb") == alone.test


def test_tess_split_by_target_word(clips: dict[str, list[Clip]]) -> None:
    splits = split_by_text(clips["tess"])
    words = [{clip.text.removeprefix("Say the word ") for clip in part} for part in _parts(splits)]
    assert [len(w) for w in words] == [160, 20, 20]
    assert not (words[0] & words[1] or words[0] & words[2] or words[1] & words[2])
    assert [len(part) for part in _parts(splits)] == [2240, 280, 280]
    assert split_by_text(clips["tess"]) == splits
