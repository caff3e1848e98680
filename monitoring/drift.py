"""Drift of the predicted-class mix (Evidently) and of utterance embeddings (a domain classifier).

Evidently takes seconds to import, so it is imported inside the functions that use it: nothing on the
request path pays for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PREDICTED = "predicted_emotion"
REFERENCE_ROWS = 10_000


@dataclass(frozen=True)
class ClassMixDrift:
    js_distance: float
    chi2_p_value: float
    drifted: bool


def reference_frame(shares: Mapping[str, float], rows: int = REFERENCE_ROWS) -> pd.DataFrame:
    """A reference column whose class counts follow `shares` exactly (largest-remainder rounding)."""
    names = list(shares)
    raw = np.array([shares[name] for name in names], dtype=np.float64)
    raw = raw / raw.sum() * rows
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts)[::-1][: rows - counts.sum()]] += 1
    return pd.DataFrame({PREDICTED: np.repeat(names, counts)})


def class_mix_drift(
    predicted: Sequence[str],
    reference_shares: Mapping[str, float],
    *,
    p_value_threshold: float = 0.01,
    js_threshold: float = 0.1,
    report_dir: Path | None = None,
) -> ClassMixDrift:
    """Compare the window's predicted classes with the champion's reference mix; optionally write reports.

    Drift is declared when both the chi-square test is significant and the Jensen-Shannon distance is
    large: with big windows the test alone flags shifts too small to matter.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(categorical_columns=[PREDICTED])
    current = Dataset.from_pandas(pd.DataFrame({PREDICTED: list(predicted)}), data_definition=definition)
    reference = Dataset.from_pandas(reference_frame(reference_shares), data_definition=definition)
    report = Report(
        [
            ValueDrift(column=PREDICTED, method="jensenshannon", threshold=js_threshold),
            ValueDrift(column=PREDICTED, method="chisquare", threshold=p_value_threshold),
        ]
    )
    snapshot = report.run(current, reference)
    js_value, p_value = (float(metric["value"]) for metric in snapshot.dict()["metrics"])
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(report_dir / "class_drift.html"))
        snapshot.save_json(str(report_dir / "class_drift.json"))
    return ClassMixDrift(js_value, p_value, drifted=p_value < p_value_threshold and js_value >= js_threshold)


def embedding_drift(reference: np.ndarray, current: np.ndarray, *, seed: int = 0) -> float:
    """ROC AUC of a classifier telling window embeddings from reference ones (0.5: no drift, 1: disjoint).

    Cross-validated so the classifier cannot score itself on what it memorised.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    rows = min(len(reference), len(current))
    rng = np.random.default_rng(seed)
    ref = reference[rng.choice(len(reference), rows, replace=False)]
    cur = current[rng.choice(len(current), rows, replace=False)]
    features = np.vstack([ref, cur]).astype(np.float32)
    target = np.r_[np.zeros(rows), np.ones(rows)]
    classifier = LogisticRegression(max_iter=500, C=0.1)
    return float(cross_val_score(classifier, features, target, cv=3, scoring="roc_auc").mean())
