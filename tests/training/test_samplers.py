import numpy as np
import pytest
from torch.utils.data import WeightedRandomSampler

from training.metrics import compute_metrics
from training.recipe import SAMPLER_PARAMS, MethodConfig, make_sampler
from training.samplers import (
    DevF1Sampler,
    FrequencySampler,
    ProgressiveSampler,
    Sampler,
    build_sampler,
    epoch_indices,
    epoch_sampler,
)

COUNTS = np.array([800, 400, 100, 50, 0, 10])  # class 4 has no samples
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
DRAWS = 60_000


def _drawn_shares(sampler: Sampler, epoch: int = 0) -> np.ndarray:
    drawn = LABELS[epoch_indices(sampler, LABELS, epoch, seed=1, num_samples=DRAWS)]
    return np.bincount(drawn, minlength=len(COUNTS)) / DRAWS


def _expected(per_class: np.ndarray) -> np.ndarray:
    share = np.where(COUNTS > 0, per_class, 0.0)
    return share / share.sum()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("instance", _expected(COUNTS.astype(float))),
        ("sqrt", _expected(np.sqrt(COUNTS))),
        ("class_balanced", _expected(np.ones(len(COUNTS)))),
    ],
)
def test_drawn_class_shares(name, expected):
    sampler = build_sampler(name)
    np.testing.assert_allclose(sampler.class_shares(LABELS, 0), expected, atol=1e-12)
    np.testing.assert_allclose(_drawn_shares(sampler), expected, atol=0.01)


def test_weights_are_a_distribution_uniform_within_class():
    weights = FrequencySampler(0.5).weights(LABELS, 0)
    assert weights.sum() == pytest.approx(1.0)
    for c in np.flatnonzero(COUNTS):
        in_class = weights[np.equal(LABELS, c)]
        assert in_class.max() == pytest.approx(in_class.min())


def test_progressive_goes_from_instance_to_balanced():
    sampler = ProgressiveSampler(total_epochs=5)
    instance, balanced = _expected(COUNTS.astype(float)), _expected(np.ones(len(COUNTS)))
    np.testing.assert_allclose(sampler.class_shares(LABELS, 0), instance)
    np.testing.assert_allclose(sampler.class_shares(LABELS, 2), (instance + balanced) / 2)
    np.testing.assert_allclose(sampler.class_shares(LABELS, 4), balanced)
    np.testing.assert_allclose(_drawn_shares(sampler, epoch=4), balanced, atol=0.01)


def test_dev_f1_sampler_favours_weak_classes():
    sampler = DevF1Sampler(q=0.0, power=1.0, floor=0.1, momentum=0.0)
    np.testing.assert_allclose(sampler.class_shares(LABELS, 0), _expected(np.ones(len(COUNTS))))
    names = tuple("abcdef")
    y_dev = np.repeat(np.arange(6), 20)
    y_pred = np.where(y_dev == 5, 0, y_dev)  # class 5 never right: F1 0; others perfect except class 0
    sampler.update(compute_metrics(y_dev, y_pred, names))
    shares = sampler.class_shares(LABELS, 1)
    assert shares[5] == shares.max() and shares[5] > 5 * shares[1]
    f1 = compute_metrics(y_dev, y_pred, names).f1
    np.testing.assert_allclose(shares, _expected(1.1 - f1))


def test_dev_f1_momentum_smooths():
    sampler = DevF1Sampler(q=0.0, power=1.0, floor=0.1, momentum=0.5)
    sampler.update(np.zeros(6))
    sampler.update(np.ones(6))
    np.testing.assert_allclose(sampler.f1, 0.5)


def test_epoch_sampler_is_deterministic_per_seed_and_epoch():
    sampler = FrequencySampler(0.0)
    first = epoch_indices(sampler, LABELS, epoch=3, seed=7)
    assert isinstance(epoch_sampler(sampler, LABELS, 3, 7), WeightedRandomSampler)
    np.testing.assert_array_equal(first, epoch_indices(sampler, LABELS, epoch=3, seed=7))
    assert not np.array_equal(first, epoch_indices(sampler, LABELS, epoch=4, seed=7))
    assert not np.array_equal(first, epoch_indices(sampler, LABELS, epoch=3, seed=8))
    assert len(first) == len(LABELS)


@pytest.mark.parametrize("name", SAMPLER_PARAMS)
def test_every_sampler_builds_from_the_recipe_defaults_alone(name):
    sampler = make_sampler(MethodConfig(name), epochs=4)
    assert sampler.weights(LABELS, 0).sum() == pytest.approx(1.0)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("oversample")
