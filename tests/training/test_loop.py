"""The training loop end to end on a few MELD dialogues with a tiny random network (seconds per run): run
directory contents, resume after an interruption, checkpoints and early stopping, every library method plugged
in through a recipe, the speech path, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import training.loop as loop
from model.artifact import Calibration
from model.export import example_encoder_inputs
from model.network import EmotionModel, ModelConfig
from model.text_encoder import load_tokenizer
from training.datasets import module_sha256, text_features, text_states, tokenize
from training.forward import encode_text
from training.recipe import Recipe
from training.run import RunDir
from training.session import Session


def tiny_recipe(**sections: dict[str, Any]) -> Recipe:
    """A tiny random network on 8 MELD dialogues per split; `sections` override recipe tables."""
    table: dict[str, Any] = {
        "name": "tiny",
        "model": {"preset": "tiny", "text_trainable_layers": 0},
        "data": {"max_dialogues": 8},
        "optim": {"epochs": 3, "batch_dialogues": 4, "lr": 3e-3},
        "train": {"patience": 0},
    }
    for name, values in sections.items():
        table[name] = {**table.get(name, {}), **values}
    return Recipe.from_dict(table)


def train_tiny(recipe: Recipe, path: Path, data_dir: Path, cache: Path) -> dict[str, Any]:
    return loop.train(recipe, RunDir(path), data_dir, cache, device="cpu", progress=False)


def without_timing(final: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in final.items() if k != "train_seconds"}


def model_tensors(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu")


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_tiny_run_writes_a_complete_run_directory(data_dir: Path, tmp_path: Path, cache: Path) -> None:
    final = train_tiny(tiny_recipe(), tmp_path / "run", data_dir, cache)
    run = RunDir(tmp_path / "run")
    assert run.recipe() == tiny_recipe()
    epochs = run.read_metrics()
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert {"train_loss", "epoch_seconds", "lr", "dev_macro_f1", "dev_f1"} <= set(epochs[0])
    for name in ("dev-meld-per_class.png", "dev-meld-confusion.png", "test-meld-per_class.png"):
        assert (run.plots / name).read_bytes()[:4] == b"\x89PNG"
    test = json.loads((run.reports / "test.json").read_text())
    assert set(test["meld"]) == {"bidirectional", "causal"}
    assert set(test["meld"]["bidirectional"]) == {"emotion", "sentiment"}
    assert final["temperature"] > 0 and final["best_epoch"] in (0, 1, 2)
    assert sum(final["reference_distribution"].values()) == pytest.approx(1.0, abs=1e-4)
    record = Calibration.from_dict(final["calibration"], tiny_recipe().model.emotions)
    assert record.has_record and record.temperature == final["temperature"]
    assert record.posterior is not None and record.posterior.source.data == "MELD dev"
    assert record.posterior.source.modalities == "text" and record.posterior.source.conversations == 8
    assert record.training_prior is not None and record.training_prior.source.data == "MELD train"
    assert final["test"]["meld"]["macro_f1"] == test["meld"]["bidirectional"]["emotion"]["macro_f1"]
    assert train_tiny(tiny_recipe(), tmp_path / "run", data_dir, cache) == final  # finished: nothing to redo


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(
    data_dir: Path, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tiny_recipe(sampler={"name": "class_balanced"}, augment={"method": "mixup"}, train={"context": "random"})
    straight = train_tiny(recipe, tmp_path / "straight", data_dir, cache)

    real_epoch = loop.train_epoch

    def killed_in_epoch_two(session: Session, epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt  # what a kill mid-epoch leaves: the checkpoint of the epoch before
        return real_epoch(session, epoch)

    monkeypatch.setattr(loop, "train_epoch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(recipe, tmp_path / "resumed", data_dir, cache)
    run = RunDir(tmp_path / "resumed")
    assert run.has_checkpoint() and not run.is_finished()
    assert torch.load(run.last_checkpoint, weights_only=False)["loop"]["epoch"] == 2
    monkeypatch.setattr(loop, "train_epoch", real_epoch)

    resumed = train_tiny(recipe, tmp_path / "resumed", data_dir, cache)
    assert without_timing(resumed) == without_timing(straight)
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2]
    a, b = model_tensors(tmp_path / "straight"), model_tensors(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_the_whole_state_and_early_stopping_keeps_the_best_epoch(
    data_dir: Path, tmp_path: Path, cache: Path
) -> None:
    # A learning rate this small changes nothing: the first epoch stays the best and patience 2 stops at 3.
    recipe = tiny_recipe(optim={"epochs": 6, "lr": 1e-12, "text_lr": 1e-12}, train={"patience": 2},
                         sampler={"name": "dev_f1"})  # fmt: skip
    final = train_tiny(recipe, tmp_path / "run", data_dir, cache)
    run = RunDir(tmp_path / "run")
    assert final["stopped_early"] and final["epochs_run"] == 3 and final["best_epoch"] == 0
    assert len(run.read_metrics()) == 3
    saved = torch.load(run.last_checkpoint, weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "loop", "training_sha256"} <= set(saved)
    assert saved["loop"]["epoch"] == 3 and saved["loop"]["stale"] == 2 and saved["loop"]["best_epoch"] == 0
    assert saved["loop"]["sampler"]["f1"] is not None  # the dev-F1 sampler's state travels with the checkpoint
    assert saved["scheduler"]["last_epoch"] == sum(r["steps"] for r in run.read_metrics())
    best = torch.load(run.best_model)
    assert all(torch.allclose(best[k], v, atol=1e-9) for k, v in saved["model"].items())
    assert train_tiny(recipe, tmp_path / "run", data_dir, cache)["epochs_run"] == 3  # a stopped run stays stopped


@pytest.mark.parametrize(
    "sections",
    [
        {"loss": {"name": "weighted_ce", "scheme": "effective"}},
        {"loss": {"name": "focal", "gamma": 2.0}},
        {"loss": {"name": "ldam", "s": 30.0}, "optim": {"lr_drop_epoch": 1}},
        {"loss": {"name": "logit_adjusted", "tau": 1.0}, "data": {"speech": ["emodb"], "max_audio_seconds": 2.0}},
        {"sampler": {"name": "progressive"}},
        {"sampler": {"name": "sqrt"}, "augment": {"method": "manifold_mixup"}},
        {"augment": {"method": "balancemix", "alpha": 1.0}},
        {"augment": {"method": "smote", "smote_k": 2}},
        {"decoupled": {"method": "crt", "epochs": 2}},
        {"decoupled": {"method": "tau_norm"}},
        {"posthoc": {"logit_adjustment": "tune", "bias_tuning": True}},
        {"posthoc": {"logit_adjustment": 1.0}},
        {"noise": {"enabled": True, "warmup_epochs": 1}, "train": {"context": "causal"}},
        {"model": {"preset": "tiny", "text_trainable_layers": 1}},
    ],
    ids=lambda s: "-".join(f"{k}:{next(iter(v.values()))}" for k, v in s.items()),
)
def test_each_library_method_plugs_in_through_the_recipe(
    data_dir: Path, tmp_path: Path, cache: Path, sections: dict[str, Any]
) -> None:
    recipe = tiny_recipe(**{**sections, "optim": {"epochs": 2, **sections.get("optim", {})}})
    final = train_tiny(recipe, tmp_path / "run", data_dir, cache)
    assert 0 <= final["test"]["meld"]["macro_f1"] <= 1
    assert "head.emotion_head.bias" in model_tensors(tmp_path / "run")  # a plain linear classifier is exported
    if recipe.decoupled.method != "none":
        assert final["decoupled"]["method"] == recipe.decoupled.method
    if recipe.posthoc.bias_tuning:
        assert final["posthoc"]["bias_tuning_dev_macro_f1"] is not None


def test_speech_clips_train_with_audio_beside_meld_and_are_reported_apart(
    data_dir: Path, tmp_path: Path, cache: Path
) -> None:
    recipe = tiny_recipe(
        data={"speech": ["emodb"], "max_dialogues": 6, "max_audio_seconds": 2.0},
        train={"modality_dropout": 0.5},
        augment={"cross_modal": 1.0},
        optim={"epochs": 1},
    )
    final = train_tiny(recipe, tmp_path / "run", data_dir, cache)
    test = json.loads((RunDir(tmp_path / "run").reports / "test.json").read_text())
    assert set(final["test"]) == {"meld", "speech"}
    assert "sentiment" not in test["speech"]["bidirectional"]  # speech has no sentiment label
    assert list((cache / "audio").glob("*.npz"))  # decoded once


def test_text_encoded_in_chunks_of_similar_length_is_the_text_encoder_output() -> None:
    model = EmotionModel(ModelConfig.tiny()).eval()
    inputs = example_encoder_inputs(batch=4, tokens=9, samples=3000)
    with torch.no_grad():
        expected = model.encoder.text(inputs["input_ids"], inputs["attention_mask"])
        actual = encode_text(model.encoder.text, inputs["attention_mask"], inputs["input_ids"], chunk=2)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_cached_bottom_layer_states_give_the_full_encoder_output(tmp_path: Path) -> None:
    model = EmotionModel(ModelConfig.tiny(text_trainable_layers=1)).eval()
    tokenizer = load_tokenizer(max_length=16)
    texts = ["Oh my God!", "What?", ("speaker 1: Oh my God!", "speaker 2: You're not gonna believe this, Ross.")]
    states = text_states(model.encoder.text, tokenizer, texts, tmp_path)
    assert states.layer == 1
    padded, mask, pool = states.padded([0, 1, 2])
    ids, id_mask, id_pool = tokenize(tokenizer, texts)
    assert pool.tolist() == id_pool[:, : pool.shape[1]].tolist() and pool[2, 0] == 0 and pool[0, 0] == 1
    with torch.no_grad():
        expected = model.encoder.text(ids, id_mask, id_pool)
        actual = encode_text(model.encoder.text, mask, states=padded, pool=pool)
        whole = model.encoder.text(ids, id_mask)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)  # states are stored as float16
    assert not torch.allclose(expected[2], whole[2], atol=1e-3)  # a pair pools its current turn only


def test_text_features_are_cached_per_encoder_weights(tmp_path: Path) -> None:
    model = EmotionModel(ModelConfig.tiny())
    tokenizer = load_tokenizer(max_length=16)
    texts = ["Oh my God!", "What?", "Oh my God!"]
    first = text_features(model.encoder.text, tokenizer, texts, tmp_path)
    assert torch.equal(first[0], first[2]) and len(list((tmp_path / "text").glob("*.pt"))) == 1
    assert torch.equal(text_features(model.encoder.text, tokenizer, texts, tmp_path), first)
    before = module_sha256(model.encoder.text)
    with torch.no_grad():
        model.encoder.text.bert.embeddings.word_embeddings.weight[0, 0] += 1
    assert module_sha256(model.encoder.text) != before
    text_features(model.encoder.text, tokenizer, texts, tmp_path)
    assert len(list((tmp_path / "text").glob("*.pt"))) == 2


def test_equipoise_train_command_trains_and_resumes(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings
    from equipoise import cli

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        'name = "tiny"\n[model]\npreset = "tiny"\ntext_trainable_layers = 0\n[data]\nmax_dialogues = 4\n'
        "[optim]\nepochs = 1\nbatch_dialogues = 2\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("EQUIPOISE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EQUIPOISE_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    try:
        args = ["train", str(recipe), "--out", str(tmp_path / "runs"), "--seed", "3", "--quiet"]
        assert cli.main(args) == 0
        assert RunDir(tmp_path / "runs" / "tiny-seed3").is_finished()
        assert cli.main([*args[:-1], "--resume"]) == 0  # finished: reports and returns
        assert cli.main(["train", str(recipe), "--out", str(tmp_path / "runs"), "--resume", "--quiet"]) == 2
    finally:
        get_settings.cache_clear()


def test_plan_epoch_draws_turns_but_encodes_each_dialogue_once() -> None:
    from training.datasets import TurnTable, plan_epoch
    from training.samplers import FrequencySampler

    starts = np.array([0, 3, 5, 9])
    table = TurnTable("train", ("meld",) * 9, ("x",) * 9, (None,) * 9, np.zeros(9, int),
                      np.array([0, 0, 1, 0, 2, 0, 0, 0, 1]), np.zeros(9, int), starts)  # fmt: skip
    plan = plan_epoch(table, table.emotions, FrequencySampler(0.0), epoch=0, seed=1, batch_dialogues=2)
    dialogues = np.concatenate([d for d, _ in plan])
    assert len(dialogues) == len(set(dialogues.tolist()))
    drawn = np.concatenate([t for _, t in plan])
    assert len(drawn) == 9 and all(table.dialogue_of[t] in d for d, turns in plan for t in turns)
    again = plan_epoch(table, table.emotions, FrequencySampler(0.0), epoch=0, seed=1, batch_dialogues=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(plan, again, strict=True))
