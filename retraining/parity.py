"""ONNX parity: the candidate's graphs under ONNX Runtime against the PyTorch reference they must match."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from model.artifact import ENCODER_FILE, ModelArtifact
from model.export import CONTEXT_OUTPUTS, eval_mode, example_context_inputs, example_encoder_inputs, to_feeds
from model.network import fuse_late
from model.preprocess import LATE_FLAGS
from retraining.graphs import FEATURES_OUTPUT, EmotionHead, session, with_features_output

Inputs = Mapping[str, torch.Tensor]


class ParityReference(Protocol):
    """What the candidate's graphs must compute, in PyTorch."""

    def context(self, inputs: Inputs) -> Sequence[np.ndarray]:
        """(emotion_logits, sentiment_logits) for context-graph inputs."""
        ...

    def encoder(self, inputs: Inputs) -> np.ndarray | None:
        """The utterance embedding; None when the encoder graph is the base model's, copied unchanged."""
        ...


class HeadReference:
    """A new emotion classifier on the base context graph's frozen features (tiers 1 and 2): the features come
    from the base graph, the classifier is applied in PyTorch, and in a late-fusion graph the fusion after it
    (model/network.py fuse_late) with the base's fusion weight."""

    def __init__(self, base: ModelArtifact, head: EmotionHead) -> None:
        self.graph = session(with_features_output(base.context_path))
        self.head = head
        self.late = base.late_fusion
        self.split = (int(base.config["embed_dim"]), len(base.config["emotions"]), LATE_FLAGS)
        self.fusion_weight = float(base.config.get("fusion_weight", 0.0))

    def context(self, inputs: Inputs) -> Sequence[np.ndarray]:
        features, sentiment = self.graph.run([FEATURES_OUTPUT, CONTEXT_OUTPUTS[1]], to_feeds(inputs))
        weight, bias = torch.tensor(self.head.weight), torch.tensor(self.head.bias)
        logits = torch.nn.functional.linear(torch.from_numpy(features), weight, bias)
        if self.late:
            _, evidence, flags = inputs["embeddings"].split(self.split, dim=-1)
            logits = fuse_late(logits, evidence, flags, self.fusion_weight)
        return logits.numpy(), sentiment

    def encoder(self, inputs: Inputs) -> np.ndarray | None:
        return None


class TorchReference:
    """A whole PyTorch model (tier 3)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def context(self, inputs: Inputs) -> Sequence[np.ndarray]:
        with eval_mode(self.model), torch.no_grad():
            return [t.numpy() for t in self.model.head(**inputs)[: len(CONTEXT_OUTPUTS)]]  # late: + text logits

    def encoder(self, inputs: Inputs) -> np.ndarray | None:
        with eval_mode(self.model), torch.no_grad():
            return self.model.encoder(**inputs).numpy()


def _context_probes(dim: int) -> list[dict[str, torch.Tensor]]:
    return [example_context_inputs(dim, batch=3, turns=5, causal=False), example_context_inputs(dim, 2, 4, True)]


def parity(candidate: ModelArtifact, reference: ParityReference, base: ModelArtifact) -> float:
    """The largest |PyTorch - ONNX Runtime| over the probe outputs (inf when a graph cannot run)."""
    try:
        graph = session(candidate.context_path)
        diffs = [
            float(np.abs(np.asarray(expected) - actual).max())
            for inputs in _context_probes(candidate.embed_dim)
            for expected, actual in zip(
                reference.context(inputs), graph.run(list(CONTEXT_OUTPUTS), to_feeds(inputs)), strict=True
            )
        ]
        probe = example_encoder_inputs(batch=3, tokens=5, samples=2321, seed=1)
        embedding = reference.encoder(probe)
        if embedding is None:
            if candidate.files[ENCODER_FILE].sha256 != base.files[ENCODER_FILE].sha256:
                return math.inf  # a changed encoder needs a reference to be checked against
        else:
            actual = session(candidate.encoder_path).run(["embedding"], to_feeds(probe))[0]
            diffs.append(float(np.abs(embedding - actual).max()))
    except Exception:  # noqa: BLE001 - a corrupted graph fails in ONNX Runtime in many ways; all mean "no parity"
        return math.inf
    return max(diffs) if all(np.isfinite(diffs)) else math.inf
