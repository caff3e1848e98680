"""The training loop: one recipe -> one run directory.

    session = build_session(recipe, run, data_dir, cache_dir)   # training/session.py: data, model, optimiser
    fit(session)        # epochs: sample turns, forward, loss, step; dev eval, checkpoint, early stopping
    finish(session)     # training/finish.py: best weights -> decoupled -> post-hoc bias -> temperature -> reports

Every epoch draws its randomness from (seed, epoch) alone, so a run resumed from the checkpoint of epoch k
continues exactly as the uninterrupted run would have. The library methods plug in at fixed points: the sampler
chooses the turns (training/datasets.py `plan_epoch`), augmentation mixes utterance embeddings (level 0) or
contextual features (level 1), the loss scores the emotion head, and decoupling / post-hoc corrections rewrite
the emotion classifier (so the exported graph carries them). Utterance-level mixing (level 0) pairs turns of the
same dialogue only: it happens before the context head, so a partner from another dialogue would put that
dialogue's content into every neighbour's context. BalanceMix draws its minority partners from the whole
training set (`minority_mix`): a second, minority-drawn batch of dialogues is encoded beside the step's own.

`Stepper` (one optimisation step) and `run_epoch` (one pass over an epoch's steps) take any inputs and loss:
retraining tier 3 trains on them with its own batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.network import EmotionModel
from training.augment import (
    draw_minority_dialogues,
    minority_mix,
    minority_partner_probs,
    minority_weights,
    mixup,
    recombine_modalities,
    smote,
)
from training.common import one_hot
from training.datasets import NO_LABEL, Batch, plan_epoch
from training.ensemble import teacher_probabilities
from training.finish import finish
from training.forward import Recombine, contextual_features, dev_selection, predict, report, utterance_embeddings
from training.losses import distillation_term, soft_cross_entropy, supervised_contrastive
from training.metrics import MetricsReport
from training.noise import partition_noisy_labels, per_sample_loss
from training.recipe import Recipe
from training.run import RunDir, load_model_state, model_state
from training.samplers import DevF1Sampler
from training.session import Session, build_session, checkpoint, seed_everything, start_epoch

T = TypeVar("T")


# ---- one optimisation step, one pass over an epoch ------------------------------------------------------------


@dataclass
class Stepper:
    """One optimisation step: backward through the (AMP) scaler, gradient clipping when `grad_clip` is set, the
    update, then the learning-rate schedule when there is one."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    grad_clip: float | None = None

    def __call__(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()


def run_epoch(
    steps: Sequence[T], loss_of: Callable[[T], Tensor], step: Stepper, desc: str = "", progress: bool = False
) -> dict[str, float]:
    """The loss of each step's inputs, then an optimisation step; returns the mean loss, steps and seconds."""
    total, start = 0.0, time.perf_counter()
    bar = tqdm(steps, desc=desc, unit="step", disable=not progress, leave=False)
    for inputs in bar:
        loss = loss_of(inputs)
        step(loss)
        value = loss.item()
        total += value
        bar.set_postfix(loss=f"{value:.3f}")
    return {"train_loss": total / max(len(steps), 1), "steps": len(steps), "epoch_seconds": time.perf_counter() - start}


# ---- one epoch of a session ------------------------------------------------------------------------------------


def train_epoch(s: Session, epoch: int) -> dict[str, float]:
    rng = seed_everything(s.recipe.train.seed, epoch)
    start_epoch(s, epoch)
    table, optim = s.tables["train"], s.recipe.optim
    plan = plan_epoch(table, s.state.labels, s.sampler, epoch, s.recipe.train.seed, optim.batch_dialogues)
    train_mode(s.model)
    step = Stepper(s.model, s.optimizer, s.scaler, s.scheduler, optim.grad_clip)
    desc = f"epoch {epoch + 1}/{optim.epochs}"
    return run_epoch(plan, functools.partial(_planned_loss, s, rng), step, desc, s.progress)


def _planned_loss(s: Session, rng: np.random.Generator, planned: tuple[np.ndarray, np.ndarray]) -> Tensor:
    """The training loss of one planned step: (dialogues, drawn turns)."""
    dialogues, draw = planned
    batch = s.collators["train"](dialogues, s.state.labels, draw).to(s.device)
    batch = modality_dropout(batch, s.recipe.train.modality_dropout, rng)
    minority = minority_batch(s, len(dialogues), rng) if s.recipe.augment.method == "balancemix" else None
    with torch.autocast(s.device.type, dtype=torch.float16, enabled=s.amp):
        return training_loss(s, batch, rng, minority)


def minority_batch(s: Session, k: int, rng: np.random.Generator) -> Batch:
    """BalanceMix's minority batch: `k` training dialogues drawn so that a turn picked from them (see
    `minority_partner_probs`) is any labelled training turn with probability ∝ 1 / its class's frequency."""
    labels, table = s.state.labels, s.tables["train"]
    dialogues = draw_minority_dialogues(table.dialogue_of, minority_weights(labels), k, rng)
    batch = s.collators["train"](dialogues, labels).to(s.device)
    return modality_dropout(batch, s.recipe.train.modality_dropout, rng)


def train_mode(model: EmotionModel) -> None:
    """Training mode, except the text encoder: its dropout triples the cost of a step on a CPU, and without it
    the cached states of its frozen bottom layers are exactly what the full encoder computes."""
    model.train()
    model.encoder.text.eval()


def modality_dropout(batch: Batch, p: float, rng: np.random.Generator) -> Batch:
    """Rows with both modalities lose one of them (either, equally likely) with probability p."""
    both = (batch.has_text & batch.has_audio).cpu().numpy()
    if p <= 0 or not both.any():
        return batch
    keep_text, keep_audio = kept_modalities(both, p, rng)
    device = batch.has_text.device
    return dataclasses.replace(
        batch,
        has_text=batch.has_text & torch.from_numpy(keep_text).to(device),
        has_audio=batch.has_audio & torch.from_numpy(keep_audio).to(device),
    )


def kept_modalities(both: np.ndarray, p: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row, whether its text and its audio stay: of the rows with `both`, a share p loses one of the two."""
    drop = both & (rng.random(len(both)) < p)
    drop_text = drop & (rng.random(len(both)) < 0.5)
    return ~drop_text, ~(drop & ~drop_text)


def choose_causal(mode: str, rng: np.random.Generator) -> bool:
    return mode == "causal" or (mode == "random" and bool(rng.random() < 0.5))


class Targets(NamedTuple):
    """Soft targets of some rows; mixing them mixes both tasks, and a mixed row keeps sentiment only if both
    of its sources have one. `corpus` (the logit-adjusted loss's prior) stays the base row's; `weight` (the
    emotion label's loss weight after label-noise handling) mixes like the labels."""

    emotion: Tensor  # [R, C]
    sentiment: Tensor  # [R, S]
    has_sentiment: Tensor  # [R] bool
    corpus: Tensor  # [R] index into the session's corpus_counts; -1: unknown (pooled prior)
    weight: Tensor  # [R] loss weight of the emotion label

    @classmethod
    def of(cls, s: Session, batch: Batch) -> Targets:
        rows = batch.rows.cpu().numpy()
        weights = s.state.label_weights
        weight = np.ones(len(rows), dtype=np.float32) if weights is None else weights[rows].astype(np.float32)
        device = batch.emotions.device
        return cls(
            one_hot(batch.emotions.clamp(min=0), s.num_emotions),
            one_hot(batch.sentiments.clamp(min=0), s.num_sentiments),
            batch.sentiments != NO_LABEL,
            torch.from_numpy(s.corpus_index[rows]).to(device),
            torch.from_numpy(weight).to(device),
        )

    def take(self, rows: Tensor) -> Targets:
        return Targets(*(t[rows] for t in self))

    def mixed(self, partner: Targets, lam: Tensor) -> Targets:
        lam1 = lam.to(self.emotion.dtype)
        lam = lam1[:, None]
        return Targets(
            lam * self.emotion + (1 - lam) * partner.emotion,
            lam * self.sentiment + (1 - lam) * partner.sentiment,
            self.has_sentiment & partner.has_sentiment,
            self.corpus,
            lam1 * self.weight + (1 - lam1) * partner.weight,
        )

    def extended(self, emotion: Tensor, sentiments: int) -> Targets:
        """New rows (SMOTE) with emotion targets only, weight 1 and no corpus."""
        n = len(emotion)
        return Targets(
            torch.cat([self.emotion, emotion]),
            torch.cat([self.sentiment, self.sentiment.new_zeros(n, sentiments)]),
            torch.cat([self.has_sentiment, self.has_sentiment.new_zeros(n)]),
            torch.cat([self.corpus, self.corpus.new_full((n,), -1)]),
            torch.cat([self.weight, self.weight.new_ones(n)]),
        )


def training_loss(s: Session, batch: Batch, rng: np.random.Generator, minority: Batch | None = None) -> Tensor:
    """Emotion loss (the recipe's, distilled when it has teachers) + the contrastive term + sentiment_weight x
    soft cross-entropy on rows with a sentiment label. `minority` is BalanceMix's minority batch (`minority_batch`)."""
    aug, model = s.recipe.augment, s.model
    level = int(rng.choice(aug.levels)) if aug.levels else None
    targets = Targets.of(s, batch)
    recombine = _recombiner(aug.cross_modal, rng) if aug.cross_modal > 0 else None
    embeddings = utterance_embeddings(model, batch, recombine)
    if level == 0:
        embeddings, targets = mix_within_dialogues(embeddings, targets, batch, rng, aug.alpha)
    causal = choose_causal(s.recipe.train.context, rng)
    features = contextual_features(model, batch, embeddings, causal)
    x, t = features[batch.draw], targets.take(batch.draw)
    extra = contrastive_term(s, features, batch)
    if level == 1:  # mix contextual features of the drawn turns (manifold mixup's second level)
        mixed = mixup(x, batch.emotions[batch.draw], s.num_emotions, rng, aug.alpha)
        x, t = mixed.x, t.mixed(t.take(mixed.partner), mixed.lam)
    elif aug.method == "balancemix" and minority is not None:
        x, t = _balance_mix(s, x, t, batch.emotions[batch.draw], minority, causal, rng)
    elif aug.method == "smote":
        x, t = _smote(x, t, batch.emotions[batch.draw], rng, aug.smote_k, s.num_sentiments)
    emotion_logits, sentiment_logits = model.head.classify(x)
    loss = s.loss(emotion_logits, t.emotion, groups=t.corpus, sample_weight=t.weight)
    loss = distilled(s, loss, emotion_logits, batch.rows[batch.draw], causal) + extra
    if t.has_sentiment.any():
        rows = t.has_sentiment
        loss = loss + s.recipe.train.sentiment_weight * soft_cross_entropy(sentiment_logits[rows], t.sentiment[rows])
    return loss


def distilled(s: Session, loss: Tensor, logits: Tensor, rows: Tensor, causal: bool) -> Tensor:
    """(1 − weight) x the recipe's loss + weight x the distillation term against the teachers (`Session.teachers`)
    on these training rows; the recipe's loss alone without teachers."""
    if s.teachers is None:
        return loss
    config = s.recipe.distill
    soft = distillation_term(logits, s.teachers[causal][rows], config.temperature)
    return (1 - config.weight) * loss + config.weight * soft


def contrastive_term(s: Session, features: Tensor, batch: Batch) -> Tensor:
    """The recipe's weight x SupCon over the classifier inputs of the drawn turns, each turn once (a turn the
    sampler drew twice would be its own positive)."""
    config = s.recipe.contrastive
    if config.weight == 0:
        return features.new_zeros(())
    rows = torch.unique(batch.draw)
    return config.weight * supervised_contrastive(features[rows], batch.emotions[rows], config.temperature)


def dialogue_of_rows(batch: Batch) -> Tensor:
    """[N] the dialogue (position in the batch) of each utterance row."""
    return torch.nonzero(batch.turn_mask)[:, 0]  # row-major over [B, T] = the batch's utterance order


def mix_within_dialogues(
    embeddings: Tensor, targets: Targets, batch: Batch, rng: np.random.Generator, alpha: float
) -> tuple[Tensor, Targets]:
    """Mixup of utterance embeddings (before the context head) among the labelled rows, each with a partner of
    its own dialogue, so the context any turn sees holds only its own dialogue's turns."""
    labelled = torch.nonzero(batch.emotions != NO_LABEL).squeeze(1)
    dialogue = dialogue_of_rows(batch)[labelled].cpu().numpy()
    mixed = mixup(embeddings[labelled], batch.emotions[labelled], targets.emotion.shape[1], rng, alpha, dialogue)
    embeddings = embeddings.index_put((labelled,), mixed.x)
    mixed_targets = targets.take(labelled).mixed(targets.take(labelled[mixed.partner]), mixed.lam)
    return embeddings, Targets(*(t.index_put((labelled,), m) for t, m in zip(targets, mixed_targets, strict=True)))


def _balance_mix(
    s: Session, x: Tensor, t: Targets, labels: Tensor, minority: Batch, causal: bool, rng: np.random.Generator
) -> tuple[Tensor, Targets]:
    """The drawn turns (the random batch) mixed with partners from the minority batch, encoded in context."""
    embeddings = utterance_embeddings(s.model, minority)
    pool = contextual_features(s.model, minority, embeddings, causal)
    weights = minority_weights(s.state.labels)[minority.rows.cpu().numpy()]  # 1 / frequency over the data set
    probs = minority_partner_probs(weights, dialogue_of_rows(minority).cpu().numpy())
    mixed = minority_mix(x, labels, s.num_emotions, rng, s.recipe.augment.alpha, pool, minority.emotions, probs)
    return mixed.x, t.mixed(Targets.of(s, minority).take(mixed.partner), mixed.lam)


def _recombiner(p: float, rng: np.random.Generator) -> Recombine:
    def recombine(text: Tensor, audio: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        swapped = recombine_modalities(text, audio, batch.emotions, rng, batch.has_text, batch.has_audio, p)
        return swapped.text, swapped.audio

    return recombine


def _smote(
    x: Tensor, t: Targets, labels: Tensor, rng: np.random.Generator, k: int, sentiments: int
) -> tuple[Tensor, Targets]:
    """SMOTE on the drawn turns' contextual features: synthetic rows up to the batch's largest class. They are
    interpolations of detached features, so they train the classifier only."""
    y = labels.cpu().numpy()
    new_x, new_y = smote(x.detach().float().cpu().numpy(), y, rng, k=k)
    extra = torch.from_numpy(new_x[len(y) :]).to(x.device, x.dtype)
    extra_y = one_hot(torch.from_numpy(new_y[len(y) :]).to(x.device), t.emotion.shape[1])
    return torch.cat([x, extra]), t.extended(extra_y, sentiments)


# ---- the epochs ------------------------------------------------------------------------------------------------


def fit(s: Session) -> None:
    """Epochs until the recipe's count or early stopping; a checkpoint after each."""
    train = s.recipe.train
    s.run.truncate_metrics(s.state.epoch)
    while _epochs_remain(s):
        epoch = s.state.epoch
        stats = train_epoch(s, epoch)
        if s.recipe.noise.enabled and epoch + 1 >= s.recipe.noise.warmup_epochs:
            s.state.labels, stats["noise"] = relabel(s)
        with _scored_weights(s, epoch):
            rows, dev = dev_selection(s)
            dev_report = report(s, s.tables["dev"].emotions[rows], dev.emotion)
            if isinstance(s.sampler, DevF1Sampler):
                s.sampler.update(dev_report)
            _track_best(s, epoch, getattr(dev_report, train.monitor) or 0.0)
        s.state.epoch = epoch + 1
        s.state.train_seconds += stats["epoch_seconds"]
        lr = s.scheduler.get_last_lr()[0]
        averaged = averaged_epochs(s, epoch + 1)
        s.run.append_metrics({"epoch": epoch, **stats, "lr": lr, "averaged": averaged, **_summary(dev_report)})
        s.run.save(checkpoint(s), s.run.last_checkpoint)
        if s.progress:
            tqdm.write(_epoch_line(s, epoch, stats, dev_report))


def averaged_epochs(s: Session, epochs_run: int) -> int:
    """How many of the first `epochs_run` epochs joined the weight average (recipe [swa]; 0 while it is off)."""
    start = s.recipe.swa.from_epoch
    return max(0, epochs_run - start) if start else 0


@contextlib.contextmanager
def _scored_weights(s: Session, epoch: int) -> Iterator[None]:
    """The weights dev selection scores after `epoch`: the model's own, or from `swa.from_epoch` on the running
    average with this epoch's weights folded in; the model's own are back afterwards, for the next epoch."""
    folded = averaged_epochs(s, epoch)
    if averaged_epochs(s, epoch + 1) == folded:  # this epoch does not join the average
        yield
        return
    own = model_state(s.model)
    s.average = fold_average(s.average, own, folded)
    load_model_state(s.model, s.average)
    try:
        yield
    finally:
        load_model_state(s.model, own)


def fold_average(average: dict[str, Tensor] | None, weights: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """The equal-weight mean of `count` earlier weights (`average`) and `weights`: SWA's running average
    w ← (w·n + w_new) / (n + 1). Integer buffers are not averaged; they keep the newest value."""
    if average is None or count == 0:
        return {k: v.clone() for k, v in weights.items()}
    return {
        k: average[k] + (v - average[k]) / (count + 1) if v.is_floating_point() else v.clone()
        for k, v in weights.items()
    }


def _epochs_remain(s: Session) -> bool:
    """False once the run has trained its last epoch or stopped early (an adopted run, a resumed finished fit)."""
    return s.state.epoch < s.recipe.optim.epochs and not s.state.stopped_early


def _track_best(s: Session, epoch: int, score: float) -> None:
    state, patience = s.state, s.recipe.train.patience
    if score > state.best + 1e-9:
        state.best, state.best_epoch, state.stale = score, epoch, 0
        s.run.save(model_state(s.model), s.run.best_model)
    else:
        state.stale += 1
        state.stopped_early = patience > 0 and state.stale >= patience


def relabel(s: Session) -> tuple[np.ndarray, dict[str, int]]:
    """Partition the given training labels (clean / relabel / ambiguous) from this epoch's per-sample losses; the
    labels to train on are returned and their loss weights set on the session (training/noise.py)."""
    noise, gold = s.recipe.noise, s.tables["train"].emotions
    logits = predict(s, "train", causal=False).emotion
    parts = partition_noisy_labels(
        per_sample_loss(logits, gold),
        gold,
        torch.softmax(logits, dim=1),
        clean_threshold=noise.clean_threshold,
        relabel_confidence=noise.relabel_confidence,
        seed=s.recipe.train.seed,
    )
    labels, s.state.label_weights = parts.training_labels(noise.ambiguous, dropped=NO_LABEL)
    return labels, {k: int(getattr(parts, k).sum()) for k in ("clean", "relabel", "ambiguous")}


def _summary(r: MetricsReport) -> dict[str, Any]:
    return {
        "dev_accuracy": r.accuracy,
        "dev_weighted_f1": r.weighted_f1,
        "dev_macro_f1": r.macro_f1,
        "dev_f1": dict(zip(r.labels, r.f1.round(4).tolist(), strict=True)),
    }


def _epoch_line(s: Session, epoch: int, stats: dict[str, Any], r: MetricsReport) -> str:
    best = " *" if s.state.best_epoch == epoch else ""
    return (
        f"epoch {epoch + 1}/{s.recipe.optim.epochs}: loss {stats['train_loss']:.4f}, dev macro F1 {r.macro_f1:.4f}, "
        f"weighted F1 {r.weighted_f1:.4f} ({stats['epoch_seconds']:.0f} s){best}"
    )


def train(
    recipe: Recipe, run: RunDir, data_dir: Path, cache_dir: Path | None, device: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) and finish one run; a finished run returns its stored summary."""
    run.prepare(recipe)
    if run.is_finished():
        return RunDir.read_json(run.final)
    session = build_session(recipe, run, data_dir, cache_dir, device, progress)
    if recipe.distill.teachers and _epochs_remain(session):
        session.teachers = teacher_probabilities(session)
    fit(session)
    return finish(session)


__all__ = ["train", "fit", "train_epoch", "run_epoch", "Stepper"]
