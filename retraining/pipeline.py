"""One retraining job, as resumable steps: base model -> data -> tier -> candidate -> gate.

The base is the job's base_version (else the champion when the job first ran, recorded so a retry keeps it); the
tier is chosen once (step "tier") and recorded on the job; each tier's training writes its own steps; the gate
registers the candidate and promotes or rejects it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from core.db.models import CollapseEvent
from core.db.session import session_scope
from core.settings import Settings
from model.artifact import ModelArtifact
from model.registry import ModelRegistry, RegistryError
from retraining import tier1_priors, tier2_head, tier3_finetune
from retraining.dataset import DialogueSet, base_dialogues, feedback_dialogues, recent_probabilities
from retraining.gate import GateDecision, run_gate
from retraining.gate_config import GateConfig
from retraining.queue import ENGINES, PermanentError
from retraining.steps import JobContext, Outcome
from retraining.tiers import Draft, Evidence, TierChoice, TierInputs, TierRules, choose_tier, finalise

BUILDERS = {1: tier1_priors.build, 2: tier2_head.build, 3: tier3_finetune.build}
META_FILE, CHOICE_FILE, DECISION_FILE = "meta.json", "choice.json", "decision.json"


@dataclass(frozen=True)
class Environment:
    registry: ModelRegistry
    state_dir: Path
    data_dir: Path | None
    minority: tuple[str, ...]
    device: str  # torch device for tier 3
    gate: GateConfig = GateConfig()  # the service's gate settings; a job's params["gate"] overrides them

    @classmethod
    def from_settings(cls, settings: Settings, registry: ModelRegistry) -> Environment:
        cuda = settings.device != "cpu" and torch.cuda.is_available()
        gate = GateConfig(macro_f1_tolerance=settings.gate_macro_f1_tolerance)
        return cls(
            registry, settings.state_dir, settings.data_dir, settings.minority_classes, "cuda" if cuda else "cpu", gate
        )


def candidate_version(base_version: str, job_id: int) -> str:
    return f"{base_version[:96]}-retrain{job_id}"


def retrain(ctx: JobContext, env: Environment) -> Outcome:
    if ctx.job.engine not in ENGINES:
        raise PermanentError(f"unknown engine {ctx.job.engine!r}; expected one of {ENGINES}")
    base = _base(ctx, env.registry)
    data_dir = ctx.step("data", lambda out: _assemble(out, ctx, env, base))
    data, meta = DialogueSet.load(data_dir), _read(data_dir / META_FILE)
    ctx.log(f"data: {meta['stats']}")
    minority = tuple(name for name in env.minority if name in base.emotions.names)
    choice = TierChoice(**_read(ctx.step("tier", lambda out: _choose(out, ctx, meta, minority)) / CHOICE_FILE))
    ctx.log(f"tier {choice.tier}: {choice.reason}")
    ctx.queue.record(ctx.job.id, tier=choice.tier)
    params = ctx.job.params
    inputs = TierInputs(
        base=base,
        data=data,
        data_dir=data_dir,
        version=candidate_version(base.version, ctx.job.id),
        params=params,
        minority=minority,
        engine=ctx.job.engine,
        device=env.device,
        gate=GateConfig.from_params(params, env.gate),
        corpora=env.data_dir,
        cache_dir=env.state_dir / "cache",
    )
    draft = BUILDERS[choice.tier](ctx, inputs)
    artifact_dir = finalise(ctx, inputs, draft)
    decision = GateDecision(
        **_read(ctx.step("gate", lambda out: _gate(out, ctx, env, inputs, artifact_dir, draft)) / DECISION_FILE)
    )
    result = {
        "tier": choice.tier,
        "tier_reason": choice.reason,
        "engine": ctx.job.engine,
        "base_version": base.version,
        "data": meta["stats"],
        "collapse": meta["collapse"],
        **decision.to_dict(),
    }
    return Outcome(result, decision.version)


def _base(ctx: JobContext, registry: ModelRegistry) -> ModelArtifact:
    version = ctx.job.base_version
    if version is None:
        champion = registry.champion()
        if champion is None:
            raise PermanentError("no champion to retrain and the job names no base version")
        version = champion.version
        ctx.queue.record(ctx.job.id, base_version=version)
    try:
        return registry.verify(version)
    except RegistryError as error:
        raise PermanentError(f"base model {version}: {error}") from error


def _assemble(out: Path, ctx: JobContext, env: Environment, base: ModelArtifact) -> None:
    params = ctx.job.params
    with session_scope(env.registry.engine) as session:
        feedback, stats = feedback_dialogues(session, base, max_labelled=int(params.get("max_feedback", 50_000)))
        recent = recent_probabilities(session, base.version, base.emotions, int(params.get("prior_window", 2_000)))
        event = session.scalar(select(CollapseEvent).where(CollapseEvent.job_id == ctx.job.id))
        collapse = {"event_id": event.id, "reason": event.reason, "evidence": event.evidence} if event else None
    corpora = None
    if params.get("use_base_data", True):
        limit = params.get("base_max_dialogues")
        cache = env.state_dir / "cache" / "base"
        corpora = base_dialogues(env.data_dir, base, cache, max_dialogues=int(limit) if limit else None)
    data = DialogueSet.concat([feedback, *([corpora] if corpora is not None else [])])
    data.save(out)
    np.save(out / "recent_probabilities.npy", recent)
    counts = feedback.class_counts(feedback.labels >= 0, len(base.emotions))
    per_class = dict(zip(base.emotions.names, counts.tolist(), strict=True))
    evidence = Evidence(labelled=stats.labelled, per_class=per_class, recent_predictions=len(recent))
    base_turns = 0 if corpora is None else len(corpora)
    meta = {
        "stats": {**asdict(stats), "per_class": per_class, "base_turns": base_turns, "recent_predictions": len(recent)},
        "evidence": asdict(evidence),
        "collapse": collapse,
    }
    _write(out / META_FILE, meta)


def _choose(out: Path, ctx: JobContext, meta: dict[str, Any], minority: tuple[str, ...]) -> None:
    choice = choose_tier(ctx.job.tier, Evidence(**meta["evidence"]), TierRules.from_params(ctx.job.params), minority)
    _write(out / CHOICE_FILE, asdict(choice))


def _gate(out: Path, ctx: JobContext, env: Environment, inputs: TierInputs, artifact_dir: Path, draft: Draft) -> None:
    decision = run_gate(
        env.registry,
        inputs.base,
        artifact_dir,
        draft.reference,
        inputs.data,
        minority=inputs.minority,
        config=inputs.gate,
        recipe=draft.recipe,
        log=ctx.log,
    )
    _write(out / DECISION_FILE, decision.to_dict())


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
