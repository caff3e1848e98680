"""Production traffic for the demo: real MELD test conversations sent to the service, every turn's gold label
sent back through /v1/feedback, as an agent's after-call labelling would."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from core.redaction import text_sha256
from equipoise.demo.services import post_json
from model.data.meld import Dialogue, group_dialogues, read_utterances
from retraining.dataset import conversation_key, is_heldout


@dataclass(frozen=True)
class Turn:
    """One turn as the service answered it, with its gold label."""

    phase: str
    conversation: str
    turn_index: int
    speaker: str
    text: str
    label: str
    sentiment: str
    causal: bool
    predicted: str
    version: str

    @property
    def heldout(self) -> bool:
        """In the retraining gate's held-out split (the same stable hash of the conversation): never trained on."""
        return is_heldout(conversation_key(self.conversation, text_sha256(self.text)))


def meld_conversations(data_dir: Path, seed: int, limit: int | None = None) -> list[Dialogue]:
    """MELD test dialogues in a seeded random order: unseen by the shipped default's training."""
    dialogues = group_dialogues(read_utterances(data_dir, "test"))
    random.Random(seed).shuffle(dialogues)
    return dialogues[:limit]


@dataclass
class Stream:
    """The conversations still to send, and every turn sent so far (in order)."""

    pending: deque[Dialogue]
    sent: list[Turn]
    conversations: int = 0  # sent so far; production uses both context modes, alternately here

    @classmethod
    def of(cls, dialogues: list[Dialogue]) -> Stream:
        return cls(deque(dialogues), [])

    def send(self, client: httpx.Client, phase: str, turns: int, description: str) -> list[Turn]:
        """Whole conversations until at least `turns` turns were answered (fewer when the stream runs dry)."""
        batch: list[Turn] = []
        with tqdm(total=turns, desc=description, unit="turn", leave=False) as bar:
            while self.pending and len(batch) < turns:
                answered = self._converse(client, phase, self.pending.popleft())
                batch += answered
                bar.update(len(answered))
        self.sent += batch
        return batch

    def _converse(self, client: httpx.Client, phase: str, dialogue: Dialogue) -> list[Turn]:
        causal, self.conversations = self.conversations % 2 == 0, self.conversations + 1
        conversation = f"meld-test-{dialogue.dialogue_id}"
        body = {
            "turns": [{"text": u.text, "speaker": u.speaker} for u in dialogue.utterances],
            "context": "causal" if causal else "bidirectional",
            "conversation_id": conversation,
        }
        answer = post_json(client, "/v1/predict/dialogue", body, f"predicting {conversation}")
        turns = []
        for index, (utterance, turn) in enumerate(zip(dialogue.utterances, answer["turns"], strict=True)):
            feedback = {
                "prediction_id": turn["prediction_id"],
                "label": utterance.emotion,
                "sentiment": utterance.sentiment,
                "source": "demo-gold",
            }
            post_json(client, "/v1/feedback", feedback, f"feedback on {conversation}")
            turns.append(
                Turn(
                    phase,
                    conversation,
                    index,
                    utterance.speaker,
                    utterance.text,
                    utterance.emotion,
                    utterance.sentiment,
                    causal,
                    turn["emotion"],
                    answer["model_version"],
                )
            )
        return turns
