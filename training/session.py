"""The session of a run: everything the loop works with (data, model, optimiser, library methods), built from a
recipe, and its checkpoint: what a resumed run restores."""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from model.context_input import EncoderInput, context_inputs
from model.network import EmotionModel
from model.text_encoder import load_tokenizer
from training.common import class_counts
from training.datasets import (
    Collator,
    TextSource,
    TurnTable,
    frozen_layers,
    load_tables,
    load_waveforms,
    text_states,
)
from training.datasets import text_features as cached_text_features
from training.losses import ImbalanceLoss
from training.recipe import ContextInputConfig, OptimConfig, Recipe, SwaConfig, make_loss, make_sampler
from training.run import RunDir, load_model_state, model_state
from training.samplers import ClassShareSampler, DevF1Sampler


@dataclass
class LoopState:
    """What the loop itself must carry across a restart, beside the model and optimiser states."""

    epoch: int = 0  # the next epoch to run
    best: float = -math.inf
    best_epoch: int = -1
    stale: int = 0  # epochs since the last improvement
    stopped_early: bool = False
    labels: np.ndarray | None = None  # training labels after label-noise handling (NO_LABEL = left out)
    label_weights: np.ndarray | None = None  # loss weight of each training label (None: all 1)
    sampler: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0


@dataclass
class Session:
    recipe: Recipe
    run: RunDir
    model: EmotionModel
    device: torch.device
    tables: dict[str, TurnTable]
    collators: dict[str, Collator]
    counts: np.ndarray  # training turns per emotion
    corpus_index: np.ndarray  # [train rows] index of each training turn's corpus in `corpus_counts`
    corpus_counts: np.ndarray  # [corpora, emotions] training turns per corpus and emotion
    loss: ImbalanceLoss
    sampler: ClassShareSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    state: LoopState
    progress: bool = True
    # distillation's teachers, {causal: [training turns, C]} (training/ensemble.py)
    teachers: dict[bool, torch.Tensor] | None = None
    # the running average of the weights at the end of the averaged epochs (recipe [swa]; training/loop.py)
    average: dict[str, torch.Tensor] | None = None

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.recipe.train.amp

    @property
    def described_device(self) -> str:
        """Where the run trains, as a model card says it: "one NVIDIA H100 80GB HBM3 (CUDA, mixed precision)"."""
        return describe_device(self.device, self.amp)

    @property
    def num_emotions(self) -> int:
        return len(self.recipe.model.emotions)

    @property
    def num_sentiments(self) -> int:
        return len(self.recipe.model.sentiments)

    @property
    def monitor_group(self) -> str:
        return "meld" if self.recipe.data.meld else "speech"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def describe_device(device: torch.device, amp: bool) -> str:
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} (CUDA{', mixed precision' if amp else ''})"
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"


def seed_everything(seed: int, *salt: int) -> np.random.Generator:
    """Seed torch (CPU and CUDA) from (seed, *salt) and return a numpy generator for the same stream."""
    state = np.random.SeedSequence([seed, *salt]).generate_state(2, dtype=np.uint64)
    torch.manual_seed(int(state[0]) & (2**63 - 1))
    return np.random.default_rng(int(state[1]))


def build_session(
    recipe: Recipe, run: RunDir, data_dir: Path, cache_dir: Path | None, device: str = "auto", progress: bool = True
) -> Session:
    """Data, model and optimiser of a run; restored from the run's last checkpoint when it has one."""
    seed_everything(recipe.train.seed)
    device_ = resolve_device(device if recipe.train.device == "auto" else recipe.train.device)
    tables = load_tables(data_dir, recipe.data, recipe.model)
    model = EmotionModel(recipe.model)
    collators = _collators(model, tables, recipe, cache_dir)
    counts = class_counts(tables["train"].emotions, len(recipe.model.emotions))
    corpus_index, corpus_counts = per_corpus_counts(tables["train"], len(recipe.model.emotions))
    optim = recipe.optim
    loss = make_loss(recipe.loss, corpus_counts, optim)
    model.head.emotion_head = loss.classifier(model.head.emotion_head)
    model.to(device_)
    optimizer = build_optimizer(model, lr=optim.lr, text_lr=optim.text_lr, weight_decay=optim.weight_decay)
    steps_per_epoch = math.ceil(tables["train"].num_dialogues / optim.batch_dialogues)
    session = Session(
        recipe=recipe,
        run=run,
        model=model,
        device=device_,
        tables=tables,
        collators=collators,
        counts=counts,
        corpus_index=corpus_index,
        corpus_counts=corpus_counts,
        loss=loss.to(device_),
        sampler=make_sampler(recipe.sampler, optim.epochs),
        optimizer=optimizer,
        scheduler=warmup_cosine(optimizer, optim, steps_per_epoch, recipe.swa),
        scaler=torch.amp.GradScaler(device_.type, enabled=device_.type == "cuda" and recipe.train.amp),
        state=LoopState(labels=tables["train"].emotions.copy()),
        progress=progress,
    )
    if run.has_checkpoint():
        restore(session, run.load(run.last_checkpoint))
    return session


def per_corpus_counts(table: TurnTable, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus index of each row, [corpora, classes] counts), corpora in order of first appearance."""
    names = list(dict.fromkeys(table.corpus))
    index = np.array([names.index(c) for c in table.corpus], dtype=np.int64)
    counts = np.stack([class_counts(table.emotions[index == g], num_classes) for g in range(len(names))])
    return index, counts.reshape(len(names), num_classes)


def _collators(model: EmotionModel, tables: dict[str, TurnTable], recipe: Recipe, cache_dir: Path | None) -> dict:
    """The text encoder's frozen part runs once per data set (cached on disk), never in the epochs: a frozen
    encoder gives pooled outputs, a partly trainable one the states entering its first trainable layer."""
    text, tokenizer = model.encoder.text, load_tokenizer(max_length=recipe.model.max_tokens)
    frozen = frozen_layers(text)
    collators = {}
    for split, table in tables.items():
        inputs = encoder_inputs(table, recipe.context_input, tokenizer)
        if frozen == text.num_layers:
            source: TextSource = cached_text_features(text, tokenizer, inputs, cache_dir)
        elif frozen > 0:
            source = text_states(text, tokenizer, inputs, cache_dir)
        else:
            source = tokenizer
        waves = load_waveforms(table.audio, recipe.data.max_audio_seconds, cache_dir)
        collators[split] = Collator(table, source, waves, inputs)
    return collators


def encoder_inputs(table: TurnTable, config: ContextInputConfig, tokenizer: Tokenizer) -> Sequence[EncoderInput]:
    """Each turn's text, or with `[context_input]` on, the turn with its earlier turns (model/context_input.py)."""
    if not config.tokens:
        return table.texts
    return context_inputs(table.texts, table.speakers, table.starts, tokenizer, config.tokens, config.turns)


def build_optimizer(model: EmotionModel, lr: float, text_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; the pretrained text layers get their own (small) learning rate."""
    text = [p for p in model.encoder.text.parameters() if p.requires_grad]
    text_ids = {id(p) for p in model.encoder.text.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]
    groups = [{"params": rest, "lr": lr}]
    if text:
        groups.append({"params": text, "lr": text_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int, swa: SwaConfig | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule: linear warm-up over `optim.warmup_epochs`, then cosine decay to 0 at the last step;
    or, with `optim.lr_drop_epoch` k > 0, the step schedule: constant after the warm-up, times
    `optim.lr_drop_factor` from epoch k on (`start_epoch` tells it the epoch; LDAM-DRW re-weights from the same
    call); or, with weight averaging on (`swa`), the cosine decays to `swa.lr_factor` at the first averaged epoch
    and stays there (Izmailov et al.'s constant averaging rate)."""
    steps = optim.epochs * steps_per_epoch
    warmup = optim.warmup_epochs * steps / optim.epochs
    if optim.lr_drop_epoch:
        factor: Callable[[int], float] = StepDrop(warmup, optim.lr_drop_epoch, optim.lr_drop_factor)
    elif swa is not None and swa.from_epoch:
        factor = _warmup_cosine(warmup, swa.from_epoch * steps_per_epoch, floor=swa.lr_factor)
    else:
        factor = _warmup_cosine(warmup, steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepDrop:
    """Warm-up, then 1, then `drop_factor` once the epoch reaches `drop_epoch`. An object, not a closure, so the
    scheduler's state (and a checkpoint) carries the epoch."""

    warmup: float
    drop_epoch: int
    drop_factor: float
    epoch: int = 0

    def __call__(self, step: int) -> float:
        warm = (step + 1) / (self.warmup + 1) if step < self.warmup else 1.0
        return warm * (self.drop_factor if self.epoch >= self.drop_epoch else 1.0)


def start_epoch(s: Session, epoch: int) -> None:
    """What follows the epoch number: the loss's schedule (LDAM's deferred re-weighting) and a step schedule's
    learning-rate drop, both switching at the first step of the epoch."""
    s.loss.set_epoch(epoch)
    scheduler = s.scheduler
    for group, base, factor in zip(s.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        if isinstance(factor, StepDrop):
            factor.epoch = epoch
            group["lr"] = base * factor(scheduler.last_epoch)


def _warmup_cosine(warmup: float, total: int, floor: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up, then cosine from 1 down to `floor` at step `total`, then `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))
        return floor + (1 - floor) * cosine

    return factor


# ---- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint(s: Session) -> dict[str, Any]:
    sampler_state = {"f1": s.sampler.f1} if isinstance(s.sampler, DevF1Sampler) else {}
    return {
        "model": model_state(s.model),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "scaler": s.scaler.state_dict(),
        "loop": dataclasses.asdict(dataclasses.replace(s.state, sampler=sampler_state)),
        "training_sha256": s.recipe.training_digest(),
        "average": s.average,
    }


def restore(s: Session, saved: dict[str, Any]) -> None:
    if saved["training_sha256"] != s.recipe.training_digest():
        raise RuntimeError(f"{s.run.last_checkpoint} was written by a recipe that trains differently")
    load_model_state(s.model, saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    s.scaler.load_state_dict(saved["scaler"])
    s.state = LoopState(**saved["loop"])
    s.average = saved.get("average")
    if isinstance(s.sampler, DevF1Sampler):
        s.sampler.f1 = s.state.sampler.get("f1")
