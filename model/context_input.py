"""Earlier turns of a dialogue in the text encoder's input (a recipe's `[context_input]`), EmoBERTa style.

A turn with earlier turns becomes the pair (context, current): the earlier turns oldest first, each as
"speaker k: text" and separated by [SEP], then the turn itself as "speaker k: text". Speakers are numbered by
order of appearance in the dialogue, as the dialogue-context head numbers them, so no corpus's character names are
learnt. Whole turns are kept, newest first, while the pair fits the token budget, so the tokenizer never cuts
one; a turn without earlier turns, or too long for any, is encoded alone. The encoder pools the current turn's
tokens only (the pair's second segment).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

EncoderInput = str | tuple[str, str]  # a turn alone, or (earlier turns, the turn)
SEPARATOR = " [SEP] "
PAIR_SPECIAL_TOKENS = 3  # [CLS] context [SEP] current [SEP]


def speaker_tag(speaker: int) -> str:
    return f"speaker {speaker + 1}"


def context_inputs(
    texts: Sequence[str], speakers: np.ndarray, starts: np.ndarray, tokenizer: Tokenizer, tokens: int, turns: int
) -> list[EncoderInput]:
    """The encoder input of every turn of dialogues laid out as `starts` (dialogue d is turns starts[d]:starts[d+1])."""
    tagged = [f"{speaker_tag(int(s))}: {t}" for s, t in zip(speakers, texts, strict=True)]
    lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(tagged, add_special_tokens=False)]  # unpadded
    inputs: list[EncoderInput] = []
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        for turn in range(int(start), int(end)):
            kept = _earlier_turns(lengths, int(start), turn, tokens, turns)
            inputs.append((SEPARATOR.join(tagged[j] for j in kept), tagged[turn]) if kept else texts[turn])
    return inputs


def _earlier_turns(lengths: Sequence[int], start: int, turn: int, budget: int, most: int) -> list[int]:
    """The newest earlier turns of `turn` (oldest first) whose tokens, with separators, fit the budget."""
    used = PAIR_SPECIAL_TOKENS + lengths[turn]
    kept: list[int] = []
    for j in range(turn - 1, max(start, turn - most) - 1, -1):
        used += lengths[j] + (1 if kept else 0)  # a [SEP] between two earlier turns
        if used > budget:
            break
        kept.append(j)
    return kept[::-1]
