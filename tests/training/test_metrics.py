import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from training.metrics import (
    MetricsReport,
    compute_metrics,
    confusion_matrix,
    conversation_intervals,
    expected_calibration_error,
    macro_f1,
    minority_classes,
    resampled_f1,
)

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def _random_case(seed: int, missing_true: tuple[int, ...], missing_pred: tuple[int, ...]):
    rng = np.random.default_rng(seed)
    present_true = [c for c in range(7) if c not in missing_true]
    present_pred = [c for c in range(7) if c not in missing_pred]
    y_true = rng.choice(present_true, 300)
    y_pred = np.where(rng.random(300) < 0.5, y_true, rng.choice(present_pred, 300))
    y_pred = np.where(np.isin(y_pred, missing_pred), present_pred[0], y_pred)
    return y_true, y_pred


@pytest.mark.parametrize(
    ("seed", "missing_true", "missing_pred"),
    [(0, (), ()), (1, (6,), ()), (2, (), (5, 6)), (3, (5,), (6,)), (4, (6,), (6,))],
)
def test_matches_sklearn_including_absent_classes(seed, missing_true, missing_pred):
    y_true, y_pred = _random_case(seed, missing_true, missing_pred)
    labels = list(range(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our code must not warn
        report = compute_metrics(y_true, y_pred, LABELS, minority=("sadness", "disgust", "fear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about absent classes
        p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        expected_balanced = skm.balanced_accuracy_score(y_true, y_pred)
    assert report.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report.macro_f1 == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    )
    assert report.weighted_f1 == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    )
    assert report.balanced_accuracy == pytest.approx(expected_balanced)
    np.testing.assert_allclose(report.precision, p)
    np.testing.assert_allclose(report.recall, r)
    np.testing.assert_allclose(report.f1, f)
    np.testing.assert_array_equal(report.support, s)
    np.testing.assert_array_equal(report.confusion, skm.confusion_matrix(y_true, y_pred, labels=labels))
    present_minority = [c for c in (4, 5, 6) if c not in missing_true]
    assert report.minority_recall == pytest.approx(r[present_minority].mean())
    assert macro_f1(y_true, y_pred, 7) == pytest.approx(report.macro_f1)


def test_absent_class_scores_zero_and_minority_recall_skips_it():
    report = compute_metrics([0, 0, 1, 1], [0, 1, 1, 1], ("a", "b", "c"), minority=("b", "c"))
    assert report["c"].f1 == 0.0 and report["c"].support == 0
    assert report.minority_recall == pytest.approx(1.0)  # only "b" occurs; its recall is 1
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert compute_metrics([0, 1], [0, 1], ("a", "b", "c"), minority=("c",)).minority_recall is None


def test_ece_hand_computed():
    # Bin (0.6, 0.667]: conf 0.6 x4, 2 correct -> |0.5 - 0.6| * 4/10; bin (0.867, 0.933]: conf 0.9 x6, all
    # correct -> |1 - 0.9| * 6/10. ECE = 0.04 + 0.06 = 0.10.
    probs = np.array([[0.6, 0.4]] * 4 + [[0.1, 0.9]] * 6)
    y_true = np.array([0, 0, 1, 1] + [1] * 6)
    assert expected_calibration_error(probs, y_true) == pytest.approx(0.10)
    assert expected_calibration_error(np.eye(3)[[0, 1, 2]], [0, 1, 2]) == pytest.approx(0.0)


def test_ece_bins_are_right_closed():
    # 0.4 = 6/15 is an edge: it belongs to the bin (1/3, 0.4], together with 0.35, not to (0.4, 7/15].
    probs = np.array([[0.4, 0.3, 0.3], [0.35, 0.33, 0.32]])
    ece_same_bin = abs(0.5 - 0.375)
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx(ece_same_bin)


def test_report_round_trips_through_json():
    report = compute_metrics([0, 1, 2, 2], [0, 2, 2, 1], ("x", "y", "z"), probs=np.full((4, 3), 1 / 3), minority=("x",))
    data = json.loads(json.dumps(report.to_dict()))
    again = MetricsReport.from_dict(data)
    assert again.to_dict() == report.to_dict()
    assert data["per_class"]["z"]["support"] == 2 and data["ece"] is not None


def test_input_validation():
    with pytest.raises(ValueError, match="minority"):
        compute_metrics([0], [0], ("a", "b"), minority=("c",))
    with pytest.raises(ValueError, match="y_pred"):
        confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], 2)


def test_minority_classes_default_rule_on_meld_counts():
    from tests.training.synthetic import MELD_TRAIN_COUNTS

    assert minority_classes(MELD_TRAIN_COUNTS, LABELS) == ("sadness", "disgust", "fear")


def test_a_resample_scores_as_its_turns_repeated() -> None:
    """Row r of the weights counts how often each turn was drawn: the F1 of that row equals compute_metrics on the
    turns copied that many times."""
    from core.resampling import turn_weights

    y_true, y_pred = _random_case(4, (), ())
    conversations = np.arange(300) // 6
    weights = turn_weights(conversations, 3, seed=1)
    f1, support = resampled_f1(y_true, y_pred, weights, np.arange(7))
    for r in range(3):
        copies = weights[r].astype(int)
        expected = compute_metrics(np.repeat(y_true, copies), np.repeat(y_pred, copies), LABELS)
        np.testing.assert_allclose(f1[r], [m.f1 for m in expected.per_class])
        np.testing.assert_allclose(support[r], [m.support for m in expected.per_class])


def test_conversation_intervals_resample_whole_conversations() -> None:
    y_true, y_pred = _random_case(5, (), ())
    report = compute_metrics(y_true, y_pred, LABELS)
    spread = conversation_intervals(y_true, y_pred, np.arange(300) // 6, LABELS, replicates=500)
    for key in ("weighted_f1", "macro_f1"):
        low, high = spread[key]
        assert low < getattr(report, key) < high
    assert set(spread["f1"]) == set(LABELS) and spread["unit"] == "conversation"
    one = conversation_intervals(y_true, y_pred, np.zeros(300), LABELS, replicates=50)
    assert one["macro_f1"] == [round(report.macro_f1, 4)] * 2  # a single conversation: every draw is the same
