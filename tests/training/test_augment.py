import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.augment import (
    draw_minority_dialogues,
    manifold_mixup,
    minority_mix,
    minority_partner_probs,
    minority_weights,
    mixup,
    recombine_modalities,
    smote,
)


def _batch(n: int = 64, dim: int = 6, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def _assert_convex(mixed, x, y_soft, pool_x, pool_soft):
    lam = mixed.lam.view(-1, 1)
    assert ((mixed.lam >= 0) & (mixed.lam <= 1)).all()
    torch.testing.assert_close(mixed.x, lam * x + (1 - lam) * pool_x[mixed.partner])
    torch.testing.assert_close(mixed.y, lam * y_soft + (1 - lam) * pool_soft[mixed.partner])
    torch.testing.assert_close(mixed.y.sum(dim=1), torch.ones(len(x)))


def test_mixup_is_a_convex_combination_with_soft_labels():
    x, y = _batch()
    mixed = mixup(x, y, 4, np.random.default_rng(0), alpha=0.4)
    soft = F.one_hot(y, 4).float()
    _assert_convex(mixed, x, soft, x, soft)
    assert sorted(mixed.partner.tolist()) == list(range(len(x)))  # a permutation of the batch
    assert (mixed.lam < 0.999).any()


def test_mixup_accepts_soft_labels_and_alpha_zero_is_identity():
    x, y = _batch()
    soft = torch.softmax(torch.randn(len(x), 4), dim=1)
    _assert_convex(mixup(x, soft, 4, np.random.default_rng(1), alpha=0.4), x, soft, x, soft)
    unchanged = mixup(x, y, 4, np.random.default_rng(1), alpha=0.0)
    torch.testing.assert_close(unchanged.x, x)


def test_manifold_mixup_mixes_the_hidden_state():
    x, y = _batch()
    torch.manual_seed(0)
    stages = [torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)]
    out, mixed = manifold_mixup(stages, x, y, 4, np.random.default_rng(2), alpha=2.0, mix_at=[2])
    hidden = stages[1](stages[0](x))
    _assert_convex(mixed, hidden, F.one_hot(y, 4).float(), hidden, F.one_hot(y, 4).float())
    torch.testing.assert_close(out, stages[2](mixed.x))


def test_balancemix_partners_come_from_the_data_set_by_inverse_frequency_and_the_random_sample_leads():
    rng = np.random.default_rng(3)
    counts = [900, 80, 20]
    pool_y = torch.as_tensor(np.repeat(np.arange(3), counts))
    pool_x = torch.randn(len(pool_y), 6)
    x, y = pool_x[:512], pool_y[:512]  # a random batch holding only the majority class
    mixed = minority_mix(x, y, 3, rng, alpha=1.0, pool_x=pool_x, pool_y=pool_y, pool_p=minority_weights(pool_y))
    soft, pool_soft = F.one_hot(y, 3).float(), F.one_hot(pool_y, 3).float()
    _assert_convex(mixed, x, soft, pool_x, pool_soft)
    assert (mixed.lam >= 0.5).all() and (mixed.lam < 0.9).any()  # the random sample gets max(λ, 1 − λ)
    partner_shares = np.bincount(pool_y[mixed.partner].numpy(), minlength=3) / len(x)
    np.testing.assert_allclose(partner_shares, 1 / 3, atol=0.07)


def test_minority_dialogues_give_every_turn_its_inverse_frequency_probability():
    """Drawing k dialogues ∝ their summed weights, then a partner among their turns, draws each turn of the
    whole data set with probability ∝ 1 / its class's frequency."""
    labels = np.array([0, 0, 0, 1, 0, 0, 2, 0, 1, 0, -1, 0])
    dialogue_of = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4])
    weights = minority_weights(labels)
    assert weights[10] == 0 and weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.bincount(labels[labels >= 0], weights=weights[labels >= 0]), 1 / 3)
    rng, hits, draws = np.random.default_rng(0), np.zeros(len(labels)), 20000
    for _ in range(draws):
        dialogues = draw_minority_dialogues(dialogue_of, weights, 3, rng)
        rows = np.concatenate([np.flatnonzero(dialogue_of == d) for d in dialogues])
        slot = np.repeat(np.arange(3), [np.sum(dialogue_of == d) for d in dialogues])
        probs = minority_partner_probs(weights[rows], slot)
        assert probs.sum() == pytest.approx(1.0)
        hits[rows[rng.choice(len(rows), p=probs)]] += 1
    np.testing.assert_allclose(hits / draws, weights, atol=0.01)


def test_mixup_within_groups_pairs_only_members_of_a_group():
    x, y = _batch(n=40)
    groups = np.repeat([3, 0, 7, 1], [12, 1, 20, 7])
    mixed = mixup(x, y, 4, np.random.default_rng(4), alpha=1.0, groups=groups)
    partner = mixed.partner.numpy()
    assert (groups[partner] == groups).all()
    assert sorted(partner.tolist()) == list(range(len(x)))
    assert partner[12] == 12  # a group of one has no one else to mix with
    assert (partner != np.arange(len(x))).sum() > 30


def test_the_loops_utterance_mixup_never_crosses_dialogues():
    """Level-0 mixup runs before the context head: a partner from another dialogue would leak that dialogue
    into every neighbour's context, so partners come from the same dialogue."""
    from training.datasets import Collator, TurnTable
    from training.loop import Targets, dialogue_of_rows, mix_within_dialogues

    starts = np.array([0, 4, 5, 11])
    emotions = np.array([0, 1, 2, -1, 3, 0, 0, 1, 2, 3, 1])
    table = TurnTable("train", ("meld",) * 11, ("x",) * 11, (None,) * 11, np.zeros(11, int), emotions,
                      np.zeros(11, int), starts)  # fmt: skip
    batch = Collator(table, torch.randn(11, 5), [None] * 11)([0, 1, 2])
    embeddings = torch.eye(11)  # row i is the unit vector i: a mix shows which rows it took
    n = len(emotions)
    targets = Targets(F.one_hot(batch.emotions.clamp(min=0), 4).float(), torch.zeros(n, 3),
                      torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), torch.ones(n))  # fmt: skip
    mixed, mixed_targets = mix_within_dialogues(embeddings, targets, batch, np.random.default_rng(5), alpha=1.0)
    dialogue = dialogue_of_rows(batch).numpy()
    np.testing.assert_array_equal(dialogue, table.dialogue_of)
    sources = [set(np.flatnonzero(mixed[row].numpy() > 1e-6).tolist()) for row in range(n)]
    assert all(dialogue[list(used)].tolist() == [dialogue[row]] * len(used) for row, used in enumerate(sources))
    assert sources[3] == {3} and sources[4] == {4}  # unlabelled, and alone in its dialogue
    assert sum(len(used) == 2 for used in sources) >= 6  # the others did mix
    torch.testing.assert_close(mixed_targets.emotion.sum(dim=1), torch.ones(n))


def _on_a_segment(point: np.ndarray, members: np.ndarray) -> bool:
    for a, b in itertools.combinations(members, 2):
        t = np.dot(point - a, b - a) / np.dot(b - a, b - a)
        if -1e-9 <= t <= 1 + 1e-9 and np.linalg.norm(a + t * (b - a) - point) < 1e-9:
            return True
    return False


def test_smote_reaches_target_counts_with_points_between_class_mates():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1, 2], [60, 12, 1])
    x = rng.normal(size=(len(y), 5)) + 10 * y[:, None]
    x_res, y_res = smote(x, y, np.random.default_rng(5), k=3)
    np.testing.assert_array_equal(np.bincount(y_res), [60, 60, 60])
    np.testing.assert_array_equal(x_res[: len(x)], x)  # originals first, untouched
    new_x, new_y = x_res[len(x) :], y_res[len(x) :]
    for point in new_x[new_y == 1][:20]:
        assert _on_a_segment(point, x[y == 1])
        assert not _on_a_segment(point, x[y == 0])
    np.testing.assert_allclose(new_x[new_y == 2], np.repeat(x[y == 2], 59, axis=0))  # one sample: copies
    x2, y2 = smote(x, y, np.random.default_rng(5), k=5, target={2: 5})
    np.testing.assert_array_equal(np.bincount(y2), [60, 12, 5])


def test_cross_modal_recombination_swaps_audio_within_class_only():
    rng = np.random.default_rng(6)
    n = 40
    labels = torch.as_tensor(rng.integers(0, 3, n))
    text = torch.randn(n, 4)
    audio = torch.arange(n, dtype=torch.float32).view(-1, 1).repeat(1, 3)  # row id encoded in the values
    has_audio = torch.as_tensor(rng.random(n) < 0.7)
    out = recombine_modalities(text, audio, labels, rng, has_audio=has_audio)
    source = out.source.numpy()
    torch.testing.assert_close(out.audio, audio[out.source])
    assert out.text is text and out.labels is labels
    assert (labels[out.source] == labels).all()
    assert (source[~has_audio.numpy()] == np.flatnonzero(~has_audio.numpy())).all()
    assert has_audio[out.source].equal(has_audio)
    assert sorted(source.tolist()) == list(range(n))  # a permutation: every audio embedding used once
    assert (source != np.arange(n)).sum() > n // 3


def test_recombination_probability_zero_changes_nothing():
    labels = torch.tensor([0, 0, 1, 1])
    out = recombine_modalities(torch.randn(4, 2), torch.randn(4, 2), labels, np.random.default_rng(0), p=0.0)
    assert out.source.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_mixup_lambda_spread_follows_alpha(alpha):
    x, y = _batch(n=4000)
    lam = mixup(x, y, 4, np.random.default_rng(7), alpha=alpha).lam.numpy()
    assert lam.mean() == pytest.approx(0.5, abs=0.03)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.15)  # variance of Beta(α, α)
