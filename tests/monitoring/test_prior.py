"""Label-shift estimation pinned against hand-made cases: MLLS/EM (Saerens et al. 2002) recovers a known prior from
calibrated posteriors, BCTS (Alexandari et al. 2020) calibrates what temperature scaling cannot, the label-free
recall on prior-corrected posteriors is unbiased under label shift where the uncorrected one is not, and the
clustered tests hold their level on conversation-clustered traffic."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from core.resampling import conversation_units, turn_weights
from model.artifact import Calibration, ClassPrior, DataSource, DevReference, PosteriorCalibration
from monitoring.drift import class_mix_drift, clustered_share_covariance
from monitoring.prior import (
    ShiftModel,
    _em_step,
    corrected_recall,
    estimate_label_shift,
    mlls_prior,
    normalised,
    prior_corrected,
)
from training.calibration import fit_bcts, fit_calibration_record, fit_temperature

NAMES = ("a", "b", "c")
SOURCE = np.array([0.6, 0.3, 0.1])
MEANS = np.array([[0.0, 0.0], [1.6, 0.4], [0.3, 1.8]])
SOURCE_INFO = DataSource("synthetic", "text", 1000, 100)


def _sample(rng: np.random.Generator, prior: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels from `prior`, two-dimensional Gaussian inputs around each class's mean (p(x | y) fixed)."""
    y = rng.choice(len(prior), size=n, p=prior)
    return MEANS[y] + rng.normal(size=(n, 2)), y


def _log_likelihoods(x: np.ndarray) -> np.ndarray:
    """log p(x | y) up to a constant shared by the classes."""
    return -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(axis=2)


def _bayes_posteriors(x: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Exact posteriors under `prior`: calibrated by construction."""
    return softmax(_log_likelihoods(x) + np.log(prior), axis=1)


def test_em_recovers_a_known_prior_from_calibrated_posteriors() -> None:
    rng = np.random.default_rng(0)
    target = np.array([0.2, 0.3, 0.5])
    x, y = _sample(rng, target, 40_000)
    posteriors = _bayes_posteriors(x, SOURCE)
    fit = mlls_prior(posteriors, SOURCE)
    assert fit.converged
    assert fit.prior == pytest.approx(target, abs=0.015)
    assert np.abs(posteriors.mean(axis=0) - target).max() > 0.05  # the naive average of posteriors is off
    # corrected to the estimated prior, they are the exact posteriors under it
    assert prior_corrected(posteriors, SOURCE, fit.prior) == pytest.approx(_bayes_posteriors(x, fit.prior), abs=1e-9)
    assert fit.prior == pytest.approx(np.bincount(y) / len(y), abs=0.015)
    unshifted = mlls_prior(_bayes_posteriors(*_sample(rng, SOURCE, 40_000)[:1], SOURCE), SOURCE)
    assert unshifted.prior == pytest.approx(SOURCE, abs=0.015)


def test_accelerated_em_reaches_the_plain_em_fixed_point_and_weights_act_as_multiplicities() -> None:
    rng = np.random.default_rng(1)
    x, _ = _sample(rng, np.array([0.15, 0.25, 0.6]), 3_000)
    posteriors = _bayes_posteriors(x, SOURCE)
    plain = np.tile(SOURCE, (1, 1))
    for _ in range(5_000):
        plain = _em_step(posteriors, SOURCE, np.ones((1, len(x))), plain)
    assert mlls_prior(posteriors, SOURCE).prior == pytest.approx(plain[0], abs=1e-5)
    # integer weights are the same as repeating the rows
    counts = rng.integers(0, 3, size=len(x))
    weighted = mlls_prior(posteriors, SOURCE, counts[None].astype(float)).prior[0]
    assert weighted == pytest.approx(mlls_prior(np.repeat(posteriors, counts, axis=0), SOURCE).prior, abs=1e-5)


def test_prior_correction_by_hand() -> None:
    posteriors = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    corrected = prior_corrected(posteriors, np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.5, 0.25]))
    # weights target / source = (0.5, 2, 1): (0.25, 1, 0) / 1.25 and (0.1, 0.4, 0.6) / 1.1
    np.testing.assert_allclose(corrected, [[0.2, 0.8, 0.0], [0.1 / 1.1, 0.4 / 1.1, 0.6 / 1.1]])


def test_recall_on_prior_corrected_posteriors_is_unbiased_under_label_shift() -> None:
    """The served rule is balanced (argmax of the likelihood), so its recall is the same under any prior; the
    label-free estimate on posteriors under the training prior drifts with the mix, the corrected one does not."""
    rng = np.random.default_rng(2)
    target = np.array([0.85, 0.1, 0.05])
    x, y = _sample(rng, target, 60_000)
    served = _log_likelihoods(x).argmax(axis=1)
    measured = np.array([(served[y == k] == k).mean() for k in range(3)])
    posteriors = _bayes_posteriors(x, SOURCE)
    naive = corrected_recall(posteriors, served)
    estimated = mlls_prior(posteriors, SOURCE).prior
    corrected = corrected_recall(prior_corrected(posteriors, SOURCE, estimated), served)
    assert corrected == pytest.approx(measured, abs=0.02)
    assert np.abs(naive - measured).max() > 0.05


def _model(temperature: float = 1.0, biases: tuple[float, ...] = (0.0, 0.0, 0.0), confusion=None) -> ShiftModel:  # noqa: ANN001
    confusion = confusion if confusion is not None else np.eye(3, dtype=int) * 100
    calibration = Calibration(
        temperature=1.0,
        training_prior=ClassPrior(tuple(SOURCE), SOURCE_INFO),
        dev_prior=ClassPrior(tuple(SOURCE), SOURCE_INFO),
        posterior=PosteriorCalibration(temperature, biases, SOURCE_INFO),
        dev_reference=DevReference(confusion, np.zeros((3, 3)), SOURCE_INFO),
    )
    return ShiftModel.from_calibration(calibration)


def _clustered_stream(rng: np.random.Generator, prior: np.ndarray, conversations: int, turns: int):  # noqa: ANN202
    """Conversations whose turns share a class tendency (each conversation leans toward one class)."""
    xs, ys, ids = [], [], []
    for c in range(conversations):
        lean = rng.dirichlet(prior * 3)
        x, y = _sample(rng, lean, turns)
        xs.append(x)
        ys.append(y)
        ids += [c] * turns
    return np.concatenate(xs), np.concatenate(ys), np.array(ids)


def _dev_confusion(rng: np.random.Generator) -> np.ndarray:
    """Counts of (true class, served label) of the model whose logits are log p(x | y) + log SOURCE."""
    x, y = _sample(rng, SOURCE, 20_000)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (y, (_log_likelihoods(x) + np.log(SOURCE)).argmax(axis=1)), 1)
    return confusion


def test_estimate_separates_a_label_shift_from_a_collapse_of_the_model() -> None:
    rng = np.random.default_rng(3)
    model = _model(confusion=_dev_confusion(rng))
    shifted = np.array([0.85, 0.1, 0.05])
    x, y, ids = _clustered_stream(rng, shifted, 120, 10)
    logits = _log_likelihoods(x) + np.log(SOURCE)  # a calibrated model's logits, served at T = 1
    label_shift = estimate_label_shift(softmax(logits, axis=1), ids, model, NAMES, ("c",), replicates=200)
    assert label_shift.shift_significant
    assert label_shift.prior_of("a").lower <= np.mean(y == 0) <= label_shift.prior_of("a").upper
    assert label_shift.explained(0.01)

    x, y, ids = _clustered_stream(rng, SOURCE, 120, 10)
    biased = _log_likelihoods(x) + np.log(SOURCE) + np.array([2.0, 0.0, 0.0])  # the model leans toward "a"
    collapse = estimate_label_shift(softmax(biased, axis=1), ids, model, NAMES, ("c",), replicates=200)
    assert collapse.shift_significant, "EM reads the lean as more class-a traffic"
    assert not collapse.explained(0.01), "but the served mix is not what that prior explains"


def test_unshifted_clustered_traffic_is_rarely_called_shifted() -> None:
    rng = np.random.default_rng(4)
    model = _model(confusion=_dev_confusion(rng))
    flagged = []
    for _ in range(40):
        x, _, ids = _clustered_stream(rng, SOURCE, 50, 10)
        served = softmax(_log_likelihoods(x) + np.log(SOURCE), axis=1)
        estimate = estimate_label_shift(served, ids, model, NAMES, (), replicates=100)
        flagged.append(estimate.shift_significant)
    assert np.mean(flagged) <= 0.15  # a 5% family-wise level, with room for 40 draws


def test_bcts_reduces_nll_where_temperature_scaling_cannot_and_equals_it_without_biases() -> None:
    rng = np.random.default_rng(5)
    x, y = _sample(rng, SOURCE, 20_000)
    true_logits = _log_likelihoods(x) + np.log(SOURCE)
    served = 2.0 * true_logits + np.array([0.0, 1.0, -1.0])  # over-confident and biased per class
    temperature = fit_temperature(served, y)
    bcts_t, biases = fit_bcts(served, y)
    rows = np.arange(len(y))
    nll_ts = -log_softmax(served / temperature, axis=1)[rows, y].mean()
    nll_bcts = -log_softmax(served / bcts_t + biases, axis=1)[rows, y].mean()
    assert nll_bcts < nll_ts - 0.005
    assert bcts_t == pytest.approx(2.0, rel=0.05)
    assert biases - biases.mean() == pytest.approx(np.array([0.0, -0.5, 0.5]) - 0.0, abs=0.08)
    # at the optimum the mean posterior is the labels' class mix
    assert softmax(served / bcts_t + biases, axis=1).mean(axis=0) == pytest.approx(np.bincount(y) / len(y), abs=1e-4)

    unbiased = 2.0 * true_logits
    bcts_t, biases = fit_bcts(unbiased, y)
    assert bcts_t == pytest.approx(fit_temperature(unbiased, y), rel=0.02)
    assert biases == pytest.approx(np.zeros(3), abs=0.05)
    posterior = PosteriorCalibration(1.7, (0.0, 0.0, 0.0), SOURCE_INFO)
    served_probabilities = softmax(unbiased / 1.3, axis=1)
    assert posterior.posteriors(served_probabilities, 1.3) == pytest.approx(softmax(unbiased / 1.7, axis=1))


def test_the_calibration_record_expresses_posteriors_for_the_training_prior() -> None:
    """Fitted on a dev set whose mix differs from training's, the biases move the posteriors to the training
    prior: EM on that dev set then finds the dev mix, EM on training-mix data the training prior."""
    rng = np.random.default_rng(6)
    dev_prior = np.array([0.4, 0.35, 0.25])
    x, y = _sample(rng, dev_prior, 20_000)
    logits = _log_likelihoods(x)  # a balanced model's logits
    training = ClassPrior(tuple(SOURCE), SOURCE_INFO)
    fit = fit_calibration_record(
        logits, y, np.arange(len(y)) // 10, NAMES, dev_source=SOURCE_INFO, training_prior=training
    )
    model = ShiftModel.from_calibration(fit.calibration)
    served = softmax(logits / fit.calibration.temperature, axis=1)
    assert mlls_prior(model.posteriors(served), model.source_prior).prior == pytest.approx(dev_prior, abs=0.02)
    x, _ = _sample(rng, SOURCE, 20_000)
    train_like = softmax(_log_likelihoods(x) / fit.calibration.temperature, axis=1)
    assert mlls_prior(model.posteriors(train_like), model.source_prior).prior == pytest.approx(SOURCE, abs=0.02)
    assert fit.calibration.dev_prior is not None
    assert fit.calibration.dev_prior.shares == pytest.approx(np.bincount(y) / len(y))
    assert sum(fit.reference_distribution.values()) == pytest.approx(1.0, abs=1e-5)


def test_conversation_bootstrap_draws_whole_conversations() -> None:
    conversations = np.array(["x", "x", "y", "z", "z", "z"])
    unit, k = conversation_units(conversations)
    assert k == 3 and list(unit) == [0, 0, 1, 2, 2, 2]
    weights = turn_weights(conversations, 500, seed=0)
    assert weights.shape == (500, 6)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    per_conversation = weights[:, [0, 2, 3]]
    assert (per_conversation.sum(axis=1) == 3).all()  # K conversations drawn with replacement


def test_clustered_covariance_matches_a_bootstrap_and_independent_turns_the_multinomial() -> None:
    rng = np.random.default_rng(7)
    _, y, ids = _clustered_stream(rng, SOURCE, 80, 8)
    analytic = clustered_share_covariance(y, ids, 3)
    weights = turn_weights(ids, 4000, seed=1)
    shares = (weights @ np.eye(3)[y]) / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(analytic, np.cov(shares, rowvar=False), atol=2e-4)
    independent = clustered_share_covariance(y, np.arange(len(y)), 3)
    p = np.bincount(y, minlength=3) / len(y)
    multinomial = (np.diag(p) - np.outer(p, p)) / len(y)
    np.testing.assert_allclose(independent, multinomial * len(y) / (len(y) - 1), rtol=1e-9)
    assert analytic[0, 0] > 2 * multinomial[0, 0], "conversations that lean one way widen the interval"


def test_the_clustered_drift_test_holds_its_level_where_an_independent_turns_test_does_not() -> None:
    rng = np.random.default_rng(8)
    reference = dict(zip(NAMES, SOURCE.tolist(), strict=True))
    clustered, naive = [], []
    for _ in range(200):
        _, y, ids = _clustered_stream(rng, SOURCE, 50, 10)
        clustered.append(class_mix_drift(y, ids, reference, js_threshold=0.0).drifted)
        naive.append(class_mix_drift(y, np.arange(len(y)), reference, js_threshold=0.0).drifted)
    assert np.mean(clustered) <= 0.04  # nominal 1%, with room for 200 draws
    assert np.mean(naive) >= 0.15  # independent turns: many times the nominal level


def test_normalised_floors_and_sums_to_one() -> None:
    assert normalised([0.0, 1.0, 1.0]).sum() == pytest.approx(1.0)
    assert normalised([0.0, 1.0, 1.0])[0] > 0


def test_a_record_without_dev_confusion_still_corrects_for_its_prior_and_one_without_posteriors_does_not() -> None:
    recorded = _model()
    tier1 = ShiftModel.from_calibration(replace(recorded.calibration, dev_reference=None))
    assert tier1.source_prior == pytest.approx(SOURCE) and tier1.confusion is None
    older = ShiftModel.from_calibration(Calibration(temperature=1.3))
    assert older.source_prior is None
    served = softmax(np.random.default_rng(9).normal(size=(50, 3)), axis=1)
    estimate = estimate_label_shift(served, np.arange(50), older, NAMES, ("c",), replicates=50)
    assert estimate.prior_of("a").estimate == pytest.approx(served[:, 0].mean()) and not estimate.shift_significant
    assert estimate.mix_p_value is None
