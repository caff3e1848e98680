import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.training.synthetic import blobs, class_means
from training.noise import partition_noisy_labels, per_sample_loss

C = 4


@pytest.fixture(scope="module")
def noisy_problem():
    """Imbalanced blobs with 20% of labels flipped to another class; a model fitted to the noisy labels."""
    x, y_true = blobs([1500, 600, 300, 150], class_means(C, 8, radius=4.0, seed=5), seed=31)
    rng = np.random.default_rng(32)
    flipped = rng.random(len(y_true)) < 0.2
    y_noisy = np.where(flipped, (y_true + rng.integers(1, C, len(y_true))) % C, y_true)
    model = LogisticRegression(max_iter=500).fit(x, y_noisy)
    return model.decision_function(x), model.predict_proba(x), y_noisy, y_true, flipped


def test_gmm_finds_flipped_labels_with_high_precision(noisy_problem):
    logits, probs, y_noisy, y_true, flipped = noisy_problem
    # a calibrated model fitted to 20% noise rarely exceeds ~0.8 confidence, hence the lower relabel threshold
    part = partition_noisy_labels(
        per_sample_loss(logits, y_noisy), y_noisy, probs, clean_threshold=0.5, relabel_confidence=0.75
    )
    suspected = ~part.clean
    precision = flipped[suspected].mean()
    recall = suspected[flipped].mean()
    assert precision > 0.9 and recall > 0.8
    assert (part.clean.astype(int) + part.relabel + part.ambiguous == 1).all()  # a partition
    assert part.relabel.sum() > 0.5 * flipped.sum()
    assert (part.labels[part.relabel] == y_true[part.relabel]).mean() > 0.95
    np.testing.assert_array_equal(part.labels[~part.relabel], y_noisy[~part.relabel])


def test_thresholds_move_samples_between_groups(noisy_problem):
    logits, probs, y_noisy, _, _ = noisy_problem
    losses = per_sample_loss(logits, y_noisy)
    strict = partition_noisy_labels(losses, y_noisy, probs, clean_threshold=0.5, relabel_confidence=1.01)
    assert strict.relabel.sum() == 0 and strict.ambiguous.sum() > 0
    trusting = partition_noisy_labels(losses, y_noisy, probs, clean_threshold=0.0, relabel_confidence=0.9)
    assert trusting.clean.all()


def test_per_sample_loss_is_cross_entropy():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    np.testing.assert_allclose(per_sample_loss(logits, [1, 1]), -np.log([0.25, 0.8]))


def test_ambiguous_labels_are_down_weighted_not_dropped(noisy_problem):
    logits, probs, y_noisy, _, _ = noisy_problem
    part = partition_noisy_labels(
        per_sample_loss(logits, y_noisy), y_noisy, probs, clean_threshold=0.5, relabel_confidence=1.01
    )
    assert part.ambiguous.sum() > 0
    labels, weights = part.training_labels("downweight")
    np.testing.assert_array_equal(labels, y_noisy)  # every label stays in training
    np.testing.assert_allclose(weights[part.ambiguous], part.clean_prob[part.ambiguous])
    assert (weights[part.ambiguous] < 0.5).all() and (weights[~part.ambiguous] == 1.0).all()
    dropped, zero = part.training_labels("drop")
    assert (dropped[part.ambiguous] == -1).all() and (zero[part.ambiguous] == 0).all()
    kept, ones = part.training_labels("keep")
    np.testing.assert_array_equal(kept, y_noisy)
    assert (ones == 1).all()
