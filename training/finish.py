"""After the epochs: the best weights, the decoupled classifier stage, the post-hoc bias, the calibration record
(temperature, bias-corrected posteriors, priors, reference class mix) fitted on the clean dev set of the modality
mix the model serves, then reports and plots of dev and test."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.artifact import ClassPrior, DataSource
from training.calibration import CalibrationFit, fit_calibration_record
from training.common import class_prior
from training.datasets import NO_LABEL
from training.decoupled import retrain_classifier, select_tau, tau_normalize
from training.forward import MODES, dev_selection, predict, report
from training.losses import NormedLinear
from training.metrics import compute_metrics
from training.plots import plot_confusion, plot_per_class
from training.posthoc import logit_adjustment, tune_class_biases, tune_logit_adjustment
from training.recipe import PosthocConfig
from training.run import load_model_state, model_state
from training.samplers import build_sampler
from training.session import Session


def finish(s: Session) -> dict[str, Any]:
    """Best weights -> decoupled stage -> post-hoc bias -> calibration on dev -> reports and plots."""
    load_model_state(s.model, s.run.load(s.run.best_model))
    fold_classifier(s)
    decoupled = decouple(s)
    rows, dev = dev_selection(s)
    dev_labels = s.tables["dev"].emotions[rows]
    offset, posthoc = posthoc_offset(s, dev.emotion, dev_labels)
    with torch.no_grad():
        s.model.head.emotion_head.bias.add_(torch.as_tensor(offset, dtype=torch.float32, device=s.device))
    fit = calibration_fit(s)
    temperature = fit.calibration.temperature
    reports = {split: split_reports(s, split, temperature) for split in ("dev", "test")}
    final = {
        "recipe": s.recipe.name,
        "seed": s.recipe.train.seed,
        "best_epoch": s.state.best_epoch,
        "best_dev": {s.recipe.train.monitor: s.state.best},
        "epochs_run": s.state.epoch,
        "stopped_early": s.state.stopped_early,
        "train_seconds": round(s.state.train_seconds, 1),
        "device": s.described_device,
        "temperature": temperature,
        "calibration": fit.calibration.to_dict(s.recipe.model.emotions),
        "decoupled": decoupled,
        "posthoc": {**posthoc, "offset": np.asarray(offset).round(6).tolist()},
        "reference_distribution": fit.reference_distribution,
        "test": {group: _brief(r["bidirectional"]["emotion"]) for group, r in reports["test"].items()},
    }
    s.run.save(model_state(s.model), s.run.final_model)
    s.run.write_json(s.run.final, final)
    return final


# The data and modality mix of each report group: the model serves the monitored group's (MELD: text).
GROUP_SOURCES = {"meld": ("MELD", "text"), "speech": ("acted speech (RAVDESS, TESS, EmoDB)", "text+audio")}


def fold_classifier(s: Session) -> None:
    """A cosine emotion classifier (LDAM) becomes the plain linear layer the exported graphs carry (same
    predicted classes; training/losses.py `NormedLinear.to_linear`)."""
    head = s.model.head
    if isinstance(head.emotion_head, NormedLinear):
        head.emotion_head = head.emotion_head.to_linear()


def monitored_train_counts(s: Session) -> np.ndarray:
    """Training turns per emotion of the monitored group (MELD when MELD is trained): the prior of the rows that
    dev selection, post-hoc adjustment and calibration look at."""
    train_rows = s.tables["train"].groups()[s.monitor_group]
    return np.bincount(s.tables["train"].emotions[train_rows], minlength=s.num_emotions)


def calibration_fit(s: Session) -> CalibrationFit:
    """The artifact's calibration record, fitted on the clean dev set of the modality mix the model serves (the
    monitored group of dev, bidirectional context, after the post-hoc offset), with the training prior of the
    same group's training labels."""
    data, modalities = GROUP_SOURCES[s.monitor_group]
    rows, dev = dev_selection(s)
    table = s.tables["dev"]
    train_counts = monitored_train_counts(s)
    training_source = DataSource(f"{data} train", modalities, int(train_counts.sum()), None)
    dialogues = table.dialogue_of[rows]
    return fit_calibration_record(
        dev.emotion.numpy(),
        table.emotions[rows],
        dialogues,
        s.recipe.model.emotions,
        dev_source=DataSource(f"{data} dev", modalities, len(rows), len(np.unique(dialogues))),
        training_prior=ClassPrior(tuple(class_prior(train_counts)), training_source),
    )


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
    """Per-class logit offset: logit adjustment (tau fixed or tuned on dev) then per-class bias tuning. The prior
    is the monitored group's (MELD's training prior for a model selected on MELD dev), not the pooled one."""
    return class_offset(s.recipe.posthoc, monitored_train_counts(s), logits, labels)


def class_offset(
    config: PosthocConfig, counts: np.ndarray, logits: Tensor | np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """`posthoc_offset` for any model: `counts` are its training turns per emotion, `logits` and `labels` dev's."""
    info: dict[str, Any] = {}
    tau = config.logit_adjustment
    if tau == "tune":
        tau = tune_logit_adjustment(logits, labels, counts).value
    offset = logit_adjustment(counts, float(tau)) if tau != "none" else np.zeros(len(counts))
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
