"""Ground-truth labels sent back for earlier predictions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from api.deps import PredictKey, ServiceState, SessionDep, StateDep, require_json
from api.errors import Problem, invalid, problem_responses, unavailable
from api.schemas import FeedbackRequest, FeedbackResponse
from core.audit import selected_for_audit
from core.db import crud
from core.db.models import FeedbackKind, ModelVersion, Prediction

router = APIRouter(prefix="/v1", tags=["feedback"])

# Feedback can arrive before the logging thread has written its prediction: wait this long for it.
PENDING_WAIT_S = 2.0


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses=problem_responses(401, 403, 404, 415, 422, 503),
    dependencies=[Depends(require_json)],
)
def post_feedback(body: FeedbackRequest, session: SessionDep, state: StateDep, _key: PredictKey) -> FeedbackResponse:
    """Attach the true emotion (one of the predicting model's labels) to a prediction; `kind: audit` only for a
    prediction that was offered for audit."""
    prediction = _stored_prediction(session, state, body.prediction_id)
    _check_labels(session, state, prediction, body)
    _check_kind(state, prediction, body)
    feedback = crud.add_feedback(session, prediction, body.label, body.sentiment, body.source, body.kind)
    session.commit()
    return FeedbackResponse(
        id=feedback.id,
        prediction_id=prediction.id,
        label=feedback.label,
        sentiment=feedback.sentiment,
        kind=feedback.kind,
        predicted=prediction.label,
        model_version=prediction.model_version,
        created_at=feedback.created_at,
    )


def _stored_prediction(session: Session, state: ServiceState, prediction_id: uuid.UUID) -> Prediction:
    logger = state.logger
    # asked before the lookup: the logging thread may write the row and forget the id between the two
    was_pending = logger.is_pending(prediction_id)
    prediction = crud.get_prediction(session, prediction_id)
    if prediction is None and (was_pending or logger.spooled_rows):
        logger.flush(PENDING_WAIT_S)
        session.rollback()  # a fresh snapshot, to see the rows just written
        prediction = crud.get_prediction(session, prediction_id)
        if prediction is None and (logger.is_pending(prediction_id) or logger.spooled_rows):
            raise unavailable("Predictions are still being written to the database; retry shortly.")
    if prediction is None:
        raise Problem(404, f"No prediction with id {prediction_id}.", kind="not-found")
    return prediction


def _check_labels(session: Session, state: ServiceState, prediction: Prediction, body: FeedbackRequest) -> None:
    version = session.get(ModelVersion, prediction.model_version)
    emotions = list(version.labels) if version else []
    if body.label not in emotions:
        raise invalid(
            "label", f"{body.label!r} is not a label of model {prediction.model_version}", ", ".join(emotions)
        )
    model = state.holder.current
    sentiments = list(model.runtime.sentiments.names) if model else []
    if body.sentiment is not None and sentiments and body.sentiment not in sentiments:
        raise invalid("sentiment", f"{body.sentiment!r} is not a sentiment label", ", ".join(sentiments))


def _check_kind(state: ServiceState, prediction: Prediction, body: FeedbackRequest) -> None:
    share = state.settings.audit_share
    if body.kind == FeedbackKind.AUDIT and not selected_for_audit(prediction.id, share):
        raise invalid(
            "kind",
            f"prediction {prediction.id} was not offered for audit (audit share {share:g}); "
            "send its label as a correction",
            share,
        )
