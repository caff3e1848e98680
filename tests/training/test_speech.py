"""The speech head's fit (folded into the model's AudioEmotionHead), its temperature, the clip pairing and the
fusion-weight rule, on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network import AudioEmotionHead
from training.speech import (
    CLASSES,
    NEUTRAL,
    MeldText,
    SpeechRecipe,
    choose_weight,
    fit_head,
    fit_temperature,
    macro_f1,
    paired_evidence,
    softmax,
    speaker_centred,
)


def blobs(n: int, features: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    centres = rng.normal(0, 3, (CLASSES, features))
    x = centres[y] + rng.normal(0, 1, (n, features)) + 50 * (np.arange(features) == 0)  # one huge channel
    return x.astype(np.float32), y


def test_fitted_head_is_exactly_the_models_head() -> None:
    x, y = blobs(350)
    head = fit_head(x, y, c=0.1)
    module = AudioEmotionHead(x.shape[1], CLASSES)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in head.state().items()})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.abs(head.logits(x) - expected).max() < 1e-3
    assert macro_f1(y, expected.argmax(1))[0] > 0.9


def test_stronger_regularisation_shrinks_the_weights() -> None:
    x, y = blobs(350)
    assert np.abs(fit_head(x, y, 0.001).weight).sum() < np.abs(fit_head(x, y, 1.0).weight).sum()


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4000, CLASSES))
    y = np.array([rng.choice(CLASSES, p=p) for p in softmax(logits)])
    assert fit_temperature(3.0 * logits, y) == pytest.approx(3.0, rel=0.1)


def test_speaker_centring_removes_each_speakers_mean() -> None:
    x, _ = blobs(40)
    speakers = np.array(["a", "b"] * 20)
    centred = speaker_centred(x, speakers)
    for s in ("a", "b"):
        assert np.abs(centred[speakers == s].mean(axis=0)).max() < 1e-4


def test_pairing_draws_congruent_and_neutral_clips() -> None:
    clip_y = np.repeat(np.arange(CLASSES), 3)
    evidence = np.eye(CLASSES)[clip_y] * 10
    turn_y = np.array([0, 1, 2, 3, 4, 5, 6, 3])
    congruent = paired_evidence(evidence, clip_y, turn_y, "congruent", 0)
    assert (congruent.argmax(1) == turn_y).all()
    assert (paired_evidence(evidence, clip_y, turn_y, "neutral", 0).argmax(1) == NEUTRAL).all()
    no_fear = paired_evidence(evidence[clip_y != 6], clip_y[clip_y != 6], turn_y, "congruent", 0)
    assert (no_fear[turn_y == 6] == 0).all()  # no clip of that emotion: the turn gets no audio


def test_weight_rule_respects_the_text_floor() -> None:
    """Congruent audio always helps more as w grows, neutral audio costs more: w stops at the floor."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, CLASSES, 600)
    text = MeldText(np.eye(CLASSES)[y] * 2 + rng.normal(0, 1.2, (600, CLASSES)), y, np.arange(600) // 6)
    onehot = np.eye(CLASSES) * 3
    evidence = {line: {"congruent": onehot[y], "neutral": onehot[np.full(600, NEUTRAL)]} for line in ("clean", "mulaw")}
    recipe = SpeechRecipe()
    w, base, curve = choose_weight(text, evidence, recipe)
    at = {row["w"]: row for row in curve}
    assert at[w]["clean/neutral"] >= base - recipe.text_floor
    larger = [row for row in curve if row["w"] > w]
    assert all(row["clean/neutral"] < base - recipe.text_floor for row in larger)
    assert 0 < w < 1
