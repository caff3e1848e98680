"""Tier 3 on the CPU with tiny configurations: where it starts (the champion's own weights, checked against its
graphs), the recipe it runs, its dev split, and the job end to end: fine-tuning, export, parity, the gate; with a
champion whose audio path was trained, the audio path is the champion's and the candidate's graphs match its
network on real speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import Engine

from core.db.models import JobStatus, ModelStatus
from core.db.session import session_scope
from model.artifact import CONTEXT_FILE, ENCODER_FILE, ModelArtifact, derive_artifact, load_artifact, write_artifact
from model.audio import decode_audio
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import read_clips, split_by_speaker
from model.default_model import read_release, shipped_artifact
from model.delta import load_weights, save_weights
from model.labels import EMOTIONS
from model.network import EmotionModel, ModelConfig
from model.preprocess import Preprocessor, collate
from model.registry import ModelRegistry
from retraining.champion_weights import champion_weights
from retraining.dataset import DialogueSet, feedback_dialogues
from retraining.graphs import encode_texts, read_head, session
from retraining.queue import PermanentError
from retraining.tier3_finetune import DIALOGUE, FineTuning, conversation_dialogues, tier3_recipe
from tests.retraining.conftest import Turn, log_turns, run_job
from tests.retraining.synthetic import labelled_turns
from training.cli import export_command
from training.datasets import module_sha256
from training.loop import train
from training.recipe import Recipe, load_recipe
from training.run import RunDir

pytestmark = pytest.mark.slow

FINE_TUNING = {"epochs": 3, "batch_dialogues": 16, "lr": 3e-3, "text_lr": 1e-3}
# A champion trained here from MELD dialogues and RAVDESS clips: its audio path is trained, not random.
AUDIO_CHAMPION = {
    "name": "tiny-text-audio",
    "model": {"preset": "tiny"},
    "data": {"meld": True, "speech": ["ravdess"], "max_dialogues": 40},
    "optim": {"epochs": 2, "batch_dialogues": 8},
    "train": {"device": "cpu", "patience": 0},
    "loss": {"name": "logit_adjusted"},
}
PARITY = 1e-4


# ---- where tier 3 starts ------------------------------------------------------------------------------------


def _graphs(artifact: ModelArtifact) -> dict[str, Path]:
    return {ENCODER_FILE: artifact.encoder_path, CONTEXT_FILE: artifact.context_path}


def _rewritten(artifact: ModelArtifact, out: Path, version: str, weights: Path | None) -> ModelArtifact:
    return write_artifact(
        out,
        version=version,
        graphs=_graphs(artifact),
        tokenizer=artifact.tokenizer_path,
        model_config=artifact.config,
        preprocessing=artifact.preprocessing,
        weights=weights,
    )


def test_tier3_starts_from_the_champions_weights_with_the_classifier_of_its_graph(champion_dir: Path) -> None:
    """The champion (tiny-1) is the exported tiny model with its classifier rewritten in context.onnx, as tiers 1
    and 2 do: tier 3 takes the weights file and reads the classifier back from the graph."""
    champion = load_artifact(champion_dir)
    assert champion.weights_path is not None
    start = champion_weights(champion)
    exported = load_weights(champion.weights_path, champion.model_config()).state_dict()
    state = start.model.state_dict()
    head = read_head(champion.context_path)
    assert np.array_equal(state["head.emotion_head.bias"].numpy(), head.bias)
    assert not torch.equal(state["head.emotion_head.bias"], exported["head.emotion_head.bias"])  # leaned to neutral
    assert all(torch.equal(state[k], v) for k, v in exported.items() if not k.startswith("head.emotion_head."))
    assert start.parity <= PARITY
    assert start.recipe.name == "default" and "records none" in start.recipe_source  # the shipped recipe
    assert start.recipe.model == champion.model_config()


def test_an_artifact_of_graphs_alone_is_refused(champion_dir: Path, tmp_path: Path) -> None:
    bare = _rewritten(load_artifact(champion_dir), tmp_path / "bare", "graphs-only", weights=None)
    with pytest.raises(PermanentError, match="carries none"):
        champion_weights(bare)


def test_weights_that_do_not_reproduce_the_graphs_are_refused(champion_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    other = save_weights(EmotionModel(ModelConfig.tiny()), tmp_path / "other.safetensors")
    mismatched = _rewritten(load_artifact(champion_dir), tmp_path / "mismatched", "mismatched", weights=other)
    with pytest.raises(PermanentError, match="do not reproduce"):
        champion_weights(mismatched)


def test_the_shipped_release_assembled_without_weights_starts_from_its_delta(tmp_path: Path) -> None:
    assembled = load_artifact(shipped_artifact(tmp_path / "state"))
    assert assembled.weights_path is not None  # assembly now carries them
    # A new encoder.onnx (here the same bytes) leaves the weights behind: the release as assembled before.
    bare = derive_artifact(assembled, tmp_path / "bare", version=assembled.version, graphs=_graphs(assembled))
    assert bare.weights_path is None
    start = champion_weights(bare)
    assert start.weights_source.startswith("the shipped release") and start.parity <= PARITY
    released = read_release()["recipe"]  # the run's recipe, default.toml under its candidate name
    assert start.recipe.name == released["name"] and start.recipe.data == load_recipe("default").data
    assert champion_weights(assembled).recipe == start.recipe  # the recipe in the weights file is the release's


def test_the_recipe_takes_the_jobs_overrides_and_refuses_stages_tier3_does_not_run() -> None:
    shipped = load_recipe("default")
    recipe = tier3_recipe(shipped, FineTuning(epochs=2, lr=0.01, text_lr=1e-4, loss="focal", patience=1))
    assert (recipe.optim.epochs, recipe.optim.lr, recipe.optim.text_lr) == (2, 0.01, 1e-4)
    assert recipe.loss.name == "focal" and recipe.train.patience == 1
    assert recipe.optim.grad_clip == shipped.optim.grad_clip and recipe.data == shipped.data  # the rest is kept
    with pytest.raises(PermanentError, match="sampler 'class_balanced'"):
        tier3_recipe(load_recipe("meld_balanced_sampling"), FineTuning())
    for lever, refusal in (("meld_supcon", "contrastive"), ("meld_distill", "distillation"),
                           ("meld_context", "earlier turns")):  # fmt: skip
        with pytest.raises(PermanentError, match=refusal):
            tier3_recipe(load_recipe(lever), FineTuning())
    with pytest.raises(PermanentError, match="invalid fine-tuning settings"):
        tier3_recipe(shipped, FineTuning(loss="no-such-loss"))


def test_dev_conversations_are_set_aside_whole_and_never_hold_a_gate_turn(
    sqlite_engine: Engine, champion_dir: Path
) -> None:
    registry = ModelRegistry(sqlite_engine, champion_dir.parent / "registry-tier3-split")
    artifact = registry.verify(registry.register(champion_dir).version)
    log_turns(sqlite_engine, artifact.version, labelled_turns(400, artifact.embed_dim, seed=5), EMOTIONS)
    with session_scope(sqlite_engine) as session:
        data, _ = feedback_dialogues(session, artifact)
    twice = DialogueSet.concat([data, data])  # as the base corpora come, once per context mode
    train, dev = conversation_dialogues(twice, meld=True, dev_fraction=0.3)
    training_turns = data.labelled(heldout=False)
    assert (train.targets() >= 0).sum() + (dev.targets() >= 0).sum() == training_turns.sum()  # each once
    held_out = {text for text, held in zip(data.texts, data.heldout, strict=True) if held}
    texts = {side: {t for turns in part.texts for t in turns} for side, part in (("train", train), ("dev", dev))}
    assert not (texts["train"] | texts["dev"]) & held_out and not texts["train"] & texts["dev"]
    assert 0.15 < len(dev) / (len(dev) + len(train)) < 0.45 and set(dev.groups) == {DIALOGUE}


# ---- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tier3_fine_tunes_exports_and_gates_the_model(engine: Engine, registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    log_turns(engine, base.version, labelled_turns(400, base.embed_dim, seed=11), EMOTIONS)
    job = run_job(engine, registry, tmp_path, tier=3, reason="admin", params={"fine_tuning": FINE_TUNING})

    assert job.status == JobStatus.SUCCEEDED, job.error
    result = job.result
    assert result["tier"] == 3 and result["heldout"]["reencoded"]
    assert result["parity_max_abs_diff"] <= PARITY  # the re-exported graphs match the fine-tuned network
    assert result["candidate"]["macro_f1"] > result["champion"]["macro_f1"]
    row = registry.get(job.candidate_version)
    expected = ModelStatus.CHAMPION if result["promoted"] else ModelStatus.REJECTED
    assert row.status == expected and row.recipe["tier"] == 3
    selection = row.recipe["selection"]
    assert selection["monitor"] == "macro_f1" and 0 <= selection["best_epoch"] < len(selection["epochs"]) <= 3
    assert not row.recipe["audio"]["fine_tuned"]  # no audio in the data: the audio path stays the champion's


def _champion_with_trained_audio(data_dir: Path, work: Path) -> Path:
    """A tiny model trained by the training loop on a few MELD dialogues and RAVDESS clips, exported with its
    recipe and weights (`equipoise export`)."""
    recipe = Recipe.from_dict(AUDIO_CHAMPION)
    run = RunDir(work / "run")
    train(recipe, run, data_dir, work / "cache", device="cpu", progress=False)
    return export_command(run.path, work / "champion", version="tiny-text-audio-1")


def _log_meld_feedback(engine: Engine, artifact: ModelArtifact, data_dir: Path, dialogues: int) -> None:
    """MELD test dialogues as production traffic scored by `artifact` (text), each turn with its gold label."""
    chosen = group_dialogues(read_utterances(data_dir, "test"))[:dialogues]
    utterances = [u for d in chosen for u in d.utterances]
    embeddings = encode_texts(artifact, [u.text for u in utterances])
    turns = [
        Turn(vector, u.emotion, u.text, f"meld-test-{u.dialogue_id}", u.turn, u.speaker)
        for vector, u in zip(embeddings, utterances, strict=True)
    ]
    log_turns(engine, artifact.version, turns, EMOTIONS)


def _speech_parity(artifact: ModelArtifact, model: EmotionModel, data_dir: Path) -> float:
    """max |PyTorch - ONNX Runtime| over both graphs on held-out RAVDESS clips: text + audio, audio alone and
    text alone, as one dialogue."""
    clips = split_by_speaker(read_clips(data_dir, "ravdess")).test[:6]
    texts = [clip.text if i % 3 != 1 else None for i, clip in enumerate(clips)]
    audio = [decode_audio(clip.path) if i % 3 != 2 else None for i, clip in enumerate(clips)]
    preprocessor = Preprocessor.from_file(artifact.tokenizer_path, artifact.preprocessing)
    feeds = collate(preprocessor.prepare(texts, audio)).feeds()
    assert feeds["has_audio"].sum() == 4 and feeds["audio"].shape[1] > 16_000  # seconds of real speech
    with torch.no_grad():
        embedding = model.encoder(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        context = {
            "embeddings": embedding[None],
            "speakers": torch.zeros(1, len(clips), dtype=torch.long),
            "turn_mask": torch.ones(1, len(clips), dtype=torch.bool),
            "causal": torch.tensor(False),
        }
        expected = [embedding.numpy(), *(t.numpy() for t in model.head(**context))]
    (onnx_embedding,) = session(artifact.encoder_path).run(["embedding"], feeds)
    onnx_logits = session(artifact.context_path).run(None, {k: v.numpy() for k, v in context.items()})
    return max(float(np.abs(e - a).max()) for e, a in zip(expected, [onnx_embedding, *onnx_logits], strict=True))


@pytest.mark.data
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tier3_keeps_and_fine_tunes_the_champions_audio_path(engine: Engine, data_dir: Path, tmp_path: Path) -> None:
    champion_path = _champion_with_trained_audio(data_dir, tmp_path / "champion-run")
    registry = ModelRegistry(engine, tmp_path / "registry")
    champion = registry.verify(registry.promote(registry.register(champion_path).version).version)
    _log_meld_feedback(engine, champion, data_dir, dialogues=80)
    params = {"fine_tuning": {"epochs": 2}, "base_max_dialogues": 40}
    job = run_job(engine, registry, tmp_path, data_dir=data_dir, tier=3, reason="admin", params=params)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result["parity_max_abs_diff"] <= PARITY
    recipe = registry.get(job.candidate_version).recipe
    assert recipe["recipe"]["name"] == AUDIO_CHAMPION["name"]  # the champion's recipe, from its weights file
    assert recipe["recipe"]["data"]["speech"] == ["ravdess"]
    # Started from the champion's audio encoder, which is not a fresh one ...
    trained = load_weights(champion.weights_path, champion.model_config())
    assert recipe["start"]["audio_encoder_sha256"] == module_sha256(trained.encoder.audio)
    torch.manual_seed(0)
    assert module_sha256(EmotionModel(champion.model_config()).encoder.audio) != module_sha256(trained.encoder.audio)
    # ... and fine-tuned it on the recipe's speech clips, selected on dev conversations with the post-hoc step.
    assert recipe["audio"]["fine_tuned"] and recipe["audio"]["train_turns"] >= 40 and recipe["audio"]["dev_turns"]
    assert set(recipe["dev"]) == {"dialogue", "speech"} and recipe["calibrated_on"].startswith("tier-3 dev")
    candidate = registry.verify(job.candidate_version)
    tuned = champion_weights(candidate)  # the candidate carries the weights of its graphs
    assert tuned.recipe.name == AUDIO_CHAMPION["name"] and tuned.parity <= PARITY
    assert module_sha256(tuned.model.encoder.audio) != module_sha256(trained.encoder.audio)
    calibration = candidate.calibration  # fitted on tier 3's dev conversations, not on the gate's held-out turns
    assert calibration.temperature == recipe["temperature"] and calibration.has_record
    assert calibration.training_prior is not None and calibration.training_prior.source.data.startswith("tier-3")
    speech = _speech_parity(candidate, tuned.model, data_dir)
    print(f"tier 3: start parity {recipe['start']['parity_with_champion_graphs']:.2g}, speech parity {speech:.2g}")
    assert speech <= PARITY


def test_a_late_fusion_champion_is_fine_tuned_on_its_text_turns_with_its_speech_branch_frozen() -> None:
    from retraining.tier3_finetune import Dialogues, start_model

    data = Dialogues()
    data.add(["hi", None, "bye"], ["a.wav", "b.wav", None], np.zeros(3), np.array([1, 2, 3]), np.zeros(3), DIALOGUE)
    text = data.text_only()
    assert text.audio == [[None, None, None]] and text.texts == data.texts
    assert text.emotions[0].tolist() == [1, -1, 3]  # the audio-only turn stays as unlabelled context
    assert data.audio_turns() == 2 and text.audio_turns() == 0
    config = ModelConfig.tiny(fusion="late", fusion_weight=0.5)
    model = EmotionModel(config, pretrained_text=False)
    speech, head = model.audio_modules()
    assert speech is model.encoder.speech and head is model.encoder.audio_head
    started = start_model(config.to_dict(), model.state_dict(), train_audio=False)
    assert not any(p.requires_grad for part in started.audio_modules() for p in part.parameters())
    assert any(p.requires_grad for p in started.head.parameters())
