"""The gate: a candidate failing ONNX parity (a corrupted graph) or the paired test is registered, rejected with
its reasons, and never becomes the champion; the decision records the bounds, the held-out set and its sizes;
with too little held-out feedback the gate does not decide (or says it judged on the base corpora's held-out
split); a candidate with a new encoder is scored on every modality the feedback was served with."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sqlalchemy import Engine

from core.db.models import FeedbackKind, JobStatus, JobTrigger, ModelStatus, RetrainingJob
from core.db.session import session_scope
from core.settings import load_settings
from model.artifact import CONTEXT_FILE, ModelArtifact, export_artifact, write_artifact
from model.audio import SAMPLE_RATE
from model.labels import EMOTIONS
from model.network import EmotionModel, ModelConfig
from model.registry import ModelRegistry
from monitoring.exporter import MonitoringCollector
from retraining.dataset import AUDIO, BASE, FEEDBACK, TEXT, TEXT_AUDIO, DialogueSet
from retraining.gate import GateDecision, run_gate
from retraining.gate_config import GateConfig
from retraining.graphs import EMOTION_OUTPUT, EmotionHead, encode_texts, read_head, run_context, session, write_head
from retraining.heldout import heldout_logits
from retraining.parity import HeadReference, ParityReference, TorchReference
from retraining.pipeline import Environment
from retraining.queue import PermanentError
from retraining.tiers import head_graphs
from tests.retraining.synthetic import MINORITY, class_means

SERVED = (TEXT, AUDIO, TEXT_AUDIO)
AUDIT, CORRECTION = FeedbackKind.AUDIT.value, FeedbackKind.CORRECTION.value


def _conversations(
    conversations: int,
    dim: int,
    *,
    turns: int = 4,
    source: str = FEEDBACK,
    audio_dir: Path | None = None,
    seed: int = 5,
    kind: str = AUDIT,
) -> DialogueSet:
    """Labelled held-out dialogues (every class present, labels of `kind`); with `audio_dir`, turns cycle through
    text only, audio only and text + audio, their audio stored as WAV files there."""
    rng = np.random.default_rng(seed)
    n = conversations * turns
    labels = np.arange(n) % len(EMOTIONS)
    served = [SERVED[i % 3] if audio_dir is not None else TEXT for i in range(n)]
    paths: list[str | None] = [None] * n
    for i, modality in enumerate(served):
        if modality != TEXT and audio_dir is not None:
            tone = np.sin(2 * np.pi * (200 + 40 * labels[i]) * np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE)
            paths[i] = str(audio_dir / f"{source}-{i}.wav")
            sf.write(paths[i], (0.3 * tone).astype(np.float32), SAMPLE_RATE)
    return DialogueSet(
        embeddings=(class_means(dim)[labels] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32),
        speakers=np.arange(n) % 2,
        labels=labels,
        sentiments=np.full(n, -1),
        heldout=np.ones(n, bool),
        has_text=np.array([m != AUDIO for m in served]),
        has_audio=np.array([m != TEXT for m in served]),
        lengths=np.full(conversations, turns),
        causal=np.arange(conversations) % 2 == 0,
        keys=[f"{source}-{i}" for i in range(n)],
        conversations=[f"conversation:{source}-{i // turns}" for i in range(n)],
        texts=[
            f"{EMOTIONS[y]} words, turn {i}" if m != AUDIO else None
            for i, (y, m) in enumerate(zip(labels, served, strict=True))
        ],
        audio_paths=paths,
        label_kinds=[kind if source == FEEDBACK else None] * n,
        sources=[source] * n,
    )


def _candidate(base: ModelArtifact, out: Path, version: str, context: Path) -> Path:
    write_artifact(
        out / version,
        version=version,
        graphs=head_graphs(base, context),
        tokenizer=base.tokenizer_path,
        model_config=base.config,
        preprocessing=base.preprocessing,
    )
    return out / version


def _rejected(
    registry: ModelRegistry,
    base: ModelArtifact,
    candidate: Path,
    reference: ParityReference,
    data: DialogueSet | None = None,
    config: GateConfig | None = None,
) -> GateDecision:
    decision = run_gate(
        registry,
        base,
        candidate,
        reference,
        data if data is not None else _conversations(30, base.embed_dim),
        minority=MINORITY,
        config=config or GateConfig(),
        recipe={"test": True},
    )
    assert not decision.promoted and decision.version is not None
    row = registry.get(decision.version)
    assert row.status == ModelStatus.REJECTED and row.rejection_reason == "; ".join(decision.reasons)
    champion = registry.champion()
    assert champion is not None and champion.version == base.version  # never served
    return decision


def _same_head(registry: ModelRegistry, tmp_path: Path, version: str) -> tuple[ModelArtifact, Path, HeadReference]:
    base = registry.verify("tiny-1")
    return (
        base,
        _candidate(base, tmp_path, version, base.context_path),
        HeadReference(base, read_head(base.context_path)),
    )


def test_a_graph_that_differs_from_its_reference_fails_parity(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    head = read_head(base.context_path)
    tampered = write_head(base.context_path, tmp_path / "tampered.onnx", EmotionHead(head.weight, head.bias + 0.01))
    candidate = _candidate(base, tmp_path, "tampered", tampered)
    reasons = _rejected(registry, base, candidate, HeadReference(base, head)).reasons
    assert len(reasons) == 1 and reasons[0].startswith("ONNX parity failed")


def test_a_corrupted_graph_fails_parity(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    corrupted = tmp_path / CONTEXT_FILE
    corrupted.write_bytes(base.context_path.read_bytes()[:-200] + b"\0" * 200)
    candidate = _candidate(base, tmp_path, "corrupted", corrupted)
    reasons = _rejected(registry, base, candidate, HeadReference(base, read_head(base.context_path))).reasons
    assert reasons[0].startswith("ONNX parity failed")


def test_a_candidate_no_better_than_the_champion_is_rejected_with_its_bounds(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    base, same, reference = _same_head(registry, tmp_path, "same")
    config = GateConfig(bootstrap_replicates=500, bootstrap_seed=3)
    decision = _rejected(registry, base, same, reference, config=config)
    assert len(decision.reasons) == 1 and decision.reasons[0].startswith("minority recall gain +0.0000")
    assert "lower bound is not above 0" in decision.reasons[0]
    paired = decision.paired
    assert paired is not None and (paired["replicates"], paired["seed"], paired["confidence"]) == (500, 3, 0.95)
    assert paired["required_lower_bounds"] == {"minority_recall": 0.0, "macro_f1": -GateConfig().macro_f1_tolerance}
    assert (paired["turns"], paired["conversations"], paired["unit"]) == (120, 30, "conversation")
    for metric in ("minority_recall", "macro_f1"):  # identical predictions: every resample gains exactly 0
        assert paired["gains"][metric] == {"estimate": 0.0, "lower": 0.0, "upper": 0.0}
    heldout = decision.heldout
    assert (heldout["set"], heldout["turns"], heldout["conversations"], heldout["feedback"]) == (FEEDBACK, 120, 30, 120)
    assert heldout["modalities"] == {TEXT: 120} and not heldout["reencoded"]
    assert set(decision.by_modality) == {TEXT} and decision.by_modality[TEXT]["turns"] == 120


def test_the_macro_f1_bound_must_clear_the_tolerance(registry: ModelRegistry, tmp_path: Path) -> None:
    """A negative tolerance asks for a macro F1 gain; the identical candidate (gain 0, bounds 0) cannot show it."""
    base, same, reference = _same_head(registry, tmp_path, "same-f1")
    decision = _rejected(registry, base, same, reference, config=GateConfig(macro_f1_tolerance=-0.01))
    assert any(r.startswith("macro F1 gain +0.0000") and "tolerated +0.0100" in r for r in decision.reasons)


def test_audit_labels_are_judged_on_alone_when_there_are_enough(registry: ModelRegistry, tmp_path: Path) -> None:
    base, same, reference = _same_head(registry, tmp_path, "audited")
    dim = base.embed_dim
    corrections = _conversations(30, dim, kind=CORRECTION, seed=7)
    corrections.conversations = [f"{key}-corrected" for key in corrections.conversations]
    audited = _rejected(
        registry, base, same, reference, data=DialogueSet.concat([_conversations(25, dim), corrections])
    )
    assert audited.heldout["labels"] == {AUDIT: 100} and "a random sample" in audited.heldout["note"]

    _, again, _ = _same_head(registry, tmp_path, "corrected")
    mixed = DialogueSet.concat([_conversations(5, dim), corrections])  # 20 audit labels: too few alone
    decision = _rejected(registry, base, again, reference, data=mixed)
    assert decision.heldout["labels"] == {AUDIT: 20, CORRECTION: 120}
    assert "120 are corrections, which over-represent the champion's mistakes" in decision.heldout["note"]


def test_too_little_heldout_feedback_is_no_decision(registry: ModelRegistry, tmp_path: Path) -> None:
    base, same, reference = _same_head(registry, tmp_path, "short")
    short = _conversations(10, base.embed_dim)  # 40 turns in 10 conversations: below both minimums
    decision = _rejected(registry, base, same, reference, data=short)
    assert len(decision.reasons) == 1 and decision.reasons[0].startswith("the gate does not decide: only 40")
    assert "MELD dev" in decision.reasons[0] and decision.paired is None and decision.heldout["set"] is None


def test_the_base_corpora_are_judged_on_only_when_the_job_allows_it_and_the_decision_says_so(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    base, same, reference = _same_head(registry, tmp_path, "fallback")
    dim = base.embed_dim
    data = DialogueSet.concat([_conversations(10, dim), _conversations(25, dim, source=BASE, seed=6)])
    refused = _rejected(registry, base, same, reference, data=data)
    assert refused.reasons[0].startswith("the gate does not decide") and refused.heldout["set"] is None

    _, again, _ = _same_head(registry, tmp_path, "fallback-allowed")
    decision = _rejected(registry, base, again, reference, data=data, config=GateConfig(base_fallback=True))
    heldout = decision.heldout
    assert (heldout["set"], heldout["turns"], heldout["base"], heldout["feedback"]) == (BASE, 100, 100, 0)
    assert "the shipped model's selection set" in heldout["note"] and "base_fallback" in heldout["note"]
    assert decision.reasons[0].startswith("minority recall gain")  # judged, and the identical candidate fails


@pytest.fixture(scope="module")
def new_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TorchReference]:
    """A tiny model with other weights (a new encoder, as tier 3 makes) and its PyTorch reference."""
    torch.manual_seed(1)
    model = EmotionModel(ModelConfig.tiny()).eval()
    out = tmp_path_factory.mktemp("new-encoder") / "new-encoder"
    return export_artifact(model, out, version="new-encoder", int8=False).path, TorchReference(model)


@pytest.fixture()
def served_with_audio(registry: ModelRegistry, tmp_path: Path) -> tuple[ModelArtifact, DialogueSet]:
    """The champion, and held-out feedback served as text, audio and both, its audio stored."""
    base = registry.verify("tiny-1")
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    return base, _conversations(24, base.embed_dim, turns=3, audio_dir=audio_dir)


def test_a_new_encoder_is_judged_on_every_served_modality(
    registry: ModelRegistry,
    served_with_audio: tuple[ModelArtifact, DialogueSet],
    new_encoder: tuple[Path, TorchReference],
) -> None:
    base, data = served_with_audio
    decision = _rejected(registry, base, new_encoder[0], new_encoder[1], data=data)
    assert decision.parity_max_abs_diff is not None and decision.parity_max_abs_diff <= 1e-4
    assert decision.heldout["reencoded"] and decision.heldout["modalities"] == {TEXT: 24, AUDIO: 24, TEXT_AUDIO: 24}
    assert set(decision.by_modality) == set(SERVED) and decision.paired is not None


def test_a_new_encoder_cannot_be_judged_on_audio_that_was_not_stored(
    registry: ModelRegistry,
    served_with_audio: tuple[ModelArtifact, DialogueSet],
    new_encoder: tuple[Path, TorchReference],
) -> None:
    base, data = served_with_audio
    data.audio_paths = [None] * len(data)  # served with audio, but raw-audio storage was off
    decision = _rejected(registry, base, new_encoder[0], new_encoder[1], data=data)
    assert decision.heldout["unscorable"] == {AUDIO: 24, TEXT_AUDIO: 24} and decision.paired is None
    assert decision.reasons[0].startswith("the gate does not decide: the candidate has a new encoder")


def test_reencoding_uses_the_stored_audio(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    data = _conversations(3, base.embed_dim, turns=3, audio_dir=tmp_path)
    rows = np.ones(len(data), dtype=bool)
    with_audio = heldout_logits(base, data, rows, reencode=True)
    text_only = encode_texts(base, data.texts)
    (without_audio,) = run_context(session(base.context_path), data.dialogues(text_only), [EMOTION_OUTPUT])
    differs = np.abs(with_audio - without_audio).max(axis=1) > 1e-5
    assert differs[data.has_audio].all()  # every turn served with audio is scored with it


def test_the_gate_settings_come_from_the_service_and_the_job() -> None:
    settings = load_settings(gate_macro_f1_tolerance=0.03)
    environment = Environment.from_settings(settings, registry=None)  # type: ignore[arg-type]
    assert environment.gate.macro_f1_tolerance == 0.03
    job = GateConfig.from_params({"gate": {"bootstrap_seed": 7}}, environment.gate)
    assert (job.macro_f1_tolerance, job.bootstrap_seed) == (0.03, 7)
    assert GateConfig.from_params({}).macro_f1_tolerance == GateConfig().macro_f1_tolerance
    with pytest.raises(PermanentError, match="unknown gate settings"):
        GateConfig.from_params({"gate": {"min_macro_f1_gain": 1}})
    for invalid in ({"confidence": 1.0}, {"bootstrap_replicates": 10}, {"min_heldout_conversations": 1}):
        with pytest.raises(PermanentError):
            GateConfig.from_params({"gate": invalid})


def test_the_newest_decision_is_exported_with_its_bounds(
    registry: ModelRegistry, engine: Engine, tmp_path: Path
) -> None:
    base = registry.verify("tiny-1")
    head = read_head(base.context_path)
    lean = np.zeros_like(head.bias)
    lean[EMOTIONS.index("neutral")] = 3.0
    other = EmotionHead(head.weight, head.bias - lean)  # leans less toward neutral: predictions move
    context = write_head(base.context_path, tmp_path / "other.onnx", other)
    decision = run_gate(
        registry,
        base,
        _candidate(base, tmp_path, "other", context),
        HeadReference(base, other),
        _conversations(30, base.embed_dim),
        minority=MINORITY,
        config=GateConfig(),
        recipe={"test": True},
    )
    assert decision.paired is not None
    with session_scope(engine) as session:
        for job_id, result in ((1, decision.to_dict()), (2, {"promoted": False, "reasons": ["parity"]})):
            status = JobStatus.SUCCEEDED
            finished = datetime(2026, 1, job_id, tzinfo=UTC)
            session.add(
                RetrainingJob(
                    trigger=JobTrigger.ADMIN, reason="test", status=status, finished_at=finished, result=result
                )
            )
    # The newest job stopped before the paired test; the one before it is exported.
    exported = {
        (sample.name, sample.labels.get("metric"), sample.labels.get("bound")): sample.value
        for family in MonitoringCollector(engine).collect()
        if family.name.startswith("equipoise_gate_")
        for sample in family.samples
    }
    gains = decision.paired["gains"]
    for metric in ("minority_recall", "macro_f1", "weighted_f1"):
        for bound in ("lower", "estimate", "upper"):
            assert exported[("equipoise_gate_gain", metric, bound)] == pytest.approx(gains[metric][bound])
    assert gains["minority_recall"]["upper"] > gains["minority_recall"]["lower"]  # predictions really moved
    required = ("equipoise_gate_required_lower_bound", "macro_f1", None)
    assert exported[required] == -GateConfig().macro_f1_tolerance
