"""Drift of the predicted-class mix (a test clustered by conversation, with Evidently's report beside it) and of
utterance embeddings (a domain classifier).

Evidently takes seconds to import, so it is imported inside the function that writes its report: nothing on the
request path pays for it. Its chi-square test treats the turns as independent and the reference as exact; the
decision here does neither (Evidently's report shows its own p-value for comparison).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2

from core.resampling import conversation_units

PREDICTED = "predicted_emotion"
REFERENCE_ROWS = 10_000


@dataclass(frozen=True)
class ClassMixDrift:
    js_distance: float
    p_value: float  # of the clustered test: the window's served mix is the reference mix
    drifted: bool


def reference_frame(shares: Mapping[str, float], rows: int = REFERENCE_ROWS) -> pd.DataFrame:
    """A reference column whose class counts follow `shares` exactly (largest-remainder rounding)."""
    names = list(shares)
    raw = np.array([shares[name] for name in names], dtype=np.float64)
    raw = raw / raw.sum() * rows
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts)[::-1][: rows - counts.sum()]] += 1
    return pd.DataFrame({PREDICTED: np.repeat(names, counts)})


def clustered_share_covariance(predicted: np.ndarray, conversations: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] covariance of the window's class shares with conversations as the sampling unit (the cluster-robust
    sandwich of a ratio estimator, with the K / (K - 1) small-sample factor): turns of one conversation move
    together, so the multinomial covariance of independent turns would be too small."""
    unit, k = conversation_units(conversations)
    one_hot = np.eye(num_classes)[np.asarray(predicted)]
    shares = one_hot.mean(axis=0)
    per_conversation = np.zeros((k, num_classes))
    np.add.at(per_conversation, unit, one_hot - shares)  # y_g - m_g * shares
    n = len(predicted)
    return per_conversation.T @ per_conversation / n**2 * (k / max(k - 1, 1))


def class_mix_drift(
    predicted: np.ndarray,
    conversations: np.ndarray,
    reference_shares: Mapping[str, float],
    reference_covariance: np.ndarray | None = None,
    *,
    p_value_threshold: float = 0.01,
    js_threshold: float = 0.1,
    report_dir: Path | None = None,
) -> ClassMixDrift:
    """Compare the window's served classes (indices into `reference_shares`' order) with the champion's reference
    mix. The test is a Wald test whose covariance is the window's, clustered by conversation, plus the reference
    mix's own (its bootstrap over dev conversations, recorded in the artifact; none for older artifacts): under no
    drift the statistic is chi-square with C - 1 degrees of freedom. Drift is declared when the test is significant
    and the Jensen-Shannon distance is at least `js_threshold`: with big windows the test alone flags shifts too
    small to matter. With `report_dir`, Evidently's report of the same comparison is written there."""
    names = list(reference_shares)
    reference = np.array([reference_shares[name] for name in names], dtype=np.float64)
    current = np.bincount(np.asarray(predicted), minlength=len(names)) / max(len(predicted), 1)
    covariance = clustered_share_covariance(np.asarray(predicted), np.asarray(conversations), len(names))
    if reference_covariance is not None:
        covariance = covariance + np.asarray(reference_covariance)
    difference = (current - reference)[:-1]
    statistic = float(difference @ np.linalg.pinv(covariance[:-1, :-1]) @ difference)
    p_value = float(chi2.sf(statistic, len(names) - 1))
    js = float(jensenshannon(reference, current))
    if report_dir is not None:
        write_report([names[k] for k in predicted], reference_shares, report_dir, js_threshold, p_value_threshold)
    return ClassMixDrift(js, p_value, drifted=p_value < p_value_threshold and js >= js_threshold)


def write_report(
    predicted: Sequence[str],
    reference_shares: Mapping[str, float],
    report_dir: Path,
    js_threshold: float,
    p_value_threshold: float,
) -> None:
    """Evidently's HTML and JSON report of the window's served classes against the reference mix."""
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
    report_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(report_dir / "class_drift.html"))
    snapshot.save_json(str(report_dir / "class_drift.json"))


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
