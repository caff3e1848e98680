"""The service's dialogue endpoint and batch scoring give the same predictions for the same MELD conversations
and context mode (the Ray engine is held to the local engine in test_engines.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from model.data.turns import Turn, write_turns
from scoring.local import LocalEngine
from scoring.pipeline import run_scoring
from tests.api.conftest import running_server
from tests.scoring.helpers import config, read_rows


@pytest.mark.parametrize("context", ["bidirectional", "causal"])
def test_the_dialogue_endpoint_equals_batch_scoring(
    tmp_path: Path, tiny_artifact: Path, meld_turns: list[Turn], local_engine: LocalEngine, context: str
) -> None:
    source = tmp_path / "turns.jsonl"
    write_turns(meld_turns, source)
    run_scoring(config(tmp_path, source, causal=context == "causal"), local_engine)
    batch = {(r["conversation_id"], r["turn"]): r for r in read_rows(tmp_path / "out.jsonl")}

    conversations: dict[str, list[Turn]] = defaultdict(list)
    for turn in meld_turns:
        conversations[turn.conversation_id].append(turn)
    url = f"sqlite:///{tmp_path / 'equipoise.db'}"
    with running_server(tmp_path / "state", url, default_model_dir=str(tiny_artifact)) as server:
        for conversation_id, turns in conversations.items():
            body = {
                "conversation_id": conversation_id,
                "context": context,
                "turns": [{"text": t.text, "speaker": t.speaker} for t in sorted(turns, key=lambda t: t.turn)],
            }
            response = httpx.post(server.url + "/v1/predict/dialogue", json=body, timeout=30)
            assert response.status_code == 200, response.text
            for turn, served in zip(sorted(turns, key=lambda t: t.turn), response.json()["turns"], strict=True):
                row = batch[(conversation_id, turn.turn)]
                assert served["emotion"] == row["label"] and served["sentiment"] == row["sentiment"]
                for label, probability in served["probabilities"].items():
                    assert probability == pytest.approx(row[f"p_{label}"], abs=1e-5)
