"""Speech to text per turn, with word times on the call's clock, redacted before it leaves the pipeline.

Each turn is transcribed on its own (Whisper pads it to its 30 s window). Packing several turns of a channel into one
window ran the encoder less often, but on repetitive speech Whisper's compression-ratio check failed the packed
windows and re-decoded them at higher temperatures: 0.74 s per turn against 0.48 s per turn alone (RAVDESS clips,
2 cores); and a turn alone cannot borrow words from its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from difflib import SequenceMatcher

import numpy as np

from core.redaction import redact
from model.audio import SAMPLE_RATE
from model.speech_to_text import SpeechToText, Transcript, Word
from scoring.calls.segment import TurnSpan


def transcribe_turns(spans: Sequence[TurnSpan], channels: np.ndarray, stt: SpeechToText) -> list[Transcript]:
    """The redacted transcript of each turn, its word times in seconds from the start of the call."""
    transcripts = []
    for span in spans:
        found = stt.transcribe(channels[span.channel, span.start : span.end])
        offset = span.start / SAMPLE_RATE
        shifted = tuple(replace(w, start_s=w.start_s + offset, end_s=w.end_s + offset) for w in found.words)
        transcripts.append(redact_transcript(Transcript(found.text, shifted))[0])
    return transcripts


def redact_transcript(transcript: Transcript) -> tuple[Transcript, bool]:
    """The transcript with personal data redacted (core.redaction) in its text and in its words, and whether anything
    was. Consecutive words any of whose characters the redaction changed become one word: the redacted text between
    the kept words around them (e.g. `[PHONE]`), timed from the first one's start to the last one's end."""
    text, changed = redact(transcript.text)
    if not changed:
        return transcript, False
    where = _kept_positions(transcript.text, text)
    words: list[Word] = []
    group: list[tuple[int, int, Word]] = []  # (start, end, word) in the original text
    position = 0
    for word in transcript.words:
        start = transcript.text.find(word.text, position)
        position = start + len(word.text)
        if all(where[index] >= 0 for index in range(start, position)):
            words.extend(_joined(group, where, text))
            words.append(word)
            group = []
        else:
            group.append((start, position, word))
    words.extend(_joined(group, where, text))
    return Transcript(text, tuple(words)), True


def _kept_positions(original: str, redacted: str) -> list[int]:
    """For each character of `original`, its position in `redacted`, or -1 where the redaction replaced it."""
    where = [-1] * len(original)
    for block in SequenceMatcher(None, original, redacted, autojunk=False).get_matching_blocks():
        where[block.a : block.a + block.size] = range(block.b, block.b + block.size)
    return where


def _joined(group: list[tuple[int, int, Word]], where: list[int], redacted: str) -> list[Word]:
    if not group:
        return []
    before = [where[index] for index in range(group[0][0]) if where[index] >= 0]
    after = [where[index] for index in range(group[-1][1], len(where)) if where[index] >= 0]
    text = redacted[before[-1] + 1 if before else 0 : after[0] if after else len(redacted)].strip()
    first, last = group[0][2], group[-1][2]
    return [Word(text, first.start_s, last.end_s, min(word.probability for _, _, word in group))]
