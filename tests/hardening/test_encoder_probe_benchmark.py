"""benchmarks/encoder_probe.py: its embeddings are the product encoder's, and C is chosen on dev, not on test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.encoder_probe import C_GRID, Encoder, Split, encode, encoder_name, probe
from model.labels import EMOTIONS
from model.text_encoder import TextEncoder, load_tokenizer, pretrained_dir


def test_the_probe_embeds_a_text_as_the_product_encoder_pools_it_normalised() -> None:
    texts = ["Oh my God, you scared me!", "Fine.", "I can't believe you did that to me, Ross."]
    probed = encode(Encoder.load(pretrained_dir()), texts, "test")
    tokenizer = load_tokenizer()
    batch = tokenizer.encode_batch(texts)
    ids = torch.tensor([b.ids for b in batch])
    mask = torch.tensor([b.attention_mask for b in batch])
    with torch.inference_mode():
        product = torch.nn.functional.normalize(TextEncoder.pretrained().eval()(ids, mask), dim=-1).numpy()
    np.testing.assert_allclose(probed, product, atol=1e-5)
    assert encoder_name(pretrained_dir()) == "all-MiniLM-L6-v2 (pinned)"


def _clusters(rng: np.random.Generator, n: int, flip: float = 0.0) -> Split:
    labels = rng.integers(0, len(EMOTIONS), n)
    centres = np.eye(len(EMOTIONS), 16)
    embeddings = centres[labels] + 0.2 * rng.normal(size=(n, 16))
    shown = np.where(rng.random(n) < flip, rng.integers(0, len(EMOTIONS), n), labels)
    return Split(embeddings.astype(np.float32), shown)


@pytest.mark.parametrize("balanced", [False, True])
def test_the_probe_reports_test_for_the_c_that_dev_chose(balanced: bool) -> None:
    rng = np.random.default_rng(0)
    splits = {"train": _clusters(rng, 700), "dev": _clusters(rng, 300), "test": _clusters(rng, 300, flip=0.5)}
    result = probe(splits, balanced)
    assert result.c in C_GRID and result.weights == ("balanced" if balanced else "plain")
    assert result.dev_macro_f1 > 0.95  # separable clusters
    assert 0.3 < result.test.macro_f1 < 0.8  # half of test's labels were redrawn: reported as measured, not tuned
