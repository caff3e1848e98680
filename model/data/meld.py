"""MELD reader: `<data_dir>/meld/{split}_sent_emo.csv`, text repaired, labels checked against model/labels.py.

MELD's text mixes Windows-1252 and UTF-8. Three kinds of damage are repaired:
- UTF-8 bytes decoded as Windows-1252 or Latin-1 ("â€™" or "â\\x80\\x99" for "’", "â€”" for "—");
- Windows-1252 bytes decoded as Latin-1, left as C1 control characters ("\\x92" for "’", "\\x85" for "…");
- raw Windows-1252 bytes inside a UTF-8 file (decoded by the `equipoise-cp1252` codec error handler).
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from model.labels import EMOTIONS, SENTIMENTS

SPLITS: tuple[str, ...] = ("train", "dev", "test")

# Windows-1252 maps 0x80-0x9F to printable characters (five bytes are undefined and stay C1 controls).
_CP1252_HIGH = {b: bytes([b]).decode("cp1252", errors="ignore") for b in range(0x80, 0xA0)}
_CHAR_TO_BYTE = {char: b for b, char in _CP1252_HIGH.items() if char} | {chr(b): b for b in range(0x80, 0x100)}
_CONTINUATION = "".join(re.escape(c) for c, b in _CHAR_TO_BYTE.items() if 0x80 <= b <= 0xBF)
# A UTF-8 sequence seen through either codec: a lead byte (as a Latin-1 character) and its continuation bytes.
# Only leads of 2-byte sequences (Latin, Greek, Cyrillic...), of U+2000-U+2FFF (punctuation, symbols) and of
# 4-byte sequences (emoji) are tried: the other 3-byte leads are accented vowels ("é", "è"...) that real text
# may follow with punctuation, and "é…”" must not become a CJK character.
_DOUBLE_ENCODED = re.compile(
    f"[\u00c2-\u00df][{_CONTINUATION}]|\u00e2[{_CONTINUATION}]{{2}}|\u00f0[{_CONTINUATION}]{{3}}"
)
_C1_CONTROLS = re.compile("[\u0080-\u009f]")


def _cp1252_fallback(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start : error.end]
    return bad.decode("cp1252", errors="replace"), error.end


codecs.register_error("equipoise-cp1252", _cp1252_fallback)


def repair_text(text: str) -> str:
    """Undo Windows-1252/UTF-8 mojibake; clean text (including real accents such as "Café") is unchanged."""
    for _ in range(3):  # text encoded twice over needs more than one pass
        repaired = _DOUBLE_ENCODED.sub(_redecode, text)
        if repaired == text:
            break
        text = repaired
    return _C1_CONTROLS.sub(lambda m: _CP1252_HIGH[ord(m.group())] or m.group(), text)


def _redecode(match: re.Match[str]) -> str:
    raw = bytes(_CHAR_TO_BYTE.get(c, ord(c)) for c in match.group())
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return match.group()


@dataclass(frozen=True, slots=True)
class Utterance:
    """One MELD utterance; `turn` is MELD's Utterance_ID (dialogues can have gaps where MELD dropped a clip)."""

    split: str
    dialogue_id: int
    turn: int
    speaker: str
    text: str
    emotion: str
    sentiment: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class Dialogue:
    split: str
    dialogue_id: int
    utterances: tuple[Utterance, ...]  # in turn order


def read_utterances(data_dir: Path, split: str) -> list[Utterance]:
    """All utterances of one split, in file order, with repaired text and validated labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown MELD split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(data_dir) / "meld" / f"{split}_sent_emo.csv"
    with path.open(encoding="utf-8", errors="equipoise-cp1252", newline="") as file:
        return [_utterance(split, row, number) for number, row in enumerate(csv.DictReader(file), start=1)]


def texts(data_dir: Path, splits: Sequence[str] = SPLITS) -> list[str]:
    """The non-blank utterance texts of `splits`, in split and file order: the workload of the serving benchmarks."""
    return [u.text for split in splits for u in read_utterances(data_dir, split) if u.text.strip()]


def group_dialogues(utterances: Iterable[Utterance]) -> list[Dialogue]:
    """Group utterances into dialogues ordered by (split, dialogue id), each ordered by turn."""
    ordered = sorted(utterances, key=lambda u: (u.split, u.dialogue_id, u.turn))
    return [
        Dialogue(split=split, dialogue_id=dialogue_id, utterances=tuple(group))
        for (split, dialogue_id), group in groupby(ordered, key=_dialogue_key)
    ]


def _dialogue_key(utterance: Utterance) -> tuple[str, int]:
    return utterance.split, utterance.dialogue_id


def _utterance(split: str, row: dict[str, str], number: int) -> Utterance:
    try:
        return Utterance(
            split=split,
            dialogue_id=int(row["Dialogue_ID"]),
            turn=int(row["Utterance_ID"]),
            speaker=repair_text(row["Speaker"]).strip(),
            text=repair_text(row["Utterance"]),
            emotion=_label(row["Emotion"], EMOTIONS),
            sentiment=_label(row["Sentiment"], SENTIMENTS),
            start_s=_seconds(row["StartTime"]),
            end_s=_seconds(row["EndTime"]),
        )
    except (KeyError, ValueError) as error:
        raise ValueError(f"MELD {split} row {number}: {error}") from error


def _label(value: str, names: tuple[str, ...]) -> str:
    name = value.strip().lower()
    if name not in names:
        raise ValueError(f"unknown label {value!r}; expected one of {', '.join(names)}")
    return name


_TIMESTAMP = re.compile(r"(\d+):(\d{2}):(\d{2})[,.](\d{1,3})")


def _seconds(timestamp: str) -> float:
    """'0:12:32,632' or '00:12:32,632' (SRT style) to seconds."""
    match = _TIMESTAMP.fullmatch(timestamp.strip())
    if match is None:
        raise ValueError(f"bad timestamp {timestamp!r}")
    hours, minutes, seconds, millis = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis.ljust(3, "0")) / 1000
