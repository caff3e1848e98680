"""How much emotion a frozen sentence encoder's embeddings carry: a linear probe on MELD, no context, no fine-tuning.

    python -m benchmarks.encoder_probe --data-dir ../shared/data [--encoder DIR ...] [--threads 1]

A cheap look at a candidate encoder before anyone trains with it (docs/TRAINING.md, "A 12-layer encoder"). Each
encoder directory (a sentence-transformers layout: config.json, model.safetensors, the tokenizer) encodes MELD
train, dev and test; the embedding is the mean of the last layer's token states (the product's `mean_pool`),
L2-normalised as sentence-transformers' all-* models are used. A logistic regression is fitted on train, plainly
and with class-balanced weights; its inverse regularisation C is chosen on dev macro F1, and test is reported for
that C only. Without --encoder, the product's pinned all-MiniLM-L6-v2 is probed. The printed sha256 of each
weights file says which weights were measured.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.files import sha256_file
from core.settings import data_dir_or_exit
from model.data.meld import read_utterances
from model.labels import EMOTIONS
from model.text_encoder import MAX_TOKENS, mean_pool, pretrained_dir
from training.metrics import MetricsReport, compute_metrics

SPLITS = ("train", "dev", "test")
C_GRID = (0.3, 1.0, 3.0, 10.0)
BATCH = 64


@dataclass(frozen=True)
class Split:
    embeddings: np.ndarray  # [n, hidden], L2-normalised
    labels: np.ndarray  # indices into EMOTIONS


@dataclass(frozen=True)
class Probe:
    weights: str  # "plain" or "balanced"
    c: float
    dev_macro_f1: float
    test: MetricsReport


@dataclass(frozen=True)
class Encoder:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel

    @classmethod
    def load(cls, encoder_dir: Path) -> Encoder:
        return cls(AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir).eval())


def encode(encoder: Encoder, texts: Sequence[str], desc: str) -> np.ndarray:
    """Mean-pooled, L2-normalised last-layer states, batches of similar lengths."""
    tokenizer, model = encoder.tokenizer, encoder.model
    order = np.argsort([len(text) for text in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="utt") as bar:
        for start in range(0, len(texts), BATCH):
            rows = order[start : start + BATCH]
            batch = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            bar.update(len(rows))
    return out


def encode_meld(encoder_dir: Path, data_dir: Path) -> tuple[dict[str, Split], float]:
    """Every MELD split encoded, and the seconds it took."""
    start = time.perf_counter()
    encoder = Encoder.load(encoder_dir)
    splits = {}
    for split in SPLITS:
        utterances = read_utterances(data_dir, split)
        embeddings = encode(encoder, [u.text for u in utterances], f"{encoder_name(encoder_dir)} {split}")
        splits[split] = Split(embeddings, np.array([EMOTIONS.index(u.emotion) for u in utterances]))
    return splits, time.perf_counter() - start


def probe(splits: dict[str, Split], balanced: bool) -> Probe:
    """The logistic regression whose C has the best dev macro F1, and its test report."""
    train, dev, test = (splits[name] for name in SPLITS)
    weights = "balanced" if balanced else None
    fitted = [
        LogisticRegression(C=c, max_iter=3000, class_weight=weights).fit(train.embeddings, train.labels) for c in C_GRID
    ]
    dev_scores = [compute_metrics(dev.labels, model.predict(dev.embeddings), EMOTIONS).macro_f1 for model in fitted]
    best = int(np.argmax(dev_scores))
    report = compute_metrics(test.labels, fitted[best].predict(test.embeddings), EMOTIONS)
    return Probe("balanced" if balanced else "plain", C_GRID[best], dev_scores[best], report)


def encoder_name(encoder_dir: Path) -> str:
    """The product's pinned encoder by its name (its package keeps it in a directory called `model`)."""
    return "all-MiniLM-L6-v2 (pinned)" if encoder_dir.resolve() == pretrained_dir() else encoder_dir.name


def table_row(name: str, result: Probe, seconds: float) -> str:
    per_class = " | ".join(f"{100 * f1:.1f}" for f1 in result.test.f1)
    return (
        f"| {name} | {result.weights} | {result.c:g} | {100 * result.dev_macro_f1:.1f} | "
        f"{100 * result.test.weighted_f1:.1f} | {100 * result.test.macro_f1:.1f} | {per_class} | {seconds:.0f} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--encoder", type=Path, action="append", help="sentence-transformers directory (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    data_dir = data_dir_or_exit(args.data_dir)
    torch.set_num_threads(args.threads)
    header = " | ".join(name[:3].capitalize() for name in EMOTIONS)
    lines = [
        f"| encoder | weights | C | dev macro F1 | test weighted F1 | test macro F1 | {header} | encode s |",
        "|---|---|--:|--:|--:|--:|" + "--:|" * len(EMOTIONS) + "--:|",
    ]
    for encoder_dir in args.encoder or [pretrained_dir()]:
        print(f"{encoder_dir}: model.safetensors sha256 {sha256_file(encoder_dir / 'model.safetensors')}")
        splits, seconds = encode_meld(encoder_dir, data_dir)
        lines += [table_row(encoder_name(encoder_dir), probe(splits, balanced), seconds) for balanced in (False, True)]
    print(f"MELD, frozen encoders, linear probe; {args.threads} torch thread(s); % F1")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
