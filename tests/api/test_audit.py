"""Audit sampling through the service (fake model): answers carry `audit` at the configured share, feedback says
its kind, an audit label for a prediction that was not offered is refused naming `kind`, and /metrics counts both."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from core.audit import selected_for_audit
from core.db.models import Feedback, FeedbackKind
from core.db.session import session_scope
from tests.api.conftest import InProcess
from tests.api.test_bad_input import assert_problem

TURNS = 200  # the default dialogue limit


def _turns(app: InProcess, dialogues: int) -> list[dict[str, Any]]:
    answers = []
    for d in range(dialogues):
        body = {"turns": [{"text": f"call {d} turn {t}", "speaker": "customer"} for t in range(TURNS)]}
        response = app.client.post("/v1/predict/dialogue", json=body)
        assert response.status_code == 200, response.text
        answers += response.json()["turns"]
    return answers


def test_answers_are_flagged_at_the_configured_share(start_app: Callable[..., InProcess]) -> None:
    share = 0.25
    app = start_app(audit_share=share, log_predictions=False)
    turns = _turns(app, 4)
    flagged = [turn["audit"] for turn in turns]
    assert flagged == [selected_for_audit(uuid.UUID(turn["prediction_id"]), share) for turn in turns]
    sigma = math.sqrt(len(turns) * share * (1 - share))
    assert abs(sum(flagged) - len(turns) * share) <= 4 * sigma, sum(flagged)
    utterance = app.client.post("/v1/predict/utterance", json={"text": "hello"}).json()
    assert utterance["audit"] == selected_for_audit(uuid.UUID(utterance["prediction_id"]), share)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_share_zero_offers_nothing_and_one_offers_everything(start_app: Callable[..., InProcess], share: float) -> None:
    turns = _turns(start_app(audit_share=share, log_predictions=False), 1)
    assert {turn["audit"] for turn in turns} == {bool(share)}


def _feedback(app: InProcess, prediction: dict[str, Any], **fields: Any) -> Any:
    return app.client.post(
        "/v1/feedback", json={"prediction_id": prediction["prediction_id"], "label": "fear"} | fields
    )


def test_feedback_kinds_are_validated_stored_and_counted(start_app: Callable[..., InProcess]) -> None:
    app = start_app(audit_share=0.5)
    turns = _turns(app, 1)
    offered = [turn for turn in turns if turn["audit"]]
    not_offered = [turn for turn in turns if not turn["audit"]]

    audit = _feedback(app, offered[0], kind="audit", source="labelling-team")
    assert audit.status_code == 201, audit.text
    assert audit.json()["kind"] == "audit"
    assert _feedback(app, offered[1]).json()["kind"] == "correction"  # the client did not say it came from an audit
    assert _feedback(app, not_offered[0], kind="correction").json()["kind"] == "correction"
    refused = assert_problem(_feedback(app, not_offered[1], kind="audit"), 422, "kind", 0.5)
    assert "not offered for audit" in refused["detail"]
    assert_problem(_feedback(app, offered[2], kind="survey"), 422, "kind")

    with session_scope(app.engine) as session:
        stored = {(str(row.prediction_id), row.kind, row.source) for row in session.scalars(select(Feedback))}
    assert stored == {
        (offered[0]["prediction_id"], FeedbackKind.AUDIT, "labelling-team"),
        (offered[1]["prediction_id"], FeedbackKind.CORRECTION, None),
        (not_offered[0]["prediction_id"], FeedbackKind.CORRECTION, None),
    }
    families = {family.name: family for family in text_string_to_metric_families(app.client.get("/metrics").text)}
    counts = {s.labels["kind"]: s.value for s in families["equipoise_labelled_predictions"].samples}
    assert counts == {"audit": 1, "correction": 2}
    assert {s.labels["model_version"] for s in families["equipoise_labelled_predictions"].samples} == {"fake-1"}


def test_an_audit_label_is_checked_against_the_share_in_force(start_app: Callable[..., InProcess]) -> None:
    """Lowering the share withdraws the offers above it: the same prediction's audit label is then refused."""
    app = start_app(audit_share=0.5)
    offered = next(turn for turn in _turns(app, 1) if turn["audit"])
    app.state.settings.audit_share = 0.0
    assert_problem(_feedback(app, offered, kind="audit"), 422, "kind", 0.0)
    app.state.settings.audit_share = 1.0
    assert _feedback(app, offered, kind="audit").status_code == 201
