"""Earlier turns in the text encoder's input: whole turns, newest kept first, within the token budget."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from model.context_input import context_inputs
from model.text_encoder import load_tokenizer

TEXTS = ["Hi there.", "Oh no, not again!", "What happened?", "I lost my keys again and the landlord is away."]
SPEAKERS = np.array([0, 1, 0, 1])


def pair_length(tokenizer: Tokenizer, item: str | tuple[str, str]) -> int:
    return len(tokenizer.encode(*item).ids) if isinstance(item, tuple) else len(tokenizer.encode(item).ids)


def test_each_turn_gets_its_earlier_turns_oldest_first_with_speakers_by_order() -> None:
    tokenizer = load_tokenizer()
    inputs = context_inputs(TEXTS, SPEAKERS, np.array([0, 4]), tokenizer, tokens=128, turns=8)
    assert inputs[0] == "Hi there."  # nothing earlier: the turn alone, untagged
    assert inputs[2] == ("speaker 1: Hi there. [SEP] speaker 2: Oh no, not again!", "speaker 1: What happened?")
    assert inputs[3][0].startswith("speaker 1: Hi there.") and inputs[3][1].startswith("speaker 2: I lost")


def test_the_budget_drops_whole_oldest_turns_and_never_truncates() -> None:
    tokenizer = load_tokenizer()
    full = context_inputs(TEXTS, SPEAKERS, np.array([0, 4]), tokenizer, tokens=128, turns=8)
    budget = pair_length(tokenizer, full[3]) - 1  # one token short of all three earlier turns
    cut = context_inputs(TEXTS, SPEAKERS, np.array([0, 4]), tokenizer, tokens=budget, turns=8)
    assert cut[3][0] == "speaker 2: Oh no, not again! [SEP] speaker 1: What happened?"
    assert all(pair_length(tokenizer, item) <= budget for item in cut)
    assert context_inputs(TEXTS, SPEAKERS, np.array([0, 4]), tokenizer, tokens=128, turns=1)[3][0] == (
        "speaker 1: What happened?"
    )
    tiny = context_inputs(TEXTS, SPEAKERS, np.array([0, 4]), tokenizer, tokens=16, turns=8)
    assert tiny[3] == TEXTS[3]  # too long for any earlier turn: alone


def test_dialogues_do_not_see_each_other() -> None:
    inputs = context_inputs(TEXTS, np.array([0, 1, 0, 0]), np.array([0, 2, 4]), load_tokenizer(), 128, 8)
    assert inputs[2] == TEXTS[2] and inputs[3] == ("speaker 1: What happened?", "speaker 1: " + TEXTS[3])
