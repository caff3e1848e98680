"""Predicted-class drift (a test clustered by conversation, with Evidently's report), and embedding drift through a
domain classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monitoring.drift import class_mix_drift, embedding_drift, reference_frame

NAMES = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
REFERENCE = dict(zip(NAMES, [0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03], strict=True))


def test_reference_frame_follows_the_shares_exactly() -> None:
    frame = reference_frame(REFERENCE, rows=1000)
    counts = frame.iloc[:, 0].value_counts()
    assert len(frame) == 1000 and counts["neutral"] == 470 and counts["fear"] == 30


def test_stationary_window_is_not_drift_and_collapsed_window_is(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    conversations = np.repeat(np.arange(50), 10)
    stationary = rng.choice(len(NAMES), 500, p=list(REFERENCE.values()))
    collapsed = rng.choice(len(NAMES), 500, p=[0.75, 0.1, 0.06, 0.06, 0.01, 0.01, 0.01])
    assert not class_mix_drift(stationary, conversations, REFERENCE).drifted
    result = class_mix_drift(collapsed, conversations, REFERENCE, report_dir=tmp_path)
    assert result.drifted and result.p_value < 1e-6
    assert (tmp_path / "class_drift.html").stat().st_size > 10_000
    assert (tmp_path / "class_drift.json").is_file()


def test_the_reference_mix_own_uncertainty_widens_the_test() -> None:
    """A dev set of a hundred conversations measures the reference mix with an error of its own: adding its
    covariance turns a borderline difference into an unremarkable one."""
    rng = np.random.default_rng(1)
    shifted = rng.choice(len(NAMES), 2000, p=[0.52, 0.15, 0.11, 0.10, 0.07, 0.03, 0.02])
    conversations = np.arange(2000)
    exact = class_mix_drift(shifted, conversations, REFERENCE, js_threshold=0.0)
    shares = np.array(list(REFERENCE.values()))
    noisy = class_mix_drift(
        shifted, conversations, REFERENCE, (np.diag(shares) - np.outer(shares, shares)) / 300, js_threshold=0.0
    )
    assert noisy.p_value > exact.p_value and noisy.js_distance == exact.js_distance


def test_embedding_drift_separates_shifted_embeddings() -> None:
    rng = np.random.default_rng(0)
    reference, same = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    assert abs(embedding_drift(reference, same) - 0.5) < 0.08
    assert embedding_drift(reference, same + 0.5) > 0.9
