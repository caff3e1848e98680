"""Tier 2: decoupled, class-balanced retraining of the emotion classifier (cRT, Kang et al. 2020).

The representation stays frozen: the base context graph turns the logged utterance embeddings (feedback rows in
their logged dialogues, single turns otherwise) and the base corpora's embeddings into the classifier's input
features, and a fresh linear classifier is trained on them with class-balanced sampling. The encoder graphs are
copied unchanged, the context graph gets the new classifier, and the temperature is refitted on the held-out split.
Minutes on a CPU; on `--engine ray` the training runs as a Ray task.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from retraining.dataset import FEEDBACK, filter_label_noise
from retraining.gate_config import config_from
from retraining.graphs import (
    FEATURES_OUTPUT,
    EmotionHead,
    run_context,
    session,
    with_features_output,
    write_head,
)
from retraining.parity import HeadReference
from retraining.queue import PermanentError
from retraining.steps import JobContext
from retraining.tiers import Draft, TierInputs, head_graphs, uniform_prior
from training.decoupled import retrain_classifier
from training.samplers import FrequencySampler

FEATURES_FILE, HEAD_FILE, COUNTS_FILE = "features.npy", "head.npz", "counts.json"


@dataclass(frozen=True)
class HeadTraining:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-2  # AdamW on one linear layer: small feedback sets converge within the epochs
    weight_decay: float = 5e-4
    seed: int = 0
    noise_filter: bool = False  # drop or relabel noisy feedback labels (training/noise.py) before training


def train_head(features: np.ndarray, labels: np.ndarray, num_classes: int, config: HeadTraining) -> EmotionHead:
    """cRT on frozen features: a fresh linear classifier, class-balanced sampling. Pure, so Ray can run it."""
    linear = retrain_classifier(
        torch.from_numpy(features),
        torch.from_numpy(labels),
        num_classes,
        sampler=FrequencySampler(0.0),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )
    return EmotionHead(linear.weight.detach().numpy().copy(), linear.bias.detach().numpy().copy())


def _features(out: Path, inputs: TierInputs) -> None:
    graph = session(with_features_output(inputs.base.context_path))
    (features,) = run_context(graph, inputs.data.dialogues(), [FEATURES_OUTPUT])
    np.save(out / FEATURES_FILE, features.astype(np.float32))


def _fit(features: np.ndarray, labels: np.ndarray, inputs: TierInputs, config: HeadTraining) -> EmotionHead:
    args = (features, labels, len(inputs.base.emotions), config)
    if inputs.engine == "ray":
        from retraining.ray_engine import run_task

        return run_task(train_head, args, params=inputs.params)
    return train_head(*args)


def denoised(features: np.ndarray, labels: np.ndarray, inputs: TierInputs, config: HeadTraining) -> np.ndarray:
    """A first cRT pass on every label scores them; noisy feedback labels are then relabelled or dropped
    (training/noise.py). The collapsed base classifier would wrongly flag the minority labels it misses."""
    rows = labels >= 0
    first = _fit(features[rows], labels[rows], inputs, config)
    logits = features @ first.weight.T + first.bias
    feedback = inputs.data.labelled(heldout=False, source=FEEDBACK)
    return filter_label_noise(logits, labels, feedback & rows, config.seed)


def _train(out: Path, inputs: TierInputs, features_dir: Path, config: HeadTraining) -> None:
    features = np.load(features_dir / FEATURES_FILE)
    labels = np.where(inputs.data.labelled(heldout=False), inputs.data.labels, -1)
    if config.noise_filter:
        labels = denoised(features, labels, inputs, config)
    rows = labels >= 0
    if not rows.any():
        raise PermanentError("tier 2 has no labelled training turns")
    head = _fit(features[rows], labels[rows], inputs, config)
    np.savez(out / HEAD_FILE, weight=head.weight, bias=head.bias)
    write_head(inputs.base.context_path, out / "context.onnx", head)
    counts = np.bincount(labels[rows], minlength=len(inputs.base.emotions)).tolist()
    (out / COUNTS_FILE).write_text(json.dumps(dict(zip(inputs.base.emotions.names, counts, strict=True))))


def build(ctx: JobContext, inputs: TierInputs) -> Draft:
    config = config_from(HeadTraining, inputs.params.get("head"), "head training settings")
    features_dir = ctx.step("features", lambda out: _features(out, inputs))
    head_dir = ctx.step("head", lambda out: _train(out, inputs, features_dir, config))
    with np.load(head_dir / HEAD_FILE) as arrays:
        head = EmotionHead(arrays["weight"], arrays["bias"])
    counts = json.loads((head_dir / COUNTS_FILE).read_text())
    ctx.log(f"tier 2: classifier retrained on labelled turns {counts}")
    return Draft(
        graphs=head_graphs(inputs.base, head_dir / "context.onnx"),
        reference=HeadReference(inputs.base, head),
        recipe={
            "tier": 2,
            "method": "cRT: class-balanced sampling on frozen context features",
            "training_counts": counts,
            **asdict(config),
        },
        class_prior=uniform_prior(inputs.base),
    )
