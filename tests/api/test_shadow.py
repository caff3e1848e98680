"""Shadow scoring through the service: the configured share of requests (chosen by the keyed hash of their first
prediction id) is scored again by the challenger in the background and logged, one row per turn linked to its live
prediction, never answered, not served traffic and not open to feedback; the live answers are those of a service
without shadowing, and a challenger that fails, cannot load or falls behind changes nothing for live traffic."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from core.audit import selected_for_shadow
from core.db.models import ModelStatus, ShadowPrediction
from core.db.session import session_scope
from model.runtime import TurnPrediction, UtteranceInput
from tests.api.conftest import (
    FakeRuntime,
    InProcess,
    add_version,
    count_rows,
    in_process_app,
    settings_for,
    wait_for,
)

CHALLENGER = "fake-2"
TEXTS = ["I can't believe this!", "Okay, fine.", "That is wonderful news.", "I'm scared of what comes next."]


@dataclass
class Rotated(FakeRuntime):
    """The fake model with its emotion probabilities moved one class on: it never agrees with the champion."""

    def _turn(self, turn: UtteranceInput, index: int, causal: bool) -> TurnPrediction:
        served = super()._turn(turn, index, causal)
        probabilities = np.roll(served.emotion_probs, 1)
        best = int(probabilities.argmax())
        return replace(served, emotion=self.emotions.name(best), emotion_index=best, emotion_probs=probabilities)


@dataclass
class Breaking(FakeRuntime):
    """Passes the load probe (its first two calls), then fails every call."""

    def classify(self, dialogues: Any, causal: bool, history: Sequence[Any] | None = None) -> Any:
        if len(self.calls) >= 2:
            raise RuntimeError("the challenger broke")
        return super().classify(dialogues, causal, history)


def challenger_runtime(kind: type[FakeRuntime], **fields: Any) -> Callable[[Any], FakeRuntime]:
    """Serve `CHALLENGER` (and any other version but the champion) with `kind`."""

    def runtime(row: Any) -> FakeRuntime:
        return FakeRuntime(version=row.version) if row.version == "fake-1" else kind(version=row.version, **fields)

    return runtime


def unloadable(row: Any) -> FakeRuntime:
    if row.version != "fake-1":
        raise RuntimeError(f"no runtime for {row.version}")
    return FakeRuntime(version=row.version)


@contextlib.contextmanager
def app_with(root: Path, runtime: Callable[[Any], FakeRuntime] | None, **settings: Any) -> Iterator[InProcess]:
    """An in-process app whose database also holds the candidate `CHALLENGER`."""
    with in_process_app(settings_for(root, **settings), runtime) as app:
        add_version(app.engine, CHALLENGER, ModelStatus.CANDIDATE)
        yield app


def send(app: InProcess, requests: int = 12) -> list[list[dict[str, Any]]]:
    """Utterances and 3-turn dialogues (causal and bidirectional), alternately; each request's answered turns."""
    answers = []
    for i in range(requests):
        if i % 2:
            turns = [{"text": TEXTS[(i + t) % 4], "speaker": ("agent", "customer")[t % 2]} for t in range(3)]
            body = {"turns": turns, "conversation_id": f"call-{i}", "context": ("causal", "bidirectional")[i % 4 // 2]}
            response = app.client.post("/v1/predict/dialogue", json=body)
        else:
            response = app.client.post("/v1/predict/utterance", json={"text": TEXTS[i % 4]})
        assert response.status_code == 200, response.text
        answer = response.json()
        answers.append(answer.get("turns", [answer]))
    return answers


def served(answers: list[list[dict[str, Any]]]) -> list[tuple[Any, ...]]:
    """What a caller sees of each turn, but for the ids and timings that differ from run to run."""
    keys = ("emotion", "probabilities", "sentiment", "sentiment_probabilities", "model_version", "turn_index")
    return [tuple(turn.get(key) for key in keys) for turns in answers for turn in turns]


def shadow_rows(app: InProcess) -> list[ShadowPrediction]:
    with session_scope(app.engine) as session:
        return list(session.scalars(select(ShadowPrediction)))


def sample(app: InProcess, name: str, **labels: str) -> float:
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def turns_of(answers: list[list[dict[str, Any]]]) -> int:
    return sum(len(turns) for turns in answers)


def without_shadow(tmp_path: Path) -> list[tuple[Any, ...]]:
    with app_with(tmp_path / "plain", None) as app:
        return served(send(app))


def test_every_turn_of_a_shadowed_request_is_logged_once_linked_to_its_live_prediction(tmp_path: Path) -> None:
    with app_with(tmp_path / "shadow", challenger_runtime(Rotated), shadow_share=1.0) as app:
        answers = send(app)
        live = {uuid.UUID(turn["prediction_id"]): turn for turns in answers for turn in turns}
        wait_for(lambda: count_rows(app.engine, "shadow_predictions") == len(live))
        rows = shadow_rows(app)
        assert count_rows(app.engine, "predictions") == len(live)  # the challenger's turns are not served traffic
        assert {row.live_prediction_id for row in rows} == set(live)
        for row in rows:
            answer = live[row.live_prediction_id]
            assert row.model_version == CHALLENGER and row.id not in live and row.latency_ms > 0
            assert row.probabilities == pytest.approx(list(np.roll(list(answer["probabilities"].values()), 1)))
            assert row.label != answer["emotion"] and row.confidence == max(row.probabilities)
        assert sample(app, "equipoise_shadow_predictions_total", outcome="scored") == len(live)
        assert sample(app, "equipoise_shadow_agreement_ratio", challenger=CHALLENGER) == 0.0
        assert sample(app, "equipoise_predictions_total", emotion=rows[0].label, model_version=CHALLENGER) == 0
        # A shadow prediction is nobody's answer: it cannot be labelled.
        feedback = app.client.post("/v1/feedback", json={"prediction_id": str(rows[0].id), "label": "joy"})
        assert feedback.status_code == 404
        with_shadow = served(answers)
    assert with_shadow == without_shadow(tmp_path)


def test_the_configured_share_of_requests_is_shadowed_by_the_keyed_hash(tmp_path: Path) -> None:
    share = 0.5
    with app_with(tmp_path / "half", challenger_runtime(Rotated), shadow_share=share) as app:
        answers = send(app, 40)
        chosen = [turns for turns in answers if selected_for_shadow(uuid.UUID(turns[0]["prediction_id"]), share)]
        assert 0 < len(chosen) < len(answers)
        wait_for(lambda: count_rows(app.engine, "shadow_predictions") == turns_of(chosen))
        time.sleep(0.3)  # the logger's interval: nothing else arrives
        shadowed = {row.live_prediction_id for row in shadow_rows(app)}
        assert shadowed == {uuid.UUID(turn["prediction_id"]) for turns in chosen for turn in turns}


@pytest.mark.parametrize(("named", "expected"), [(None, "fake-3"), (CHALLENGER, CHALLENGER)])
def test_the_challenger_is_the_newest_candidate_unless_one_is_named(
    tmp_path: Path, named: str | None, expected: str
) -> None:
    with app_with(tmp_path, challenger_runtime(Rotated), shadow_share=1.0, shadow_challenger=named) as app:
        add_version(app.engine, "fake-3", ModelStatus.CANDIDATE)  # registered after fake-2
        answers = send(app, 2)
        wait_for(lambda: count_rows(app.engine, "shadow_predictions") == turns_of(answers))
        assert {row.model_version for row in shadow_rows(app)} == {expected}


def test_live_stream_turns_are_not_shadowed(tmp_path: Path) -> None:
    with app_with(tmp_path, challenger_runtime(Rotated), shadow_share=1.0) as app:
        with app.client.websocket_connect("/v1/stream") as stream:
            stream.send_json({"type": "open", "conversation_id": "live-call"})
            assert stream.receive_json()["type"] == "opened"
            for text in TEXTS:
                stream.send_json({"type": "turn", "text": text, "speaker": "agent"})  # no escalations
                assert stream.receive_json()["type"] == "prediction"
            stream.send_json({"type": "close"})
            assert stream.receive_json()["type"] == "closed"
        answers = send(app, 1)  # a request after them is shadowed: they were not left in the queue
        wait_for(lambda: count_rows(app.engine, "shadow_predictions") == 1)
        wait_for(lambda: count_rows(app.engine, "predictions") == len(TEXTS) + 1)
        assert [row.live_prediction_id for row in shadow_rows(app)] == [uuid.UUID(answers[0][0]["prediction_id"])]


def test_without_a_candidate_nothing_is_shadowed(tmp_path: Path) -> None:
    with in_process_app(settings_for(tmp_path, shadow_share=1.0)) as app:
        answers = send(app, 4)
        wait_for(lambda: sample(app, "equipoise_shadow_predictions_total", outcome="skipped") == turns_of(answers))
        assert count_rows(app.engine, "shadow_predictions") == 0


@pytest.mark.parametrize("runtime", [challenger_runtime(Breaking), unloadable], ids=["fails-to-score", "cannot-load"])
def test_a_failing_challenger_changes_nothing_for_live_traffic(
    tmp_path: Path, runtime: Callable[[Any], FakeRuntime]
) -> None:
    with app_with(tmp_path / "failing", runtime, shadow_share=1.0) as app:
        answers = send(app)
        wait_for(lambda: sample(app, "equipoise_shadow_predictions_total", outcome="failed") == turns_of(answers))
        wait_for(lambda: count_rows(app.engine, "predictions") == turns_of(answers))
        assert count_rows(app.engine, "shadow_predictions") == 0
        assert app.client.get("/readyz").status_code == 200
        with_failures = served(answers)
    assert with_failures == without_shadow(tmp_path)


def test_a_slow_challenger_never_delays_live_answers_and_its_backlog_is_dropped(tmp_path: Path) -> None:
    delay_s = 1.5
    runtime = challenger_runtime(FakeRuntime, delay_s=delay_s)
    with app_with(tmp_path / "slow", runtime, shadow_share=1.0, shadow_queue_limit=1) as app:
        started = time.perf_counter()
        answers = send(app, 6)
        assert time.perf_counter() - started < delay_s  # the challenger has not even loaded yet
        turns = turns_of(answers)

        def settled() -> bool:
            done = sum(sample(app, "equipoise_shadow_predictions_total", outcome=o) for o in ("scored", "dropped"))
            return done == turns

        wait_for(settled, timeout_s=15)
        dropped = sample(app, "equipoise_shadow_predictions_total", outcome="dropped")
        assert dropped > 0
        # a request counts as scored when its rows are handed to the prediction log, which writes them soon after
        wait_for(lambda: count_rows(app.engine, "shadow_predictions") == turns - dropped, timeout_s=15)
        assert sample(app, "equipoise_shadow_agreement_ratio", challenger=CHALLENGER) == 1.0  # the same model
