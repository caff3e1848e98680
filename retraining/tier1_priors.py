"""Tier 1: prior correction without training, for traffic whose class mix moved (label shift).

The class prior of the base version's recent traffic is estimated as the monitor does (monitoring/prior.py): MLLS
(Saerens et al. 2002) on the base artifact's BCTS posteriors (Alexandari et al. 2020) against the training prior
its calibration record states, with 95% intervals from the bootstrap over the recent conversations. The
correction is applied only when it is warranted:

- the shift is significant: for at least one class the simultaneous 95% interval (Bonferroni over the classes)
  excludes the recorded training prior. Otherwise the job ends without a candidate: on unshifted traffic a
  correction could only add noise;
- label shift explains the served mix (the monitor's consistency test against the dev confusion, p >= 0.01). A
  served mix the estimated prior does not explain is the model's own behaviour changing: no prior fixes that,
  and the job ends without a candidate (feedback labels and tier 2 are the remedy).

What the correction is for. The base model's calibrated posteriors are moved from the training prior to the
estimated one, p_new(y | x) proportional to p(y | x) * r_y with r = pi_new / pi_train, and the served decision
rule keeps its relation to the prior. BCTS writes the posteriors as log p(y | x) = z_y / T + b_y + const (z: raw
logits, T: the BCTS temperature), so the served rule, argmax z, is argmax log p(y | x) - b_y: b is the penalty the
model puts on each class against its calibrated belief. Its log-prior part, b = beta * log pi_train + rest, is the
rule's prior exponent: beta = 0 for the Bayes (accuracy) rule of plain cross-entropy, 1 for the balanced rule
argmax p(y | x) / pi_y, in between for logit adjustment with tau < T (Menon et al. 2021: beta = tau / T, post-hoc
or in the loss) and for reweighting. Keeping beta under the new prior gives
- the raw-logit offset T * (1 - beta) * log r added to the emotion head's bias, and
- the BCTS biases b + beta * log r, so the candidate's posteriors are the base's times r.
beta is read off the calibration record (`prior_exponent`), so it holds for every way the model was trained. A
balanced rule (beta = 1) is invariant to pure label shift for per-class recall and gets no offset; for beta < 1
the correction serves accuracy and calibration (fewer false alarms on the classes that became rare, probabilities
that match the new mix) and trades some recall of the classes that became rare for precision, so the gate, which
requires a minority-recall gain, promotes it only when the minority classes grew.

Never the served probabilities as if they were calibrated, and never a prior guessed from outside the artifact:
an artifact without a calibration record is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from sqlalchemy import select

from core.db.models import Prediction
from core.db.session import session_scope
from core.settings import MONITOR_BOOTSTRAP_REPLICATES
from model.artifact import Calibration, ClassPrior, DataSource
from monitoring.collapse import CollapseRules
from monitoring.prior import ShiftModel, estimate_label_shift
from monitoring.windows import MONITORED
from retraining.graphs import EmotionHead, read_head, write_head
from retraining.parity import HeadReference
from retraining.queue import PermanentError
from retraining.steps import JobContext
from retraining.tiers import Draft, TierInputs, head_graphs

PRIORS_FILE, RECENT_FILE = "priors.json", "recent.npz"
PRIOR_WINDOW = 2_000  # newest predictions of the base version to estimate from (params.prior_window)
# A class EM finds nearly absent would otherwise get an offset near log(1e-6) and never be predicted again.
MAX_LOG_RATIO = 3.0


@dataclass(frozen=True)
class PriorCorrection:
    train_prior: list[float]
    new_prior: list[float]
    lower: list[float]  # 95% interval of each class's share, bootstrap over conversations
    upper: list[float]
    significant: bool
    mix_p_value: float | None
    prior_exponent: float  # beta of the base's decision rule (`prior_exponent`)
    log_ratio: list[float]  # log(new / train), clipped to +-max_log_ratio; zero unless significant
    offset: list[float]  # added to the emotion head's bias: T * (1 - beta) * log_ratio (raw-logit units, centred)
    samples: int
    conversations: int
    replicates: int


def correction(
    served: np.ndarray,
    conversations: np.ndarray,
    calibration: Calibration,
    names: tuple[str, ...],
    *,
    replicates: int = MONITOR_BOOTSTRAP_REPLICATES,
    max_log_ratio: float = MAX_LOG_RATIO,
    seed: int = 0,
) -> PriorCorrection:
    """The correction the served probabilities [N, C] of the base version (each turn's conversation beside it)
    call for, with its evidence; `offset` is zero unless the shift is significant."""
    if len(served) == 0:
        raise PermanentError("no recent predictions of the base version to estimate priors from")
    if calibration.training_prior is None or calibration.posterior is None:
        raise PermanentError(
            "the base artifact records no training prior and no bias-corrected posteriors (an older calibration "
            "format): prior correction needs them; re-release or recalibrate it"
        )
    model = ShiftModel.from_calibration(calibration)
    estimate = estimate_label_shift(served, conversations, model, names, (), replicates=replicates, seed=seed)
    new_prior = np.array([interval.estimate for interval in estimate.prior])
    log_ratio = np.clip(np.log(new_prior.clip(1e-6)) - np.log(model.source_prior), -max_log_ratio, max_log_ratio)
    if not estimate.shift_significant:
        log_ratio = np.zeros(len(names))
    beta = prior_exponent(calibration)
    offset = calibration.posterior.temperature * (1 - beta) * log_ratio
    return PriorCorrection(
        train_prior=model.source_prior.tolist(),
        new_prior=new_prior.tolist(),
        lower=[interval.lower for interval in estimate.prior],
        upper=[interval.upper for interval in estimate.prior],
        significant=estimate.shift_significant,
        mix_p_value=estimate.mix_p_value,
        prior_exponent=beta,
        log_ratio=log_ratio.tolist(),
        offset=(offset - offset.mean()).tolist(),
        samples=len(served),
        conversations=estimate.conversations,
        replicates=replicates,
    )


def prior_exponent(calibration: Calibration) -> float:
    """beta, the prior exponent of the served decision rule: the least-squares slope of the BCTS biases (expressed
    for the training prior) on the log training prior, clipped to [0, 1]; 0 when the training prior is uniform
    (there is no prior to follow)."""
    assert calibration.training_prior is not None and calibration.posterior is not None
    log_prior = np.log(np.asarray(calibration.training_prior.shares, dtype=np.float64).clip(1e-6))
    biases = np.asarray(calibration.posterior.biases, dtype=np.float64)
    centred = log_prior - log_prior.mean()
    spread = float(centred @ centred)
    if spread < 1e-12:
        return 0.0
    return float(np.clip(centred @ (biases - biases.mean()) / spread, 0.0, 1.0))


def refusal(found: PriorCorrection, names: tuple[str, ...], mix_alpha: float = CollapseRules.mix_alpha) -> str | None:
    """Why the correction must not be applied, or None when it may."""
    shares = ", ".join(
        f"{n} {old:.3f} -> {new:.3f} [{lo:.3f}, {hi:.3f}]"
        for n, old, new, lo, hi in zip(names, found.train_prior, found.new_prior, found.lower, found.upper, strict=True)
    )
    if not found.significant:
        return f"no significant label shift in {found.samples} recent predictions: {shares}"
    if found.mix_p_value is not None and found.mix_p_value < mix_alpha:
        return (
            f"the served mix is not explained by the estimated prior (p = {found.mix_p_value:.2g}): the model's "
            f"behaviour changed, which prior correction cannot fix ({shares})"
        )
    return None


def corrected_calibration(
    calibration: Calibration, found: PriorCorrection, base_version: str, version: str
) -> Calibration:
    """The candidate's calibration record: its posteriors are the base's corrected to the new prior (the BCTS
    biases move by beta * log r, the rest of r is in the served logits), so the prior they assume is the estimated
    one; its dev confusion is no longer the base's (its decision rule moved), so the dev reference is dropped and
    the monitor falls back to the rules for artifacts without one."""
    assert calibration.training_prior is not None and calibration.posterior is not None
    shift = found.prior_exponent * np.asarray(found.log_ratio)
    biases = np.asarray(calibration.posterior.biases) + shift - shift.mean()
    source = DataSource(
        f"MLLS estimate over recent traffic of {base_version} (tier 1 of {version})",
        calibration.training_prior.source.modalities,
        found.samples,
        found.conversations,
    )
    return replace(
        calibration,
        training_prior=ClassPrior(tuple(found.new_prior), source),
        posterior=replace(calibration.posterior, biases=tuple(biases.tolist())),
        dev_reference=None,
    )


def recent_predictions(
    ctx: JobContext, version: str, names: tuple[str, ...], limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Served probabilities [N, C] (in the order of `names`) and conversation ids [N] of the newest `limit`
    predictions of `version` the monitor reads (with text: monitoring/windows.py; a turn logged without a
    conversation is its own)."""
    query = (
        select(Prediction.id, Prediction.probabilities, Prediction.conversation_id)
        .where(Prediction.model_version == version, MONITORED)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    )
    with session_scope(ctx.queue.engine) as session:
        rows = session.execute(query).all()
    return (
        np.array([[p[n] for n in names] if isinstance(p, dict) else p for _, p, _ in rows], dtype=np.float64),
        np.array([c or f"turn:{i}" for i, _, c in rows]),
    )


def corrected_head(context_graph: Path, offset: list[float]) -> EmotionHead:
    head = read_head(context_graph)
    return EmotionHead(head.weight, (head.bias + np.asarray(offset, dtype=np.float32)).astype(np.float32))


def _recent(out: Path, ctx: JobContext, inputs: TierInputs) -> None:
    names = inputs.base.emotions.names
    limit = int(inputs.params.get("prior_window", PRIOR_WINDOW))
    served, conversations = recent_predictions(ctx, inputs.base.version, names, limit)
    np.savez(out / RECENT_FILE, served=served.reshape(-1, len(names)), conversations=conversations)


def _correct(out: Path, inputs: TierInputs, recent_dir: Path) -> None:
    with np.load(recent_dir / RECENT_FILE) as recent:
        served, conversations = recent["served"], recent["conversations"]
    limit = float(inputs.params.get("max_log_ratio", MAX_LOG_RATIO))
    names = inputs.base.emotions.names
    found = correction(served, conversations, inputs.base.calibration, names, max_log_ratio=limit)
    write_head(inputs.base.context_path, out / "context.onnx", corrected_head(inputs.base.context_path, found.offset))
    (out / PRIORS_FILE).write_text(json.dumps(asdict(found), indent=2), encoding="utf-8")


def build(ctx: JobContext, inputs: TierInputs) -> Draft:
    recent_dir = ctx.step("recent", lambda out: _recent(out, ctx, inputs))
    directory = ctx.step("priors", lambda out: _correct(out, inputs, recent_dir))
    found = PriorCorrection(**json.loads((directory / PRIORS_FILE).read_text(encoding="utf-8")))
    names = inputs.base.emotions.names
    reason = refusal(found, names)
    if reason is not None:
        raise PermanentError(f"tier 1: {reason}")
    ctx.log(
        "tier 1: priors "
        + ", ".join(
            f"{n} {old:.3f}->{new:.3f}" for n, old, new in zip(names, found.train_prior, found.new_prior, strict=True)
        )
        + f"; decision rule's prior exponent {found.prior_exponent:.2f}"
    )
    head = corrected_head(inputs.base.context_path, found.offset)
    return Draft(
        graphs=head_graphs(inputs.base, directory / "context.onnx"),
        reference=HeadReference(inputs.base, head),
        recipe={
            "tier": 1,
            "method": "MLLS prior correction on BCTS posteriors (Saerens 2002; Alexandari 2020), keeping the decision "
            "rule's prior exponent",
        }
        | asdict(found),
        class_prior=dict(zip(names, found.new_prior, strict=True)),
        calibration=corrected_calibration(inputs.base.calibration, found, inputs.base.version, inputs.version),
    )
