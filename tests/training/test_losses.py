from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.synthetic import MELD_TRAIN_COUNTS
from training.losses import LOSS_NAMES, LDAMLoss, NormedLinear, build_loss, class_weights, soft_cross_entropy
from training.recipe import LOSS_PARAMS, MethodConfig, OptimConfig, load_recipe, make_loss
from training.session import start_epoch, warmup_cosine

COUNTS = np.array([500, 200, 50, 10])
EQUAL = np.array([100, 100, 100, 100])
OPTIM = OptimConfig(epochs=8, lr_drop_epoch=3, warmup_epochs=0.0)


def recipe_loss(name, counts, **params):
    """The loss as a recipe builds it: unset parameters take the recipe defaults (training/recipe.py)."""
    return make_loss(MethodConfig(name, params), counts, OPTIM)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(32, 4, generator=g)
    labels = torch.randint(0, 4, (32,), generator=g)
    return logits, labels


@pytest.mark.parametrize(
    ("name", "counts", "params"),
    [
        ("ce", COUNTS, {}),
        ("soft_ce", COUNTS, {}),
        ("focal", COUNTS, {"gamma": 0.0}),
        ("logit_adjusted", COUNTS, {"tau": 0.0}),
        ("ldam", COUNTS, {"max_margin": 0.0, "s": 1.0, "drw": False}),
        ("weighted_ce", EQUAL, {"scheme": "inverse"}),
        ("weighted_ce", EQUAL, {"scheme": "effective", "beta": 0.999}),
        ("focal", EQUAL, {"gamma": 0.0, "alpha": "inverse"}),
        ("balanced_softmax", EQUAL, {}),
    ],
)
def test_degenerate_settings_equal_cross_entropy(batch, name, counts, params):
    logits, labels = batch
    loss = recipe_loss(name, counts, **params)
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss(logits, labels), expected)
    torch.testing.assert_close(loss(logits, F.one_hot(labels, 4).float()), expected)  # same as one-hot targets


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ce", {}),
        ("weighted_ce", {"scheme": "effective"}),
        ("focal", {"gamma": 2.0, "alpha": "inverse"}),
        ("ldam", {}),
        ("logit_adjusted", {"tau": 1.5}),
        ("balanced_softmax", {}),
    ],
)
def test_gradients_finite_for_extreme_logits_and_soft_targets(name, params):
    logits = torch.tensor([[60.0, -60.0, 0.0, 0.0], [-80.0, 80.0, 0.0, 1.0]], requires_grad=True)
    soft = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.7]])
    loss = recipe_loss(name, COUNTS, **params)
    loss.set_epoch(5)
    value = loss(logits, soft)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_soft_cross_entropy_matches_torch_probability_targets(batch):
    logits, _ = batch
    soft = torch.softmax(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, soft))


def test_class_weights():
    w = class_weights(COUNTS, "inverse", beta=0.9999).numpy()
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w / w[0], COUNTS[0] / COUNTS, rtol=1e-6)
    effective = class_weights(COUNTS, "effective", beta=0.999).numpy()
    assert np.all(np.diff(effective) > 0)  # rarer classes weigh more
    np.testing.assert_allclose(class_weights(COUNTS, "effective", beta=1e-9).numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="scheme"):
        class_weights(COUNTS, "log", beta=0.9999)


def test_weighted_ce_is_per_sample_weighted_mean(batch):
    logits, labels = batch
    w = class_weights(COUNTS, "inverse", beta=0.9999)
    per_sample = F.cross_entropy(logits, labels, reduction="none") * w[labels]
    torch.testing.assert_close(recipe_loss("weighted_ce", COUNTS)(logits, labels), per_sample.mean())


def test_focal_downweights_easy_examples():
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    focal = recipe_loss("focal", COUNTS, gamma=2.0)
    ce = F.cross_entropy(logits, labels, reduction="none")
    ratios = [focal(logits[i : i + 1], labels[i : i + 1]) / ce[i] for i in range(2)]
    assert ratios[0] < 0.01 < ratios[1] < 1.0


def test_ldam_margins_and_deferred_reweighting(batch):
    logits, labels = batch
    loss = LDAMLoss(COUNTS, max_margin=0.5, s=30.0, drw_epoch=3, beta=0.9999)
    margins = loss.margins.numpy()
    assert margins[-1] == pytest.approx(0.5)
    np.testing.assert_allclose(margins / margins[-1], (COUNTS / COUNTS[-1]) ** -0.25, rtol=1e-6)
    loss.set_epoch(2)
    before = loss(logits, labels)
    assert loss.weight is None
    loss.set_epoch(3)
    after = loss(logits, labels)
    torch.testing.assert_close(loss.weight, class_weights(COUNTS, "effective", 0.9999))
    assert not torch.isclose(before, after)
    # the target logit (already s · cos) loses s · Δ_y: higher than plain CE on the same logits
    loss.set_epoch(0)
    shifted = logits - 30.0 * loss.margins[labels][:, None] * F.one_hot(labels, 4)
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(shifted, labels))
    assert loss(logits, labels) > F.cross_entropy(logits, labels)


def test_ldam_trains_a_cosine_classifier_scaled_by_s():
    linear = torch.nn.Linear(8, 4)
    head = LDAMLoss(COUNTS, max_margin=0.5, s=30.0, drw_epoch=None, beta=0.9999).classifier(linear)
    assert isinstance(head, NormedLinear) and head.weight is linear.weight  # the same parameter is trained
    x = torch.randn(6, 8)
    cosines = F.cosine_similarity(x[:, None, :], linear.weight[None], dim=-1)
    torch.testing.assert_close(head(x), 30.0 * cosines)
    torch.testing.assert_close(head(5 * x), head(x))  # independent of the feature norm, unlike a linear head
    folded = head.to_linear()  # what the exported graph carries: same classes, logits x ||x||
    with torch.no_grad():
        torch.testing.assert_close(folded(x), head(x) * x.norm(dim=1, keepdim=True))
        assert torch.equal(folded(x).argmax(1), head(x).argmax(1))


def test_ldam_deferred_reweighting_starts_at_the_learning_rate_drop():
    loss = recipe_loss("ldam", COUNTS)
    assert loss.drw_epoch == OPTIM.lr_drop_epoch and loss.s == 30.0
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    s = SimpleNamespace(loss=loss, optimizer=optimizer, scheduler=warmup_cosine(optimizer, OPTIM, steps_per_epoch=4))
    for epoch in range(OPTIM.epochs):
        start_epoch(s, epoch)
        deferred = epoch >= OPTIM.lr_drop_epoch
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 if deferred else 0.5), epoch
        assert (loss.weight is not None) == deferred, epoch
        for _ in range(3):  # fewer steps than the nominal 4: the switch follows the epoch, not a step count
            optimizer.step()
            s.scheduler.step()
    with pytest.raises(ValueError, match="lr_drop_epoch"):
        make_loss(MethodConfig("ldam"), COUNTS, OptimConfig())  # DRW without a learning-rate drop


def test_logit_adjustment_uses_each_rows_own_corpus_prior():
    meld, speech = np.array([470, 170, 120, 110, 68, 27, 27]), np.array([100, 100, 100, 100, 100, 100, 100])
    loss = recipe_loss("logit_adjusted", np.stack([meld, speech]), tau=1.0)
    logits = torch.randn(4, 7)
    labels = torch.tensor([6, 6, 0, 0])
    groups = torch.tensor([0, 1, 0, 1])
    log_prior = torch.log(torch.tensor(np.stack([meld / meld.sum(), speech / speech.sum()]), dtype=torch.float32))
    expected = F.cross_entropy(logits + log_prior[groups], labels)
    torch.testing.assert_close(loss(logits, labels, groups=groups), expected)
    with pytest.raises(ValueError, match="corpus of each row"):
        loss(logits, labels)
    pooled = recipe_loss("logit_adjusted", np.stack([meld, speech]), tau=1.0, prior="pooled")
    total = torch.tensor(meld + speech, dtype=torch.float32)
    expected_pooled = F.cross_entropy(logits + torch.log(total / total.sum()), labels)
    torch.testing.assert_close(pooled(logits, labels, groups=groups), expected_pooled)


def test_sample_weights_scale_each_rows_loss(batch):
    logits, labels = batch
    w = torch.rand(len(labels))
    expected = (F.cross_entropy(logits, labels, reduction="none") * w).mean()
    torch.testing.assert_close(recipe_loss("ce", COUNTS)(logits, labels, sample_weight=w), expected)


def test_class_balanced_recipe_is_not_inverse_frequency_at_meld_counts():
    recipe = load_recipe("meld_cb_effective")
    weights = make_loss(recipe.loss, MELD_TRAIN_COUNTS, recipe.optim).weight.numpy()
    inverse = class_weights(MELD_TRAIN_COUNTS, "inverse", beta=0.0).numpy()
    spread, inverse_spread = weights.max() / weights.min(), inverse.max() / inverse.min()
    assert spread < 0.5 * inverse_spread  # beta 0.9999 gave 0.8 x: inverse frequency in all but name


def test_logit_adjusted_asks_more_of_rare_classes():
    loss = build_loss("logit_adjusted", COUNTS, tau=1.0, prior="per_corpus")
    zeros = torch.zeros(1, 4)
    ce = F.cross_entropy(zeros, torch.tensor([0]))
    assert loss(zeros, torch.tensor([3])) > ce > loss(zeros, torch.tensor([0]))


def test_normed_linear_gives_cosines():
    head = NormedLinear(torch.nn.Parameter(torch.randn(3, 8)), scale=1.0)
    x = torch.randn(5, 8)
    out = head(x)
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head(3 * x), out)


def test_build_loss_rejects_unknowns():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("dice", COUNTS)
    with pytest.raises(TypeError):
        build_loss("focal", COUNTS, gama=2.0)
    with pytest.raises(TypeError):
        build_loss("focal", COUNTS, gamma=2.0)  # the builder has no defaults: the recipe sets every parameter


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_builds_from_the_recipe_defaults_alone(name):
    assert set(LOSS_PARAMS) == set(LOSS_NAMES)
    assert torch.isfinite(recipe_loss(name, COUNTS)(torch.zeros(2, 4), torch.tensor([0, 3])))
