"""One window in, its monitoring findings out: class mix and its drift, the class prior estimated without labels,
measured and label-free recall, and the collapse signals.

Pure computation over arrays (no database), so the production monitor and the offline simulation share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.db.models import FeedbackKind
from core.settings import MONITOR_BOOTSTRAP_REPLICATES
from model.artifact import Calibration
from monitoring.collapse import WindowSignals
from monitoring.drift import ClassMixDrift, class_mix_drift, embedding_drift
from monitoring.estimation import (
    class_shares,
    mean_recall,
    measure_recall,
    minority_recall_halfwidth,
    minority_recall_upper,
)
from monitoring.prior import MIX_ALPHA, LabelShiftEstimate, ShiftModel, estimate_label_shift


@dataclass(frozen=True)
class ReferenceProfile:
    """What the champion looked like on its clean dev set: the yardstick for every window."""

    names: tuple[str, ...]
    class_shares: Mapping[str, float]
    minority: tuple[str, ...]
    minority_recall: float | None = None
    embeddings: np.ndarray | None = None
    calibration: Calibration = field(default_factory=Calibration)  # the champion's (model/artifact.py)

    @property
    def majority(self) -> str:
        return max(self.class_shares, key=lambda name: self.class_shares[name])

    @property
    def minority_share(self) -> float:
        return float(sum(self.class_shares[name] for name in self.minority))

    @property
    def shift_model(self) -> ShiftModel:
        return ShiftModel.from_calibration(self.calibration)

    @property
    def share_covariance(self) -> np.ndarray | None:
        reference = self.calibration.dev_reference
        return None if reference is None else np.asarray(reference.share_covariance)


@dataclass(frozen=True)
class LabelledTurns:
    """The window's labels: class index per turn (-1: none) and where they came from."""

    true: np.ndarray
    source: FeedbackKind | None = None  # AUDIT (a random sample) or CORRECTION (biased toward mistakes)

    @classmethod
    def unlabelled(cls, turns: int) -> LabelledTurns:
        return cls(np.full(turns, -1, dtype=np.int64))


@dataclass(frozen=True)
class WindowFindings:
    n_predictions: int
    n_labelled: int
    class_shares: dict[str, float]
    majority_share: float
    drift: ClassMixDrift
    embedding_drift: float | None
    measured_recall: dict[str, float | None]
    estimated_recall: dict[str, float | None]  # label-free, on prior-corrected posteriors
    minority_recall_measured: float | None
    minority_recall_halfwidth: float | None  # 95% half-width of the measured value, from the window's labels
    minority_recall_measured_upper: float | None  # upper end of its Agresti-Coull interval
    measured_source: FeedbackKind | None
    minority_recall_estimated: float | None
    label_shift: LabelShiftEstimate

    def signals(self, reference: ReferenceProfile) -> WindowSignals:
        estimate = self.label_shift.minority_recall
        return WindowSignals(
            n_predictions=self.n_predictions,
            n_labelled=self.n_labelled,
            majority_share=self.majority_share,
            reference_majority_share=reference.class_shares[reference.majority],
            drifted=self.drift.drifted,
            minority_recall_measured=self.minority_recall_measured,
            minority_recall_estimated=self.minority_recall_estimated,
            reference_minority_recall=reference.minority_recall,
            minority_recall_halfwidth=self.minority_recall_halfwidth,
            minority_recall_measured_upper=self.minority_recall_measured_upper,
            measured_source=self.measured_source,
            minority_recall_estimated_upper=None if estimate is None else estimate.upper,
            mix_p_value=self.label_shift.mix_p_value,
            prior_shifted=self.label_shift.shift_significant,
            minority_share=sum(self.class_shares[name] for name in reference.minority),
            reference_minority_share=reference.minority_share,
        )


def analyse_window(
    probabilities: np.ndarray,
    labels: LabelledTurns,
    conversations: Sequence[object] | np.ndarray,
    reference: ReferenceProfile,
    *,
    embeddings: np.ndarray | None = None,
    report_dir: Path | None = None,
    replicates: int = MONITOR_BOOTSTRAP_REPLICATES,
    seed: int = 0,
    mix_alpha: float = MIX_ALPHA,
) -> WindowFindings:
    """Findings for one window of served `probabilities` [N, C] with each turn's conversation (a turn without one
    is its own). The measured minority recall comes with its 95% half-width, so the detector can tell whether the
    labels decide it; the prior, the label-free recall and the mix consistency come with their intervals over the
    window's conversations (`replicates` resamples)."""
    names: Sequence[str] = reference.names
    predicted = probabilities.argmax(axis=1)
    true = labels.true
    labelled = true >= 0
    shares = class_shares(predicted, names)
    measured = measure_recall(true[labelled], predicted[labelled], names)
    minority = [names.index(name) for name in reference.minority]
    measured_minority = mean_recall(measured, reference.minority)
    halfwidth = minority_recall_halfwidth(true[labelled], predicted[labelled], minority)
    every_class_seen = set(minority) <= set(true[labelled].tolist())
    shift = estimate_label_shift(
        probabilities,
        conversations,
        reference.shift_model,
        names,
        reference.minority,
        replicates=replicates,
        seed=seed,
        mix_alpha=mix_alpha,
    )
    estimated = {name: None if r is None else r.estimate for name, r in zip(names, shift.recall, strict=True)}
    compare_embeddings = embeddings is not None and reference.embeddings is not None and len(embeddings) >= 20
    return WindowFindings(
        n_predictions=len(predicted),
        n_labelled=int(labelled.sum()),
        class_shares=shares,
        majority_share=shares[reference.majority],
        drift=class_mix_drift(
            predicted,
            np.asarray(conversations),
            {name: reference.class_shares[name] for name in names},
            reference.share_covariance,
            report_dir=report_dir,
        ),
        embedding_drift=embedding_drift(reference.embeddings, embeddings) if compare_embeddings else None,
        measured_recall=measured,
        estimated_recall=estimated,
        minority_recall_measured=measured_minority,
        # the half-width combines every minority class: it belongs to a mean over all of them, not over those seen
        minority_recall_halfwidth=float(halfwidth[-1]) if every_class_seen else None,
        minority_recall_measured_upper=(
            minority_recall_upper(true[labelled], predicted[labelled], minority) if every_class_seen else None
        ),
        measured_source=labels.source if labelled.any() else None,
        minority_recall_estimated=None if shift.minority_recall is None else shift.minority_recall.estimate,
        label_shift=shift,
    )
