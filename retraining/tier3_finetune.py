"""Tier 3: full fine-tuning with an imbalance-aware loss (logit-adjusted by default), named by an admin.

Trains the network (the text encoder's trainable layers, fusion, dialogue context, both heads) on the training
split: the base corpora's dialogues and the production feedback (stored, redacted text), with held-out turns
present as context but never as targets. Artifacts carry ONNX graphs, not PyTorch weights, so training starts
from the model config's pretrained text encoder, not from the champion. GPU when present, CPU for small
configurations; data-parallel on Ray Train with `--engine ray`.

The epochs run on the training loop's optimisation step and epoch pass (training/loop.py `Stepper`, `run_epoch`)
with tier 3's own inputs: text dialogues batched by context mode, full precision, no gradient clipping and no
learning-rate schedule.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import ENCODER_INT8_FILE
from model.network import EmotionModel, ModelConfig
from model.preprocess import PreprocessingConfig, Preprocessor, collate
from model.text_encoder import pretrained_dir
from retraining.dataset import DialogueSet
from retraining.gate_config import config_from
from retraining.parity import TorchReference
from retraining.queue import PermanentError
from retraining.steps import JobContext
from retraining.tiers import Draft, TierInputs, uniform_prior
from training.loop import Stepper, run_epoch
from training.losses import CrossEntropyLoss, ImbalanceLoss
from training.recipe import MethodConfig, make_loss
from training.session import build_optimizer

STATE_FILE, CONFIG_FILE = "model.pt", "model_config.json"
# Losses after which the raw logits assume a uniform class prior (Menon et al. 2021; Cui et al. 2019).
BALANCED_LOSSES = ("logit_adjusted", "balanced_softmax", "weighted_ce")
INT8_CALIBRATION_TEXTS = 2_000  # training texts whose activation ranges smooth the int8 encoder (model/quantize.py)


@dataclass(frozen=True)
class FineTuning:
    epochs: int = 3
    batch_dialogues: int = 8
    lr: float = 3e-5  # pretrained text-encoder layers
    head_lr: float = 1e-3  # everything else
    weight_decay: float = 0.01
    loss: str = "logit_adjusted"  # any training.losses name
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (engine "ray")
    use_gpu: bool | None = None  # Ray Train workers on GPUs; None: when this machine trains on CUDA
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides of the base model's config


@dataclass(frozen=True)
class TextDialogues:
    """Training dialogues as text, with targets only on training-split turns (-1 elsewhere)."""

    texts: list[list[str | None]]
    speakers: list[np.ndarray]
    emotions: list[np.ndarray]
    sentiments: list[np.ndarray]
    causal: list[bool]

    @classmethod
    def training_split(cls, data: DialogueSet) -> TextDialogues:
        bounds = np.cumsum(data.lengths)[:-1]
        emotions = np.split(np.where(data.heldout, -1, data.labels), bounds)
        sentiments = np.split(np.where(data.heldout, -1, data.sentiments), bounds)
        texts = np.split(np.array(data.texts, dtype=object), bounds)
        speakers = np.split(data.speakers, bounds)
        keep = [i for i, targets in enumerate(emotions) if (targets >= 0).any()]
        return cls(
            texts=[list(texts[i]) for i in keep],
            speakers=[speakers[i] for i in keep],
            emotions=[emotions[i] for i in keep],
            sentiments=[sentiments[i] for i in keep],
            causal=[bool(data.causal[i]) for i in keep],
        )

    def __len__(self) -> int:
        return len(self.texts)


def build_model(config: dict[str, Any], seed: int) -> EmotionModel:
    torch.manual_seed(seed)
    return EmotionModel(ModelConfig.from_dict(config))


class FineTuner:
    """fit(model, rank, world_size, device) for ray_engine.fit_torch, also called directly for local training.
    Every rank walks the same seeded epoch order and takes its shard; all ranks take the same number of steps
    (DDP synchronises every step)."""

    def __init__(self, data: TextDialogues, config: FineTuning, preprocessing: PreprocessingConfig) -> None:
        self.data, self.config, self.preprocessing = data, config, preprocessing

    def __call__(self, model: torch.nn.Module, rank: int, world: int, device: torch.device) -> None:
        core: EmotionModel = getattr(model, "module", model)
        model.to(device).train()
        config = self.config
        optimizer = build_optimizer(core, lr=config.head_lr, text_lr=config.lr, weight_decay=config.weight_decay)
        step = Stepper(model, optimizer, torch.amp.GradScaler(device.type, enabled=False))  # full precision
        emotion_loss = self._emotion_loss(len(core.config.emotions)).to(device)
        preprocessor = Preprocessor.from_file(pretrained_dir() / "tokenizer.json", self.preprocessing)
        loss_of = functools.partial(
            self._loss, model, preprocessor=preprocessor, emotion_loss=emotion_loss, device=device
        )
        for epoch in range(config.epochs):
            emotion_loss.set_epoch(epoch)
            run_epoch(self._shard(epoch, rank, world), loss_of, step)

    def _emotion_loss(self, num_emotions: int) -> ImbalanceLoss:
        """The configured loss with the training recipes' default parameters, on the training targets' counts."""
        targets = np.concatenate(self.data.emotions)
        counts = np.bincount(targets[targets >= 0], minlength=num_emotions)
        return make_loss(MethodConfig(self.config.loss), np.maximum(counts, 1))

    def _shard(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        rng = np.random.default_rng([self.config.seed, epoch])
        order = rng.permutation(len(self.data))
        shards = [self._batches(order[r::world]) for r in range(world)]
        mine = shards[rank]
        return [mine[i] for i in rng.permutation(len(mine))[: min(len(shard) for shard in shards)]]

    def _batches(self, indices: np.ndarray) -> list[list[int]]:
        """Batches of dialogues of one context mode each (the graph's `causal` is one flag per batch)."""
        size = self.config.batch_dialogues
        batches = []
        for causal in (True, False):
            chosen = [int(i) for i in indices if self.data.causal[i] == causal]
            batches += [chosen[start : start + size] for start in range(0, len(chosen), size)]
        return batches

    def _loss(
        self,
        model: torch.nn.Module,
        batch: Sequence[int],
        preprocessor: Preprocessor,
        emotion_loss: torch.nn.Module,
        device: torch.device,
    ) -> torch.Tensor:
        inputs, emotions, sentiments = _tensors(self.data, batch, preprocessor)
        output = model(**{k: v.to(device) for k, v in inputs.items()}, causal=self.data.causal[batch[0]])
        emotions, sentiments = emotions.to(device), sentiments.to(device)
        loss = emotion_loss(output.emotion_logits[emotions >= 0], emotions[emotions >= 0])
        labelled = sentiments >= 0
        if labelled.any():
            return loss + CrossEntropyLoss()(output.sentiment_logits[labelled], sentiments[labelled])
        return loss + 0.0 * output.sentiment_logits.sum()  # keeps every parameter in DDP's graph


def _tensors(
    data: TextDialogues, batch: Sequence[int], preprocessor: Preprocessor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Encoder inputs of every utterance of the batch, and [B, T] turn indices, speakers, mask and targets."""
    texts = [text for i in batch for text in data.texts[i]]
    encoder = collate(preprocessor.prepare(texts, [None] * len(texts))).feeds()
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
    arrays = {**encoder, "turn_index": turn_index, "speakers": speakers, "turn_mask": mask}
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, torch.from_numpy(emotions), torch.from_numpy(sentiments)


def _model_config(inputs: TierInputs, config: FineTuning) -> dict[str, Any]:
    merged = ModelConfig.from_dict({**inputs.base.config, **config.model_config})
    if merged.emotions != inputs.base.emotions.names:
        raise PermanentError("tier 3 must keep the base model's emotion labels (the gate compares them)")
    return merged.to_dict()


def _finetune(out: Path, ctx: JobContext, inputs: TierInputs, config: FineTuning) -> None:
    model_config = _model_config(inputs, config)
    data = TextDialogues.training_split(inputs.data)
    if not len(data):
        raise PermanentError("tier 3 has no labelled training dialogues")
    preprocessing = _preprocessing(inputs, model_config)
    fit = FineTuner(data, config, preprocessing)
    build = functools.partial(build_model, model_config, config.seed)
    if inputs.engine == "ray":
        from retraining.ray_engine import fit_torch

        use_gpu = inputs.device == "cuda" if config.use_gpu is None else config.use_gpu
        state = fit_torch(
            build,
            fit,
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            storage=out / "ray",
            name=f"job{ctx.job.id}-tier3",
            params=inputs.params,
        )
    else:
        model = build()
        fit(model, 0, 1, torch.device(inputs.device))
        state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / STATE_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model_config), encoding="utf-8")


def _preprocessing(inputs: TierInputs, model_config: dict[str, Any]) -> PreprocessingConfig:
    return PreprocessingConfig(
        max_tokens=model_config["max_tokens"],
        sample_rate=model_config["sample_rate"],
        max_audio_seconds=inputs.base.preprocessing.max_audio_seconds,
        max_speakers=model_config["max_speakers"],
    )


def load_model(directory: Path) -> EmotionModel:
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    model = EmotionModel(ModelConfig.from_dict(config), pretrained_text=False)
    model.load_state_dict(torch.load(directory / STATE_FILE, weights_only=True))
    return model.eval()


def _export(out: Path, inputs: TierInputs, model: EmotionModel) -> None:
    from model.export import export_model
    from model.quantize import measure_activation_ranges, quantize_encoder_int8, text_calibration

    graphs = export_model(model, out, check=True)
    if inputs.base.encoder_int8_path is not None:
        preprocessing = _preprocessing(inputs, model.config.to_dict())
        preprocessor = Preprocessor.from_file(pretrained_dir() / "tokenizer.json", preprocessing)
        # Training turns only: nothing of the gate's held-out turns may shape the candidate.
        training = zip(inputs.data.texts, inputs.data.heldout, strict=True)
        texts = [text for text, heldout in training if text and not heldout][:INT8_CALIBRATION_TEXTS]
        ranges = measure_activation_ranges(graphs["encoder.onnx"], text_calibration(preprocessor, texts))
        quantize_encoder_int8(graphs["encoder.onnx"], out / ENCODER_INT8_FILE, ranges)


def build(ctx: JobContext, inputs: TierInputs) -> Draft:
    config = config_from(FineTuning, inputs.params.get("fine_tuning"), "fine-tuning settings")
    trained = ctx.step("finetune", lambda out: _finetune(out, ctx, inputs, config))
    model = load_model(trained)
    exported = ctx.step("export", lambda out: _export(out, inputs, model))
    graphs = {path.name: path for path in sorted(exported.glob("*.onnx"))}
    return Draft(
        graphs=graphs,
        reference=TorchReference(model),
        recipe={"tier": 3, "method": "fine-tuning with an imbalance-aware loss", **asdict(config)},
        class_prior=uniform_prior(inputs.base) if config.loss in BALANCED_LOSSES else None,
        tokenizer=pretrained_dir() / "tokenizer.json",
        model_config=model.config.to_dict(),
        preprocessing=_preprocessing(inputs, model.config.to_dict()),
    )
