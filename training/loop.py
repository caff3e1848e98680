"""The training loop: one recipe -> one run directory.

    session = build_session(recipe, run, data_dir, cache_dir)   # data, model, optimiser, library methods
    fit(session)        # epochs: sample turns, forward, loss, step; dev eval, checkpoint, early stopping
    finish(session)     # best weights -> decoupled stage -> post-hoc bias -> temperature -> reports

Every epoch draws its randomness from (seed, epoch) alone, so a run resumed from the checkpoint of epoch k
continues exactly as the uninterrupted run would have. The library methods plug in at fixed points: the sampler
chooses the turns (training/datasets.py `plan_epoch`), augmentation mixes utterance embeddings (level 0) or
contextual features (level 1), the loss scores the emotion head, and decoupling / post-hoc corrections rewrite
the emotion classifier (so the exported graph carries them).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm
from transformers.masking_utils import create_bidirectional_mask

from model.network import EmotionModel, UtteranceEncoder
from model.text_encoder import TextEncoder, load_tokenizer, mean_pool
from training.augment import minority_mix, mixup, recombine_modalities, smote
from training.calibration import apply_temperature, fit_estimation_weights, fit_temperature
from training.common import class_counts, one_hot
from training.datasets import (
    NO_LABEL,
    Batch,
    Collator,
    TextSource,
    TurnTable,
    eval_steps,
    frozen_layers,
    load_tables,
    load_waveforms,
    plan_epoch,
    text_states,
)
from training.datasets import text_features as cached_text_features
from training.decoupled import retrain_classifier, select_tau, tau_normalize
from training.losses import ImbalanceLoss, build_loss, soft_cross_entropy
from training.metrics import MetricsReport, compute_metrics, minority_classes
from training.noise import partition_noisy_labels, per_sample_loss
from training.plots import plot_confusion, plot_per_class
from training.posthoc import logit_adjustment, tune_class_biases, tune_logit_adjustment
from training.recipe import Recipe, make_sampler
from training.run import RunDir, load_model_state, model_state
from training.samplers import DevF1Sampler, build_sampler

MODES = {"bidirectional": False, "causal": True}


# ---- the forward pass, piece by piece --------------------------------------------------------------------------


def encode_text(text: TextEncoder, mask: Tensor, ids: Tensor | None = None, states: Tensor | None = None,
                chunk: int = 32) -> Tensor:  # fmt: skip
    """Pooled text of every row from token ids, or from `states` entering the first trainable layer; run in
    chunks of similar length (a dialogue batch mixes 3- and 60-token turns)."""
    lengths = mask.sum(dim=1)
    order = lengths.argsort()
    parts = []
    for rows in order.split(chunk):
        width = int(lengths[rows].max().clamp(min=1))
        m = mask[rows, :width]
        parts.append(text(ids[rows, :width], m) if states is None else top_layers(text, states[rows, :width], m))
    return torch.cat(parts)[order.argsort()]


def top_layers(text: TextEncoder, states: Tensor, mask: Tensor) -> Tensor:
    """The trainable top layers of the text encoder + its mean pooling, from cached bottom-layer states."""
    allowed = create_bidirectional_mask(config=text.bert.config, inputs_embeds=states, attention_mask=mask)
    for layer in text.bert.encoder.layer[frozen_layers(text) :]:
        states = layer(states, allowed)
    return mean_pool(states, mask)


def fuse(encoder: UtteranceEncoder, text: Tensor, audio: Tensor, has_text: Tensor, has_audio: Tensor) -> Tensor:
    """UtteranceEncoder.forward after its two encoders (kept in step with it by a test): the loop feeds cached
    text and runs the audio encoder only on rows that have audio."""
    text = torch.where(has_text[:, None], encoder.text_proj(text), encoder.missing_text)
    speech = torch.where(has_audio[:, None], encoder.audio_proj(audio), encoder.missing_audio)
    gate = torch.sigmoid(encoder.gate(torch.cat([text, speech], dim=-1)))
    return encoder.norm(encoder.drop(gate * text + (1 - gate) * speech))


Recombine = Callable[[Tensor, Tensor, Batch], tuple[Tensor, Tensor]]


def utterance_embeddings(model: EmotionModel, batch: Batch, recombine: Recombine | None = None) -> Tensor:
    """[N, D] fused embedding of every utterance of the batch."""
    encoder = model.encoder
    if batch.text_features is not None:
        text = batch.text_features
    else:
        text = encode_text(encoder.text, batch.attention_mask, batch.input_ids, batch.text_states)
    audio = text.new_zeros(len(text), encoder.audio.dim)
    if len(batch.audio_rows):
        audio = audio.index_put((batch.audio_rows,), encoder.audio(batch.audio, batch.audio_lengths).to(audio.dtype))
    if recombine is not None:
        text, audio = recombine(text, audio, batch)
    return fuse(encoder, text, audio, batch.has_text, batch.has_audio)


def contextual_features(model: EmotionModel, batch: Batch, embeddings: Tensor, causal: bool) -> Tensor:
    """[N, D] classifier input of every utterance: its embedding plus its dialogue context."""
    dialogues = embeddings[batch.turn_index]
    causal_flag = torch.tensor(causal, device=embeddings.device)
    features = model.head.contextualise(dialogues, batch.speakers, batch.turn_mask, causal_flag)
    return features[batch.turn_mask]  # row-major over [B, T] = the batch's utterance order


class Targets(NamedTuple):
    """Soft targets of some rows; mixing them mixes both tasks, and a mixed row keeps sentiment only if both
    of its sources have one."""

    emotion: Tensor  # [R, C]
    sentiment: Tensor  # [R, S]
    has_sentiment: Tensor  # [R] bool

    @classmethod
    def of(cls, batch: Batch, emotions: int, sentiments: int) -> Targets:
        has = batch.sentiments != NO_LABEL
        return cls(
            one_hot(batch.emotions.clamp(min=0), emotions), one_hot(batch.sentiments.clamp(min=0), sentiments), has
        )

    def take(self, rows: Tensor) -> Targets:
        return Targets(self.emotion[rows], self.sentiment[rows], self.has_sentiment[rows])

    def mixed(self, partner: Targets, lam: Tensor) -> Targets:
        lam = lam.to(self.emotion.dtype)[:, None]
        return Targets(
            lam * self.emotion + (1 - lam) * partner.emotion,
            lam * self.sentiment + (1 - lam) * partner.sentiment,
            self.has_sentiment & partner.has_sentiment,
        )

    def extended(self, emotion: Tensor, sentiments: int) -> Targets:
        """New rows (SMOTE) with emotion targets only."""
        n = len(emotion)
        return Targets(
            torch.cat([self.emotion, emotion]),
            torch.cat([self.sentiment, self.sentiment.new_zeros(n, sentiments)]),
            torch.cat([self.has_sentiment, self.has_sentiment.new_zeros(n)]),
        )


# ---- the session: everything a run works with ------------------------------------------------------------------


@dataclass
class LoopState:
    """What the loop itself must carry across a restart, beside the model and optimiser states."""

    epoch: int = 0  # the next epoch to run
    best: float = -math.inf
    best_epoch: int = -1
    stale: int = 0  # epochs since the last improvement
    stopped_early: bool = False
    labels: np.ndarray | None = None  # training labels after label-noise handling (NO_LABEL = left out)
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
    loss: ImbalanceLoss
    sampler: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    state: LoopState
    progress: bool = True

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.recipe.train.amp

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
    model.to(device_)
    counts = class_counts(tables["train"].emotions, len(recipe.model.emotions))
    optimizer = _optimizer(model, recipe)
    steps = recipe.optim.epochs * math.ceil(tables["train"].num_dialogues / recipe.optim.batch_dialogues)
    warmup = recipe.optim.warmup_epochs * steps / recipe.optim.epochs
    session = Session(
        recipe=recipe,
        run=run,
        model=model,
        device=device_,
        tables=tables,
        collators=collators,
        counts=counts,
        loss=build_loss(recipe.loss.name, counts, **recipe.loss.params).to(device_),
        sampler=make_sampler(recipe.sampler, recipe.optim.epochs),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, steps)),
        scaler=torch.amp.GradScaler(device_.type, enabled=device_.type == "cuda" and recipe.train.amp),
        state=LoopState(labels=tables["train"].emotions.copy()),
        progress=progress,
    )
    if run.has_checkpoint():
        restore(session, run.load(run.last_checkpoint))
    return session


def _collators(model: EmotionModel, tables: dict[str, TurnTable], recipe: Recipe, cache_dir: Path | None) -> dict:
    """The text encoder's frozen part runs once per data set (cached on disk), never in the epochs: a frozen
    encoder gives pooled outputs, a partly trainable one the states entering its first trainable layer."""
    text, tokenizer = model.encoder.text, load_tokenizer(max_length=recipe.model.max_tokens)
    frozen = frozen_layers(text)
    collators = {}
    for split, table in tables.items():
        if frozen == text.num_layers:
            source: TextSource = cached_text_features(text, tokenizer, table.texts, cache_dir)
        elif frozen > 0:
            source = text_states(text, tokenizer, table.texts, cache_dir)
        else:
            source = tokenizer
        waves = load_waveforms(table.audio, recipe.data.max_audio_seconds, cache_dir)
        collators[split] = Collator(table, source, waves)
    return collators


def _optimizer(model: EmotionModel, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; the pretrained text layers get their own (small) learning rate."""
    text = [p for p in model.encoder.text.parameters() if p.requires_grad]
    text_ids = {id(p) for p in model.encoder.text.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]
    groups = [{"params": rest, "lr": recipe.optim.lr}]
    if text:
        groups.append({"params": text, "lr": recipe.optim.text_lr})
    return torch.optim.AdamW(groups, weight_decay=recipe.optim.weight_decay)


def _warmup_cosine(warmup: float, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))

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
    }


def restore(s: Session, saved: dict[str, Any]) -> None:
    if saved["training_sha256"] != s.recipe.training_digest():
        raise RuntimeError(f"{s.run.last_checkpoint} was written by a recipe that trains differently")
    load_model_state(s.model, saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    s.scaler.load_state_dict(saved["scaler"])
    s.state = LoopState(**saved["loop"])
    if isinstance(s.sampler, DevF1Sampler):
        s.sampler.f1 = s.state.sampler.get("f1")


# ---- one epoch -------------------------------------------------------------------------------------------------


def train_epoch(s: Session, epoch: int) -> dict[str, float]:
    rng = seed_everything(s.recipe.train.seed, epoch)
    s.loss.set_epoch(epoch)
    table, optim = s.tables["train"], s.recipe.optim
    plan = plan_epoch(table, s.state.labels, s.sampler, epoch, s.recipe.train.seed, optim.batch_dialogues)
    train_mode(s.model)
    total, start = 0.0, time.perf_counter()
    bar = tqdm(plan, desc=f"epoch {epoch + 1}/{optim.epochs}", unit="step", disable=not s.progress, leave=False)
    for dialogues, draw in bar:
        batch = s.collators["train"](dialogues, s.state.labels, draw).to(s.device)
        batch = modality_dropout(batch, s.recipe.train.modality_dropout, rng)
        with torch.autocast(s.device.type, dtype=torch.float16, enabled=s.amp):
            loss = training_loss(s, batch, rng)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(s.optimizer)
        nn.utils.clip_grad_norm_(s.model.parameters(), optim.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        value = loss.item()
        total += value
        bar.set_postfix(loss=f"{value:.3f}")
    return {"train_loss": total / max(len(plan), 1), "steps": len(plan), "epoch_seconds": time.perf_counter() - start}


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
    drop = both & (rng.random(len(both)) < p)
    drop_text = drop & (rng.random(len(both)) < 0.5)
    device = batch.has_text.device
    return dataclasses.replace(
        batch,
        has_text=batch.has_text & torch.from_numpy(~drop_text).to(device),
        has_audio=batch.has_audio & torch.from_numpy(~(drop & ~drop_text)).to(device),
    )


def choose_causal(mode: str, rng: np.random.Generator) -> bool:
    return mode == "causal" or (mode == "random" and bool(rng.random() < 0.5))


def training_loss(s: Session, batch: Batch, rng: np.random.Generator) -> Tensor:
    """Emotion loss (the recipe's) + sentiment_weight x soft cross-entropy on rows with a sentiment label."""
    aug, model = s.recipe.augment, s.model
    level = int(rng.choice(aug.levels)) if aug.levels else None
    targets = Targets.of(batch, s.num_emotions, s.num_sentiments)
    recombine = _recombiner(aug.cross_modal, rng) if aug.cross_modal > 0 else None
    embeddings = utterance_embeddings(model, batch, recombine)
    if level == 0:  # mix utterance embeddings among the labelled rows, before the context head
        labelled = torch.nonzero(batch.emotions != NO_LABEL).squeeze(1)
        mixed = mixup(embeddings[labelled], batch.emotions[labelled], s.num_emotions, rng, aug.alpha)
        embeddings = embeddings.index_put((labelled,), mixed.x)
        mixed_targets = targets.take(labelled).mixed(targets.take(labelled[mixed.partner]), mixed.lam)
        targets = Targets(*(t.index_put((labelled,), m) for t, m in zip(targets, mixed_targets, strict=True)))
    features = contextual_features(model, batch, embeddings, choose_causal(s.recipe.train.context, rng))
    x, t = features[batch.draw], targets.take(batch.draw)
    if level == 1:  # mix contextual features of the drawn turns (manifold mixup's second level)
        mixed = mixup(x, batch.emotions[batch.draw], s.num_emotions, rng, aug.alpha)
        x, t = mixed.x, t.mixed(t.take(mixed.partner), mixed.lam)
    elif aug.method == "balancemix":  # partners drawn class-balanced from every labelled turn of the batch
        pool = torch.nonzero(batch.emotions != NO_LABEL).squeeze(1)
        mixed = minority_mix(x, batch.emotions[batch.draw], s.num_emotions, rng, aug.alpha, features[pool],
                             batch.emotions[pool])  # fmt: skip
        x, t = mixed.x, t.mixed(targets.take(pool[mixed.partner]), mixed.lam)
    elif aug.method == "smote":
        x, t = _smote(x, t, batch.emotions[batch.draw], rng, aug.smote_k, s.num_sentiments)
    emotion_logits, sentiment_logits = model.head.classify(x)
    loss = s.loss(emotion_logits, t.emotion)
    if t.has_sentiment.any():
        rows = t.has_sentiment
        loss = loss + s.recipe.train.sentiment_weight * soft_cross_entropy(sentiment_logits[rows], t.sentiment[rows])
    return loss


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


# ---- evaluation ------------------------------------------------------------------------------------------------


class Predictions(NamedTuple):
    emotion: Tensor  # [N, C] logits, table order (float32, CPU)
    sentiment: Tensor  # [N, S]
    features: Tensor  # [N, D] classifier inputs


@torch.inference_mode()
def predict(s: Session, split: str, causal: bool) -> Predictions:
    s.model.eval()
    collator, parts = s.collators[split], []
    for dialogues in eval_steps(s.tables[split], 4 * s.recipe.optim.batch_dialogues):
        batch = collator(dialogues).to(s.device)
        with torch.autocast(s.device.type, dtype=torch.float16, enabled=s.amp):
            features = contextual_features(s.model, batch, utterance_embeddings(s.model, batch), causal)
            emotion, sentiment = s.model.head.classify(features)
        parts.append([t.float().cpu() for t in (emotion, sentiment, features)])
    if not parts:
        empty = torch.zeros(0, s.num_emotions)
        return Predictions(empty, torch.zeros(0, s.num_sentiments), torch.zeros(0, s.model.config.embed_dim))
    return Predictions(*(torch.cat(column) for column in zip(*parts, strict=True)))


def report(s: Session, labels: np.ndarray, logits: Tensor, temperature: float = 1.0) -> MetricsReport:
    probs = torch.softmax(apply_temperature(logits, temperature), dim=1)
    minority = minority_classes(s.counts, s.recipe.model.emotions)
    return compute_metrics(labels, logits.argmax(dim=1), s.recipe.model.emotions, probs, minority)


def dev_selection(s: Session) -> tuple[np.ndarray, Predictions]:
    """Rows used for model selection and tuning: the monitored group of dev (MELD dev when MELD is trained)."""
    rows = s.tables["dev"].groups()[s.monitor_group]
    dev = predict(s, "dev", causal=False)
    return rows, Predictions(*(t[rows] for t in dev))


# ---- the epochs ------------------------------------------------------------------------------------------------


def fit(s: Session) -> None:
    """Epochs until the recipe's count or early stopping; a checkpoint after each."""
    train = s.recipe.train
    s.run.truncate_metrics(s.state.epoch)
    for epoch in range(s.state.epoch, s.recipe.optim.epochs):
        if s.state.stopped_early:
            break
        stats = train_epoch(s, epoch)
        if s.recipe.noise.enabled and epoch + 1 >= s.recipe.noise.warmup_epochs:
            s.state.labels, stats["noise"] = relabel(s)
        rows, dev = dev_selection(s)
        dev_report = report(s, s.tables["dev"].emotions[rows], dev.emotion)
        if isinstance(s.sampler, DevF1Sampler):
            s.sampler.update(dev_report)
        _track_best(s, epoch, getattr(dev_report, train.monitor) or 0.0)
        s.state.epoch = epoch + 1
        s.state.train_seconds += stats["epoch_seconds"]
        s.run.append_metrics({"epoch": epoch, **stats, "lr": s.scheduler.get_last_lr()[0], **_summary(dev_report)})
        s.run.save(checkpoint(s), s.run.last_checkpoint)
        if s.progress:
            tqdm.write(_epoch_line(s, epoch, stats, dev_report))


def _track_best(s: Session, epoch: int, score: float) -> None:
    state, patience = s.state, s.recipe.train.patience
    if score > state.best + 1e-9:
        state.best, state.best_epoch, state.stale = score, epoch, 0
        s.run.save(model_state(s.model), s.run.best_model)
    else:
        state.stale += 1
        state.stopped_early = patience > 0 and state.stale >= patience


def relabel(s: Session) -> tuple[np.ndarray, dict[str, int]]:
    """Partition the given training labels (clean / relabel / ambiguous) from this epoch's per-sample losses."""
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
    labels = np.where(parts.ambiguous & (noise.ambiguous == "drop"), NO_LABEL, parts.labels)
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


# ---- after the epochs ------------------------------------------------------------------------------------------


def finish(s: Session) -> dict[str, Any]:
    """Best weights -> decoupled stage -> post-hoc bias -> temperature on dev -> reports and plots."""
    load_model_state(s.model, s.run.load(s.run.best_model))
    decoupled = decouple(s)
    rows, dev = dev_selection(s)
    dev_labels = s.tables["dev"].emotions[rows]
    offset, posthoc = posthoc_offset(s, dev.emotion, dev_labels)
    with torch.no_grad():
        s.model.head.emotion_head.bias.add_(torch.as_tensor(offset, dtype=torch.float32, device=s.device))
    dev_all = predict(s, "dev", causal=False)
    temperature = fit_temperature(dev_all.emotion, s.tables["dev"].emotions) if len(dev_all.emotion) else 1.0
    served = torch.softmax(dev_all.emotion / temperature, dim=1).numpy()
    weights = fit_estimation_weights(served, s.tables["dev"].emotions) if len(served) else None
    reports = {split: split_reports(s, split, temperature) for split in ("dev", "test")}
    predicted = np.bincount(dev_all.emotion.argmax(dim=1).numpy(), minlength=s.num_emotions)
    shares = predicted / max(predicted.sum(), 1)
    final = {
        "recipe": s.recipe.name,
        "seed": s.recipe.train.seed,
        "best_epoch": s.state.best_epoch,
        "best_dev": {s.recipe.train.monitor: s.state.best},
        "epochs_run": s.state.epoch,
        "stopped_early": s.state.stopped_early,
        "train_seconds": round(s.state.train_seconds, 1),
        "temperature": temperature,
        "estimation_weights": None if weights is None else list(weights),
        "decoupled": decoupled,
        "posthoc": {**posthoc, "offset": np.asarray(offset).round(6).tolist()},
        "reference_distribution": dict(zip(s.recipe.model.emotions, shares.round(6).tolist(), strict=True)),
        "test": {group: _brief(r["bidirectional"]["emotion"]) for group, r in reports["test"].items()},
    }
    s.run.save(model_state(s.model), s.run.final_model)
    s.run.write_json(s.run.final, final)
    return final


def decouple(s: Session) -> dict[str, Any]:
    """cRT (re-train the emotion classifier on frozen contextual features, both context modes) or tau-norm."""
    config, head = s.recipe.decoupled, s.model.head.emotion_head
    if config.method == "none":
        return {"method": "none"}
    if config.method == "crt":
        labelled = torch.from_numpy(s.state.labels >= 0)
        feats = [predict(s, "train", causal).features[labelled] for causal in MODES.values()]
        labels = torch.from_numpy(s.state.labels[s.state.labels >= 0]).repeat(len(feats))
        new = retrain_classifier(
            torch.cat(feats), labels, s.num_emotions, sampler=build_sampler(config.sampler),
            epochs=config.epochs, lr=config.lr, seed=s.recipe.train.seed,
        )  # fmt: skip
        head.load_state_dict({k: v.to(s.device) for k, v in new.state_dict().items()})
        return {"method": "crt", "sampler": config.sampler, "epochs": config.epochs}
    rows, dev = dev_selection(s)
    search = select_tau(head.cpu(), dev.features, torch.from_numpy(s.tables["dev"].emotions[rows]))
    head.load_state_dict(tau_normalize(head, search.value).state_dict())
    head.to(s.device)
    return {"method": "tau_norm", "tau": search.value, "dev_macro_f1": search.score}


def posthoc_offset(s: Session, logits: Tensor, labels: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-class logit offset: logit adjustment (tau fixed or tuned on dev) then per-class bias tuning."""
    config, info = s.recipe.posthoc, {}
    tau = config.logit_adjustment
    if tau == "tune":
        tau = tune_logit_adjustment(logits, labels, s.counts).value
    offset = logit_adjustment(s.counts, float(tau)) if tau != "none" else np.zeros(s.num_emotions)
    info["logit_adjustment_tau"] = None if tau == "none" else float(tau)
    if config.bias_tuning:
        search = tune_class_biases(logits, labels, init=offset)
        offset, info["bias_tuning_dev_macro_f1"] = search.offset, search.macro_f1
    return offset, info


def split_reports(s: Session, split: str, temperature: float) -> dict[str, dict[str, dict[str, Any]]]:
    """{group: {mode: {"emotion": report, "sentiment": report}}} as dicts; plots for the bidirectional mode."""
    table, out = s.tables[split], {}
    for mode, causal in MODES.items():
        pred = predict(s, split, causal)
        for group, rows in table.groups().items():
            emotion = report(s, table.emotions[rows], pred.emotion[rows], temperature)
            entry = out.setdefault(group, {})[mode] = {"emotion": emotion.to_dict()}
            with_sentiment = rows[table.sentiments[rows] != NO_LABEL]
            if len(with_sentiment):
                y, z = table.sentiments[with_sentiment], pred.sentiment[with_sentiment]
                entry["sentiment"] = compute_metrics(y, z.argmax(dim=1), s.recipe.model.sentiments).to_dict()
            if mode == "bidirectional":
                title = f"{s.recipe.name} seed {s.recipe.train.seed}: {group} {split}"
                plot_per_class(emotion, s.run.plots / f"{split}-{group}-per_class.png", title=title)
                plot_confusion(emotion, s.run.plots / f"{split}-{group}-confusion.png", title=title)
    s.run.write_json(s.run.reports / f"{split}.json", out)
    return out


def _brief(report_dict: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "weighted_f1", "macro_f1", "balanced_accuracy", "minority_recall", "ece")
    per_class = {name: round(m["f1"], 4) for name, m in report_dict["per_class"].items()}
    return {**{k: report_dict[k] for k in keys}, "f1": per_class}


def train(
    recipe: Recipe, run: RunDir, data_dir: Path, cache_dir: Path | None, device: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) and finish one run; a finished run returns its stored summary."""
    run.prepare(recipe)
    if run.is_finished():
        return RunDir.read_json(run.final)
    session = build_session(recipe, run, data_dir, cache_dir, device, progress)
    fit(session)
    return finish(session)


__all__ = ["train", "build_session", "fit", "finish", "predict", "fuse", "Session", "LoopState"]
