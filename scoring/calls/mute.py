"""Silencing a call's redacted speech in its stored recording, so that a card number read out on the line is gone
from what is kept as well as from the transcript.

The recording is rewritten in its own format, rate, channels and encoding, block by block (a long call is never
held whole), to a file beside it that then replaces it; a crash leaves the old file or the new one, never half of
one. Lossless encodings (PCM, mu-law, A-law, FLAC) keep every other sample exactly; Ogg and MP3 are encoded again,
one more lossy generation. Every channel is silenced over a span: the other speaker's microphone can carry the
words too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

# Whisper's word times are rough: its timestamps are tokens of 20 ms steps and a word's edges drift by a syllable.
MUTE_MARGIN_S = 0.25
BLOCK_SECONDS = 10
EXACT_SUBTYPES = {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "ULAW", "ALAW"}  # read back as integers


def muted_ranges(spans: Sequence[tuple[float, float]], rate: int, frames: int) -> list[tuple[int, int]]:
    """The spans (seconds) widened by MUTE_MARGIN_S, as merged, sorted frame ranges inside the recording."""
    ranges = sorted(
        (max(0, int((start - MUTE_MARGIN_S) * rate)), min(frames, int(np.ceil((end + MUTE_MARGIN_S) * rate))))
        for start, end in spans
    )
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def mute_spans(path: Path, spans: Sequence[tuple[float, float]]) -> float:
    """Rewrite the recording at `path` with every channel silent over `spans` (seconds from its start); returns the
    seconds silenced (0 and the file untouched when there is nothing to silence)."""
    info = sf.info(str(path))
    ranges = muted_ranges(spans, info.samplerate, info.frames)
    if not ranges:
        return 0.0
    dtype = "int32" if info.subtype in EXACT_SUBTYPES else "float64"
    block = BLOCK_SECONDS * info.samplerate
    partial = path.with_name(f".{path.name}.muting")
    with (
        sf.SoundFile(str(path)) as source,
        sf.SoundFile(
            str(partial), "w", info.samplerate, info.channels, info.subtype, info.endian, info.format
        ) as target,
    ):
        for offset in range(0, info.frames, block):
            frames = source.read(block, dtype=dtype, always_2d=True)
            for start, end in ranges:
                frames[max(start - offset, 0) : max(end - offset, 0)] = 0
            target.write(frames)
    with partial.open("rb+") as written:
        os.fsync(written.fileno())
    os.replace(partial, path)
    return sum(end - start for start, end in ranges) / info.samplerate
