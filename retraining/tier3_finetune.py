"""Tier 3: fine-tuning from the champion with the champion's own recipe, named by an admin.

- Start: the champion's PyTorch network (retraining/champion_weights.py: the artifact's weights, or the shipped
  release's, checked against its graphs), every modality included: the audio encoder is the champion's.
- Recipe: the one the champion was trained with (recorded with its weights; the shipped recipe when none is),
  with the job's `fine_tuning` overrides. Tier 3 runs its loss, optimiser, warm-up + cosine schedule, gradient
  clipping, mixed precision (CUDA), context mode, modality dropout, sentiment weight, selection metric, patience
  and post-hoc step. A recipe that also needs another sampler than instance sampling, augmentation, a decoupled
  stage, label-noise handling, a contrastive term, distillation or earlier turns in the text input is refused:
  tier 3 does not run those.
- Data: the job's dialogues (production feedback with the modalities its turns were stored with; MELD when the
  recipe trains on it), targets only on training turns, never on the gate's held-out ones; and the recipe's
  acted-speech clips (text + audio) from the base corpora, by their speaker-independent splits. The audio encoder
  is fine-tuned when the training data has audio, and kept frozen (the champion's) when it has none.
- Dev selection: a fixed share of the training conversations (salted hash of the conversation, so a dialogue and
  its speakers stay on one side) plus the speech corpora's dev speakers; never a held-out turn of the gate. The
  best epoch by the recipe's monitor metric on the dialogue group (the speech group when dev has no dialogue).
- Post-hoc: training/finish.py's class offset (logit adjustment / bias tuning, as the recipe says), folded into
  the emotion classifier, then the calibration record (training/calibration.py: serving temperature, BCTS
  posteriors, training and dev priors, dev reference) and the reference class mix, on the same dev turns.

The epochs run on training/loop.py's `Stepper` and `run_epoch`, on CUDA when present (CPU for small
configurations); data-parallel on Ray Train with `--engine ray`, where every rank scores dev, so all stop at the
same epoch, and rank 0 writes the selection record into the step directory (which Ray Train's storage needs
to be shared anyway).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import ENCODER_INT8_FILE, WEIGHTS_FILE, Calibration, ClassPrior, DataSource
from model.data.speech import read_clips, split_by_speaker
from model.delta import save_weights
from model.labels import LabelSet
from model.network import EmotionModel, ModelConfig
from model.preprocess import PreprocessingConfig, Preprocessor, collate
from retraining.champion_weights import ChampionWeights, champion_weights
from retraining.dataset import BASE, DialogueSet, is_heldout
from retraining.gate_config import config_from
from retraining.parity import TorchReference
from retraining.queue import PermanentError
from retraining.steps import JobContext
from retraining.tiers import Draft, TierInputs
from training.calibration import fit_calibration_record
from training.common import class_prior
from training.datasets import load_waveforms, module_sha256
from training.finish import class_offset
from training.loop import Stepper, choose_causal, kept_modalities, run_epoch, train_mode
from training.losses import CrossEntropyLoss
from training.metrics import MetricsReport, compute_metrics
from training.recipe import DataConfig, MethodConfig, Recipe, RecipeError, make_loss
from training.session import build_optimizer, seed_everything, warmup_cosine

STATE_FILE, CONFIG_FILE, FINISH_FILE, SELECTION_FILE = "model.pt", "model_config.json", "finish.json", "selection.json"
INT8_CALIBRATION_TEXTS = 2_000  # training texts whose activation ranges smooth the int8 encoder (model/quantize.py)
DEV_SALT = "equipoise-tier3-dev-v1"  # another salt than the gate's held-out split: an independent draw
DIALOGUE, SPEECH = "dialogue", "speech"  # dev groups: conversations (feedback, MELD) and acted-speech clips
GROUP_DATA = {DIALOGUE: "production feedback and base dialogues", SPEECH: "acted-speech clips"}
EVAL_BATCH_FACTOR = 4  # dialogues per evaluation batch, in training batches (no gradients to keep)
# What the candidate's registry entry (and metrics.json) records of the fine-tuning.
RECORDED = ("recipe", "start", "audio", "selection", "posthoc", "temperature", "calibrated_on", "dev")


@dataclass(frozen=True)
class FineTuning:
    """A job's `fine_tuning` params: overrides of the champion's recipe (None keeps the recipe's value), and how
    tier 3 runs."""

    epochs: int | None = None
    batch_dialogues: int | None = None
    lr: float | None = None  # the recipe's optim.lr: everything but the pretrained text layers
    text_lr: float | None = None  # the recipe's optim.text_lr: the trainable top layers of the text encoder
    weight_decay: float | None = None
    loss: str | None = None  # instead of the recipe's loss: a training.losses name, with the recipes' defaults
    patience: int | None = None
    seed: int | None = None
    dev_fraction: float = 0.1  # training conversations set aside for dev selection and the post-hoc step
    num_workers: int = 1  # Ray Train workers (engine "ray")
    use_gpu: bool | None = None  # Ray Train workers on GPUs; None: when this machine trains on CUDA


def tier3_recipe(champion: Recipe, config: FineTuning) -> Recipe:
    """The champion's recipe with the job's overrides; refused when it needs a stage tier 3 does not run."""
    unsupported = {
        f"sampler {champion.sampler.name!r}": champion.sampler.name != "instance",
        f"augmentation {champion.augment.method!r}": champion.augment.method != "none",
        f"decoupled stage {champion.decoupled.method!r}": champion.decoupled.method != "none",
        "label-noise handling": champion.noise.enabled,
        "a contrastive term": champion.contrastive.weight > 0,
        "distillation": bool(champion.distill.teachers),
        "earlier turns in the text input": champion.context_input.tokens > 0,
    }
    if any(unsupported.values()):
        needs = ", ".join(name for name, used in unsupported.items() if used)
        raise PermanentError(f"recipe {champion.name!r} uses {needs}, which tier 3 does not run")
    optim = {k: getattr(config, k) for k in ("epochs", "batch_dialogues", "lr", "text_lr", "weight_decay")}
    train = {k: getattr(config, k) for k in ("patience", "seed")}
    try:
        recipe = dataclasses.replace(
            champion,
            optim=dataclasses.replace(champion.optim, **{k: v for k, v in optim.items() if v is not None}),
            train=dataclasses.replace(champion.train, **{k: v for k, v in train.items() if v is not None}),
            loss=champion.loss if config.loss is None else MethodConfig(config.loss),
        )
        make_loss(recipe.loss, np.ones(len(recipe.model.emotions)))  # an unknown loss fails here, not mid-job
    except (RecipeError, TypeError, ValueError) as error:
        raise PermanentError(f"invalid fine-tuning settings: {error}") from error
    if not 0 < config.dev_fraction < 1:
        raise PermanentError(f"fine_tuning.dev_fraction must lie in (0, 1), not {config.dev_fraction}")
    return recipe


# ---- data -------------------------------------------------------------------------------------------------------


@dataclass
class Dialogues:
    """Dialogues as tier 3 trains on them: per turn its text and audio file (None where missing), speaker index and
    targets (-1: none); per dialogue its group (DIALOGUE or SPEECH)."""

    texts: list[list[str | None]] = field(default_factory=list)
    audio: list[list[str | None]] = field(default_factory=list)
    speakers: list[np.ndarray] = field(default_factory=list)
    emotions: list[np.ndarray] = field(default_factory=list)
    sentiments: list[np.ndarray] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, texts: list[str | None], audio: list[str | None], speakers: np.ndarray, emotions: np.ndarray,
            sentiments: np.ndarray, group: str) -> None:  # fmt: skip
        self.texts.append(texts)
        self.audio.append(audio)
        self.speakers.append(np.asarray(speakers, dtype=np.int64))
        self.emotions.append(np.asarray(emotions, dtype=np.int64))
        self.sentiments.append(np.asarray(sentiments, dtype=np.int64))
        self.groups.append(group)

    def extend(self, other: Dialogues) -> Dialogues:
        for name in ("texts", "audio", "speakers", "emotions", "sentiments", "groups"):
            getattr(self, name).extend(getattr(other, name))
        return self

    def with_audio(self, i: int) -> bool:
        return any(path is not None for path in self.audio[i])

    def targets(self) -> np.ndarray:
        """[N] emotion targets of every turn, dialogue after dialogue (-1: none)."""
        return np.concatenate([np.zeros(0, np.int64), *self.emotions])

    def turn_groups(self) -> np.ndarray:
        return np.repeat(np.array(self.groups, dtype=object), [len(t) for t in self.texts])

    def source(self, group: str, data: str) -> DataSource:
        """Where a quantity fitted on the labelled turns of `group` comes from: `data`, their modalities, counts."""
        chosen = [i for i, name in enumerate(self.groups) if name == group and (self.emotions[i] >= 0).any()]
        turns = [(t, a) for i in chosen for t, a, e in zip(self.texts[i], self.audio[i], self.emotions[i], strict=True)
                 if e >= 0]  # fmt: skip
        present = [name for k, name in enumerate(("text", "audio")) if any(turn[k] is not None for turn in turns)]
        return DataSource(data, "+".join(present) or "text", len(turns), len(chosen))

    def text_only(self) -> Dialogues:
        """The same dialogues without their audio: a turn that had audio alone keeps its place as context, unlabelled
        (a late-fusion model's speech head is fitted apart from its text path, training/speech.py)."""
        side = Dialogues()
        for i in range(len(self)):
            has_text = np.array([t is not None for t in self.texts[i]])
            side.add(self.texts[i], [None] * len(self.texts[i]), self.speakers[i],
                     np.where(has_text, self.emotions[i], -1), np.where(has_text, self.sentiments[i], -1),
                     self.groups[i])  # fmt: skip
        return side

    def audio_turns(self) -> int:
        """Labelled turns with an audio file."""
        return sum(int(((e >= 0) & np.array([a is not None for a in audio])).sum())
                   for e, audio in zip(self.emotions, self.audio, strict=True))  # fmt: skip


def conversation_dialogues(data: DialogueSet, meld: bool, dev_fraction: float) -> tuple[Dialogues, Dialogues]:
    """(train, dev) of the job's dialogues: targets on training turns with a stored input only (a turn whose text
    and audio were not stored stays as context), each dialogue once (the base corpora come in both context modes),
    a whole dialogue on one side by the salted hash of its conversation."""
    starts = np.r_[0, np.cumsum(data.lengths)]
    train, dev, seen = Dialogues(), Dialogues(), set()
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        rows = np.arange(start, end)
        keys = tuple(data.keys[i] for i in rows)
        if keys in seen or (data.sources[start] == BASE and not meld):
            continue
        seen.add(keys)
        texts = [data.texts[i] if data.has_text[i] else None for i in rows]
        audio = [data.audio_paths[i] if data.has_audio[i] else None for i in rows]
        stored = [t is not None or a is not None for t, a in zip(texts, audio, strict=True)]
        trainable = ~data.heldout[rows] & np.array(stored)
        targets = np.where(trainable, data.labels[rows], -1)
        if not (targets >= 0).any():
            continue
        side = dev if is_heldout(data.conversations[start], dev_fraction, salt=DEV_SALT) else train
        sentiments = np.where(trainable, data.sentiments[rows], -1)
        side.add(texts, audio, data.speakers[rows], targets, sentiments, DIALOGUE)
    return train, dev


def speech_dialogues(
    corpora: Path | None, data: DataConfig, emotions: LabelSet, limit: int | None
) -> tuple[Dialogues, Dialogues, list[str]]:
    """(train, dev) one-turn dialogues of the recipe's acted-speech clips (text and audio, no sentiment) by the
    corpora's speaker-independent splits, at most `limit` clips per corpus and split; and the corpora missing."""
    train, dev, missing = Dialogues(), Dialogues(), []
    for corpus in data.speech:
        if corpora is None or not (Path(corpora) / corpus / "labels.csv").is_file():
            missing.append(corpus)
            continue
        splits = split_by_speaker(read_clips(Path(corpora), corpus))
        for side, clips in ((train, splits.train), (dev, splits.dev)):
            for clip in [c for c in clips if c.emotion in emotions.names][:limit]:
                side.add([clip.text], [str(clip.path)], np.zeros(1), np.array([emotions.index(clip.emotion)]),
                         np.array([-1]), SPEECH)  # fmt: skip
    return train, dev, missing


# ---- training ---------------------------------------------------------------------------------------------------


def start_model(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], train_audio: bool) -> EmotionModel:
    """The champion's network (its whole state, `state`); its audio branch frozen unless `train_audio`."""
    model = EmotionModel(ModelConfig.from_dict(dict(config)), pretrained_text=False)
    model.load_state_dict(state)
    for part in model.audio_modules():
        part.requires_grad_(train_audio)
    return model


@dataclass(frozen=True)
class Inputs:
    """What turns dialogues into network inputs: the tokenizer + pre-processing, and the decoded audio files."""

    preprocessor: Preprocessor
    waveforms: Mapping[str, np.ndarray]

    def tensors(
        self, data: Dialogues, batch: Sequence[int], dropout: tuple[float, np.random.Generator] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Network inputs of the batch's dialogues, and their [B, T] emotion and sentiment targets; `dropout`
        (p, rng) drops one modality of rows that have both (the recipe's modality dropout)."""
        texts = [text for i in batch for text in data.texts[i]]
        audio = [None if path is None else self.waveforms.get(path) for i in batch for path in data.audio[i]]
        feeds = collate(self.preprocessor.prepare(texts, audio)).feeds()
        both = feeds["has_text"] & feeds["has_audio"]
        if dropout is not None and dropout[0] > 0 and both.any():
            keep_text, keep_audio = kept_modalities(both, *dropout)
            feeds["has_text"], feeds["has_audio"] = feeds["has_text"] & keep_text, feeds["has_audio"] & keep_audio
        lengths = [len(data.texts[i]) for i in batch]
        shape = (len(batch), max(lengths))
        turn_index, speakers = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        emotions, sentiments = np.full(shape, -1, np.int64), np.full(shape, -1, np.int64)
        offset = 0
        for row, (i, n) in enumerate(zip(batch, lengths, strict=True)):
            turn_index[row, :n] = np.arange(offset, offset + n)
            speakers[row, :n], emotions[row, :n], sentiments[row, :n] = (
                data.speakers[i],
                data.emotions[i],
                data.sentiments[i],
            )
            offset += n
        mask = np.arange(shape[1])[None, :] < np.array(lengths)[:, None]
        arrays = {**feeds, "turn_index": turn_index, "speakers": speakers, "turn_mask": mask}
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return tensors, torch.from_numpy(emotions), torch.from_numpy(sentiments)


@dataclass
class Selection:
    """The best epoch on dev by the recipe's monitor metric, with early stopping after `patience` epochs without
    improvement (0: never), as training/loop.py selects."""

    monitor: str
    patience: int
    best: float = -np.inf
    best_epoch: int = -1
    stale: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(self, epoch: int, record: dict[str, Any], score: float, model: torch.nn.Module) -> bool:
        """Record the epoch; False when training should stop."""
        self.history.append({"epoch": epoch, self.monitor: score, **record})
        if score > self.best + 1e-9:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        return not (self.patience > 0 and self.stale >= self.patience)

    def to_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best_epoch": self.best_epoch, "best": self.best, "epochs": self.history}


class FineTuner:
    """fit(model, rank, world_size, device) for ray_engine.fit_torch, also called directly for local training.
    Every rank walks the same seeded epoch order and takes its shard; all ranks take the same number of steps
    (DDP synchronises every step) and stop at the same epoch (each scores the whole dev split). The model ends
    with the weights of the best dev epoch."""

    def __init__(
        self,
        train: Dialogues,
        dev: Dialogues,
        recipe: Recipe,
        tokenizer: Path,
        minority: Sequence[str] = (),
        cache_dir: Path | None = None,
        report_dir: Path | None = None,
    ) -> None:
        self.train, self.dev, self.recipe, self.tokenizer = train, dev, recipe, tokenizer
        self.minority, self.cache_dir, self.report_dir = tuple(minority), cache_dir, report_dir
        targets = train.targets()
        counts = np.bincount(targets[targets >= 0], minlength=len(recipe.model.emotions))
        self.counts = np.maximum(counts, 1)
        self.selection_group = DIALOGUE if (dev.targets()[dev.turn_groups() == DIALOGUE] >= 0).any() else SPEECH

    @functools.cached_property
    def inputs(self) -> Inputs:
        """The pre-processing of training (the recipe's audio cut) and every audio file decoded (cached)."""
        config, data = self.recipe.model, self.recipe.data
        preprocessing = PreprocessingConfig(
            max_tokens=config.max_tokens,
            sample_rate=config.sample_rate,
            max_audio_seconds=data.max_audio_seconds,
            max_speakers=config.max_speakers,
        )
        paths = sorted({p for part in (self.train, self.dev) for turns in part.audio for p in turns if p is not None})
        present = [Path(p) for p in paths if Path(p).is_file()]  # stored audio can be purged by retention
        waves = load_waveforms(present, data.max_audio_seconds, self.cache_dir)
        decoded = {str(path): wave for path, wave in zip(present, waves, strict=True) if wave is not None}
        return Inputs(Preprocessor.from_file(self.tokenizer, preprocessing), decoded)

    def __call__(self, model: torch.nn.Module, rank: int, world: int, device: torch.device) -> None:
        core: EmotionModel = getattr(model, "module", model)
        model.to(device)
        optim, train = self.recipe.optim, self.recipe.train
        amp = device.type == "cuda" and train.amp
        optimizer = build_optimizer(core, lr=optim.lr, text_lr=optim.text_lr, weight_decay=optim.weight_decay)
        schedule = warmup_cosine(optimizer, optim, len(self._shard(0, rank, world)))
        step = Stepper(model, optimizer, torch.amp.GradScaler(device.type, enabled=amp), schedule, optim.grad_clip)
        emotion_loss = make_loss(self.recipe.loss, self.counts).to(device)
        inputs, selection = self.inputs, Selection(train.monitor, train.patience)
        for epoch in range(optim.epochs):
            rng = seed_everything(train.seed, epoch)
            emotion_loss.set_epoch(epoch)
            train_mode(core)
            loss_of = functools.partial(self._loss, model, inputs, emotion_loss, rng, device, amp)
            stats = run_epoch(self._shard(epoch, rank, world), loss_of, step)
            reports = self.dev_reports(core, inputs, device)
            score = getattr(reports[self.selection_group], train.monitor) or 0.0
            summary = {group: _brief(report) for group, report in reports.items()}
            if not selection.update(epoch, {"train_loss": stats["train_loss"], "dev": summary}, score, core):
                break
        if selection.best_state is not None:
            core.load_state_dict(selection.best_state)
        if rank == 0 and self.report_dir is not None:
            (self.report_dir / SELECTION_FILE).write_text(json.dumps(selection.to_dict(), indent=2), encoding="utf-8")

    def _shard(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        rng = np.random.default_rng([self.recipe.train.seed, epoch])
        order = rng.permutation(len(self.train))
        shards = [self._batches(self.train, order[r::world], self.recipe.optim.batch_dialogues) for r in range(world)]
        mine = shards[rank]
        return [mine[i] for i in rng.permutation(len(mine))[: min(len(shard) for shard in shards)]]

    @staticmethod
    def _batches(data: Dialogues, indices: Sequence[int], size: int) -> list[list[int]]:
        """Batches of dialogues with audio or without (text batches then carry one audio sample per turn, not the
        longest clip's)."""
        batches = []
        for audio in (True, False):
            chosen = [int(i) for i in indices if data.with_audio(int(i)) == audio]
            batches += [chosen[start : start + size] for start in range(0, len(chosen), size)]
        return batches

    def _loss(
        self,
        model: torch.nn.Module,
        inputs: Inputs,
        emotion_loss: torch.nn.Module,
        rng: np.random.Generator,
        device: torch.device,
        amp: bool,
        batch: Sequence[int],
    ) -> torch.Tensor:
        train = self.recipe.train
        tensors, emotions, sentiments = inputs.tensors(self.train, batch, (train.modality_dropout, rng))
        causal = choose_causal(train.context, rng)
        emotions, sentiments = emotions.to(device), sentiments.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            output = model(**{k: v.to(device) for k, v in tensors.items()}, causal=causal)
            loss = emotion_loss(output.emotion_logits[emotions >= 0], emotions[emotions >= 0])
            labelled = sentiments >= 0
            if labelled.any():
                sentiment = CrossEntropyLoss()(output.sentiment_logits[labelled], sentiments[labelled])
                return loss + train.sentiment_weight * sentiment
            return loss + 0.0 * output.sentiment_logits.sum()  # keeps every parameter in DDP's graph

    @torch.inference_mode()
    def dev_logits(self, model: EmotionModel, inputs: Inputs, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Emotion logits [N, C] (bidirectional context, as training/forward.py selects) and targets [N] of the
        labelled dev turns, dialogue after dialogue."""
        was_training = model.training
        model.eval().to(device)
        per_dialogue: dict[int, np.ndarray] = {}
        size = EVAL_BATCH_FACTOR * self.recipe.optim.batch_dialogues
        amp = device.type == "cuda" and self.recipe.train.amp
        for batch in self._batches(self.dev, range(len(self.dev)), size):
            tensors, _, _ = inputs.tensors(self.dev, batch)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = model(**{k: v.to(device) for k, v in tensors.items()}, causal=False).emotion_logits
            for row, i in enumerate(batch):
                per_dialogue[i] = logits[row, : len(self.dev.texts[i])].float().cpu().numpy()
        model.train(was_training)
        targets = self.dev.targets()
        logits = np.concatenate([per_dialogue[i] for i in range(len(self.dev))])
        return logits[targets >= 0], targets[targets >= 0]

    def dev_turns(self) -> tuple[np.ndarray, np.ndarray]:
        """The group and the dialogue (its conversation) of every labelled dev turn, in `dev_logits` order."""
        targets = self.dev.targets()
        dialogues = np.repeat(np.arange(len(self.dev)), [len(t) for t in self.dev.texts])
        return self.dev.turn_groups()[targets >= 0], dialogues[targets >= 0]

    def dev_reports(self, model: EmotionModel, inputs: Inputs, device: torch.device) -> dict[str, MetricsReport]:
        logits, labels = self.dev_logits(model, inputs, device)
        return self.reports(logits, labels)

    def reports(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, MetricsReport]:
        """Metrics of every dev group present."""
        (groups, _), names = self.dev_turns(), self.recipe.model.emotions
        return {
            group: compute_metrics(labels[rows], logits[rows].argmax(axis=1), names, minority=self.minority)
            for group in (DIALOGUE, SPEECH)
            if (rows := groups == group).any()
        }


def _brief(report: MetricsReport) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "weighted_f1", "minority_recall")
    return {"turns": int(report.support.sum()), **{k: getattr(report, k) for k in keys}}


# ---- the steps --------------------------------------------------------------------------------------------------


def _finetune(out: Path, ctx: JobContext, inputs: TierInputs, config: FineTuning) -> None:
    start = champion_weights(inputs.base)
    recipe = tier3_recipe(start.recipe, config)
    ctx.log(f"tier 3: starts from {start.weights_source} (parity {start.parity:.2g}), recipe {start.recipe_source}")
    train, dev = conversation_dialogues(inputs.data, recipe.data.meld, config.dev_fraction)
    missing: list[str] = []
    late = start.model.config.fusion == "late"
    if late:  # its text path is fine-tuned; the speech branch and the fusion weight stay the champion's
        train, dev = train.text_only(), dev.text_only()
        ctx.log("tier 3: a late-fusion champion: text turns only, its speech head kept")
    if inputs.params.get("use_base_data", True) and not late:
        limit = inputs.params.get("base_max_dialogues")
        clips = speech_dialogues(inputs.corpora, recipe.data, inputs.base.emotions, int(limit) if limit else None)
        train, dev, missing = train.extend(clips[0]), dev.extend(clips[1]), clips[2]
    if not len(train):
        raise PermanentError("tier 3 has no labelled training dialogues")
    if not (dev.targets() >= 0).any():
        raise PermanentError(f"tier 3 has no labelled dev turns (share {config.dev_fraction} of the conversations)")
    audio = {"train_turns": train.audio_turns(), "dev_turns": dev.audio_turns(), "missing_corpora": missing}
    audio["fine_tuned"] = audio["train_turns"] > 0
    ctx.log(f"tier 3: {len(train)} training and {len(dev)} dev dialogues; audio {audio}")
    tuner = FineTuner(train, dev, recipe, inputs.base.tokenizer_path, inputs.minority, inputs.cache_dir, out)
    model = _train(out, ctx, inputs, config, tuner, start, bool(audio["fine_tuned"]))
    finished = {
        "recipe": recipe.to_dict(),
        "start": {**start.describe(), "audio_encoder_sha256": module_sha256(start.model.audio_modules()[0])},
        "audio": audio,
        "selection": json.loads((out / SELECTION_FILE).read_text(encoding="utf-8")),
        **_post_hoc(model, tuner, torch.device(inputs.device), inputs.base.calibration.sentiment_temperature),
    }
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / STATE_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_dict()), encoding="utf-8")
    (out / FINISH_FILE).write_text(json.dumps(finished, indent=2), encoding="utf-8")


def _train(
    out: Path,
    ctx: JobContext,
    inputs: TierInputs,
    config: FineTuning,
    tuner: FineTuner,
    start: ChampionWeights,
    audio: bool,
) -> EmotionModel:
    """The fine-tuned network (best dev epoch), trained here or on Ray Train."""
    build = functools.partial(start_model, start.model.config.to_dict(), start.model.state_dict(), audio)
    if inputs.engine == "ray":
        from retraining.ray_engine import fit_torch

        use_gpu = inputs.device == "cuda" if config.use_gpu is None else config.use_gpu
        state = fit_torch(
            build,
            tuner,
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            storage=out / "ray",
            name=f"job{ctx.job.id}-tier3",
            params=inputs.params,
        )
        model = build()
        model.load_state_dict(state)
        return model
    model = build()
    tuner(model, 0, 1, torch.device(inputs.device))
    return model.cpu()


def _post_hoc(model: EmotionModel, tuner: FineTuner, device: torch.device, sentiment_t: float) -> dict[str, Any]:
    """training/finish.py's class offset on dev, folded into the emotion classifier; then the artifact's
    calibration record (training/calibration.py: temperature, BCTS posteriors, priors, dev reference) and its
    reference class mix, on the selection group's dev turns, as the training loop's finish fits them."""
    logits, labels = tuner.dev_logits(model, tuner.inputs, device)
    model.cpu()
    group = tuner.selection_group
    groups, conversations = tuner.dev_turns()
    rows = groups == group
    offset, info = class_offset(tuner.recipe.posthoc, tuner.counts, logits[rows], labels[rows])
    with torch.no_grad():
        model.head.emotion_head.bias.add_(torch.as_tensor(offset, dtype=torch.float32))
    adjusted = logits + offset
    targets, names = tuner.train.targets(), tuner.recipe.model.emotions
    counts = np.bincount(targets[(targets >= 0) & (tuner.train.turn_groups() == group)], minlength=len(names))
    fit = fit_calibration_record(
        adjusted[rows],
        labels[rows],
        conversations[rows],
        names,
        dev_source=tuner.dev.source(group, f"tier-3 dev ({GROUP_DATA[group]})"),
        training_prior=ClassPrior(
            tuple(class_prior(counts)), tuner.train.source(group, f"tier-3 training ({GROUP_DATA[group]})")
        ),
        sentiment_temperature=sentiment_t,
    )
    return {
        "posthoc": {**info, "offset": np.round(offset, 6).tolist()},
        "temperature": fit.calibration.temperature,
        "calibration": fit.calibration.to_dict(names),
        "reference_distribution": fit.reference_distribution,
        "calibrated_on": fit.calibration.temperature_source.describe() if fit.calibration.temperature_source else "",
        "dev": {name: _brief(report) for name, report in tuner.reports(adjusted, labels).items()},
    }


def load_model(directory: Path) -> EmotionModel:
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    model = EmotionModel(ModelConfig.from_dict(config), pretrained_text=False)
    model.load_state_dict(torch.load(directory / STATE_FILE, weights_only=True))
    return model.eval()


def _export(out: Path, inputs: TierInputs, model: EmotionModel, recipe: Mapping[str, Any]) -> None:
    from model.export import export_model
    from model.quantize import measure_activation_ranges, quantize_encoder_int8, text_calibration

    graphs = export_model(model, out, check=True)
    save_weights(model, out / WEIGHTS_FILE, recipe)
    if inputs.base.encoder_int8_path is not None:
        preprocessor = Preprocessor.from_file(inputs.base.tokenizer_path, inputs.base.preprocessing)
        # Training turns only: nothing of the gate's held-out turns may shape the candidate.
        training = zip(inputs.data.texts, inputs.data.heldout, strict=True)
        texts = [text for text, heldout in training if text and not heldout][:INT8_CALIBRATION_TEXTS]
        ranges = measure_activation_ranges(graphs["encoder.onnx"], text_calibration(preprocessor, texts))
        quantize_encoder_int8(graphs["encoder.onnx"], out / ENCODER_INT8_FILE, ranges)


def build(ctx: JobContext, inputs: TierInputs) -> Draft:
    config = config_from(FineTuning, inputs.params.get("fine_tuning"), "fine-tuning settings")
    trained = ctx.step("finetune", lambda out: _finetune(out, ctx, inputs, config))
    finished = json.loads((trained / FINISH_FILE).read_text(encoding="utf-8"))
    model = load_model(trained)
    exported = ctx.step("export", lambda out: _export(out, inputs, model, finished["recipe"]))
    recipe = Recipe.from_dict(finished["recipe"])
    selection = finished["selection"]
    ctx.log(
        f"tier 3: best epoch {selection['best_epoch'] + 1} of {len(selection['epochs'])} by dev {selection['monitor']} "
        f"{selection['best']:.4f}; temperature {finished['temperature']:.3f}"
    )
    return Draft(
        graphs={path.name: path for path in sorted(exported.glob("*.onnx"))},
        reference=TorchReference(model),
        recipe={
            "tier": 3,
            "method": "fine-tuning from the champion with its recipe, dev selection and post-hoc step",
            "fine_tuning": asdict(config),
            **{k: finished[k] for k in RECORDED},
        },
        calibration=Calibration.from_dict(finished["calibration"], recipe.model.emotions),
        model_config=model.config.to_dict(),
        weights=exported / WEIGHTS_FILE,
        reference_distribution=finished["reference_distribution"],
    )
