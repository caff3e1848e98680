"""One window in, its monitoring findings out: class mix, drift, measured and estimated recall, collapse signals.

Pure computation over arrays (no database), so the production monitor and the offline simulation share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitoring.collapse import WindowSignals
from monitoring.drift import ClassMixDrift, class_mix_drift, embedding_drift
from monitoring.estimation import (
    class_shares,
    estimate_recall,
    mean_recall,
    measure_recall,
    minority_recall_halfwidth,
    posteriors,
)


@dataclass(frozen=True)
class ReferenceProfile:
    """What the champion looked like on held-out data: the yardstick for every window."""

    names: tuple[str, ...]
    class_shares: Mapping[str, float]
    minority: tuple[str, ...]
    minority_recall: float | None = None
    embeddings: np.ndarray | None = None
    estimation_weights: Sequence[float] | None = None  # the champion's (model/artifact.py Calibration)

    @property
    def majority(self) -> str:
        return max(self.class_shares, key=lambda name: self.class_shares[name])


@dataclass(frozen=True)
class WindowFindings:
    n_predictions: int
    n_labelled: int
    class_shares: dict[str, float]
    majority_share: float
    drift: ClassMixDrift
    embedding_drift: float | None
    measured_recall: dict[str, float | None]
    estimated_recall: dict[str, float | None]
    minority_recall_measured: float | None
    minority_recall_halfwidth: float | None  # 95% half-width of the measured value, from the window's labels
    minority_recall_estimated: float | None

    def signals(self, reference: ReferenceProfile) -> WindowSignals:
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
        )


def analyse_window(
    probabilities: np.ndarray,
    true: np.ndarray,
    reference: ReferenceProfile,
    *,
    embeddings: np.ndarray | None = None,
    report_dir: Path | None = None,
) -> WindowFindings:
    """Findings for one window; `true` holds class indices, -1 where no feedback label exists. The measured
    minority recall comes with its 95% half-width, so the detector can tell whether the labels decide it."""
    names: Sequence[str] = reference.names
    predicted = probabilities.argmax(axis=1)
    labelled = true >= 0
    shares = class_shares(predicted, names)
    measured = measure_recall(true[labelled], predicted[labelled], names)
    minority = [names.index(name) for name in reference.minority]
    measured_minority = mean_recall(measured, reference.minority)
    halfwidth = minority_recall_halfwidth(true[labelled], predicted[labelled], minority)
    estimated = estimate_recall(posteriors(probabilities, reference.estimation_weights), names, predicted)
    compare_embeddings = embeddings is not None and reference.embeddings is not None and len(embeddings) >= 20
    return WindowFindings(
        n_predictions=len(predicted),
        n_labelled=int(labelled.sum()),
        class_shares=shares,
        majority_share=shares[reference.majority],
        drift=class_mix_drift([names[k] for k in predicted], reference.class_shares, report_dir=report_dir),
        embedding_drift=embedding_drift(reference.embeddings, embeddings) if compare_embeddings else None,
        measured_recall=measured,
        estimated_recall=estimated,
        minority_recall_measured=measured_minority,
        minority_recall_halfwidth=float(halfwidth[-1]) if measured_minority is not None else None,
        minority_recall_estimated=mean_recall(estimated, reference.minority),
    )
