"""Muting a call's redacted spans in its stored recording: the spans (widened by the margin) are silent on every
channel, every other sample of a lossless file is kept exactly, the format stays, and the file is replaced whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from scoring.calls.mute import MUTE_MARGIN_S, mute_spans, muted_ranges

RATE = 8_000


def recording(path: Path, seconds: float = 30.0, **options: str) -> np.ndarray:
    """A 2-channel recording of noise at `path`; returns what a reader gets back from it (int32 frames)."""
    rng = np.random.default_rng(0)
    frames = (rng.uniform(-0.5, 0.5, (round(seconds * RATE), 2)) * 32767).astype(np.int16)
    sf.write(str(path), frames, RATE, **options)
    return sf.read(str(path), dtype="int32", always_2d=True)[0]


def test_spans_are_widened_by_the_margin_clipped_to_the_file_and_merged() -> None:
    margin = round(MUTE_MARGIN_S * RATE)
    assert muted_ranges([(2.0, 3.0)], RATE, 100 * RATE) == [(2 * RATE - margin, 3 * RATE + margin)]
    assert muted_ranges([(0.1, 0.2), (99.9, 120.0)], RATE, 100 * RATE) == [
        (0, round(0.2 * RATE) + margin),
        (round(99.9 * RATE) - margin, 100 * RATE),
    ]
    assert muted_ranges([(5.0, 6.0), (1.0, 2.0), (6.2, 7.0)], RATE, 100 * RATE) == [
        (RATE - margin, 2 * RATE + margin),
        (5 * RATE - margin, 7 * RATE + margin),
    ]
    assert muted_ranges([], RATE, 100) == []


@pytest.mark.parametrize(
    ("name", "options"),
    [("call.wav", {"subtype": "PCM_16"}), ("call.wav", {"subtype": "ULAW"}), ("call.flac", {})],
    ids=["pcm16", "mu-law", "flac"],
)
def test_a_lossless_recording_is_silent_over_the_spans_and_unchanged_elsewhere(
    tmp_path: Path, name: str, options: dict[str, str]
) -> None:
    path = tmp_path / name
    before = recording(path, **options)
    info = sf.info(str(path))
    spans = [(3.0, 4.5), (12.0, 12.4), (25.0, 26.0)]  # one range crosses the 10 s block boundary below
    spans.append((9.9, 10.2))
    muted = mute_spans(path, spans)
    after = sf.read(str(path), dtype="int32", always_2d=True)[0]
    silent = np.zeros(len(before), dtype=bool)
    for start, end in muted_ranges(spans, RATE, len(before)):
        silent[start:end] = True
    assert after.shape == before.shape and (sf.info(str(path)).format, sf.info(str(path)).subtype) == (
        info.format,
        info.subtype,
    )
    assert not after[silent].any()
    assert np.array_equal(after[~silent], before[~silent])
    assert muted == pytest.approx(silent.sum() / RATE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the partial file replaced the recording


def test_a_lossy_recording_is_encoded_again_with_the_spans_silent(tmp_path: Path) -> None:
    path = tmp_path / "call.mp3"
    recording(path, seconds=12.0, format="MP3", subtype="MPEG_LAYER_III")
    mute_spans(path, [(4.0, 6.0)])
    after, rate = sf.read(str(path), always_2d=True)
    assert sf.info(str(path)).format == "MP3" and rate == RATE
    inside = after[round(4.0 * rate) : round(6.0 * rate)]  # the codec's window may smear the edges, not the middle
    outside = after[round(8.0 * rate) : round(10.0 * rate)]
    assert np.abs(inside).max() < 0.01 < np.abs(outside).max()


def test_nothing_to_silence_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    recording(path, seconds=2.0)
    before = path.stat().st_mtime_ns, path.read_bytes()
    assert mute_spans(path, []) == 0.0
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
