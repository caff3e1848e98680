from __future__ import annotations

from pathlib import Path

import pytest

from model.data.meld import SPLITS, Utterance, group_dialogues, read_utterances, repair_text, texts
from model.labels import EMOTIONS, SENTIMENTS

COUNTS = {"train": (9989, 1038), "dev": (1109, 114), "test": (2610, 280)}
# train Sr No. 1, Dialogue 0, turn 0
KNOWN = "also I was the point person on my company’s transition from the KL-5 to GR-6 system."


def _utf8_as_latin1(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def _utf8_as_cp1252(text: str) -> str:
    # Bytes Windows-1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) pass through as C1 controls.
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in text.encode("utf-8"))


def _cp1252_as_latin1(text: str) -> str:
    return text.encode("cp1252").decode("latin-1")


MOJIBAKE = [_utf8_as_latin1, _utf8_as_cp1252, _cp1252_as_latin1]


@pytest.fixture(scope="module")
def utterances(data_dir: Path) -> dict[str, list[Utterance]]:
    return {split: read_utterances(data_dir, split) for split in SPLITS}


@pytest.mark.parametrize(
    ("damaged", "repaired"),
    [
        ("it\x92s", "it’s"),
        ("itâ\x80\x99s", "it’s"),
        ("itâ€™s", "it’s"),
        ("wait â\x80\x94 what", "wait — what"),
        ("â€œokâ€\x9d", "“ok”"),
        ("so\x85", "so…"),
        ("Ã¢â‚¬â„¢", "’"),  # encoded twice over
        ("Paul’s Café. Olé! Adiós. pâté", "Paul’s Café. Olé! Adiós. pâté"),  # clean text is left alone
        ("the café…”", "the café…”"),
    ],
)
def test_repair_text_patterns(damaged: str, repaired: str) -> None:
    assert repair_text(damaged) == repaired


def test_cp1252_bytes_in_a_utf8_file_are_read(tmp_path: Path) -> None:
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\r\n"
    row = '1,"You\x92re \xe2\x80\x94 fine",Joey,Joy,Positive,0,0,1,1,"0:00:01,5","00:00:02,250"\r\n'
    (tmp_path / "meld").mkdir()
    (tmp_path / "meld" / "test_sent_emo.csv").write_bytes(header.encode() + row.encode("latin-1"))
    [utterance] = read_utterances(tmp_path, "test")
    assert utterance.text == "You’re — fine"
    assert (utterance.emotion, utterance.sentiment, utterance.start_s, utterance.end_s) == (
        "joy",
        "positive",
        1.5,
        2.25,
    )


@pytest.mark.data
def test_counts_match_the_readme(utterances: dict[str, list[Utterance]]) -> None:
    for split, (n_utterances, n_dialogues) in COUNTS.items():
        assert len(utterances[split]) == n_utterances
        assert len(group_dialogues(utterances[split])) == n_dialogues


@pytest.mark.data
def test_no_mojibake_remains_and_labels_are_known(utterances: dict[str, list[Utterance]]) -> None:
    for rows in utterances.values():
        for u in rows:
            assert not any(bad in u.text or bad in u.speaker for bad in ("\x92", "â\x80", "â€", "Ã"))
            assert not any("\x80" <= char <= "\x9f" for char in u.text)
            assert u.emotion in EMOTIONS and u.sentiment in SENTIMENTS
            assert 0 <= u.start_s <= u.end_s


@pytest.mark.data
def test_known_utterance_keeps_its_apostrophe(utterances: dict[str, list[Utterance]]) -> None:
    first = utterances["train"][0]
    assert (first.dialogue_id, first.turn, first.speaker, first.text) == (0, 0, "Chandler", KNOWN)
    assert (first.start_s, first.end_s) == (16 * 60 + 16.059, 16 * 60 + 21.731)
    for damage in MOJIBAKE:
        assert repair_text(damage(first.text)) == KNOWN


@pytest.mark.data
def test_repair_undoes_every_kind_of_damage_on_every_real_utterance(
    utterances: dict[str, list[Utterance]],
) -> None:
    texts = {u.text for rows in utterances.values() for u in rows}
    assert sum(not t.isascii() for t in texts) > 3500  # typographic quotes, dashes, ellipses, accents
    for damage in MOJIBAKE:
        assert [t for t in texts if repair_text(damage(t)) != t] == []


@pytest.mark.data
def test_dialogues_are_ordered_by_turn(utterances: dict[str, list[Utterance]]) -> None:
    dialogues = group_dialogues(reversed(utterances["test"]))
    assert [d.dialogue_id for d in dialogues] == sorted({u.dialogue_id for u in utterances["test"]})
    for dialogue in dialogues:
        turns = [u.turn for u in dialogue.utterances]
        assert turns == sorted(set(turns))
        assert {u.dialogue_id for u in dialogue.utterances} == {dialogue.dialogue_id}
    assert sum(len(d.utterances) for d in dialogues) == len(utterances["test"])


def test_unknown_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown MELD split"):
        read_utterances(tmp_path, "validation")


def test_texts_are_the_non_blank_utterances_of_the_splits_in_order(tmp_path: Path) -> None:
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (tmp_path / "meld").mkdir()
    for split, lines in {"dev": ["Hi.", "  "], "test": ["Bye."]}.items():
        rows = "".join(
            f'{n},"{text}",Joey,neutral,neutral,0,{n},1,1,"0:00:01,0","0:00:02,0"\n' for n, text in enumerate(lines)
        )
        (tmp_path / "meld" / f"{split}_sent_emo.csv").write_text(header + rows, encoding="utf-8")
    assert texts(tmp_path, ("dev", "test")) == ["Hi.", "Bye."]
    assert texts(tmp_path, ("test", "dev")) == ["Bye.", "Hi."]
