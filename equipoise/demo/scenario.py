"""The demo's phases: setup, healthy traffic, a faulty release and its collapse, retraining, recovery, report
(the story the report tells: `equipoise.demo.state.STORY`)."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine
from tqdm import tqdm

from core.db.models import CollapseEvent, JobStatus, MonitoringSnapshot, RetrainingJob
from core.db.session import make_engine, session_scope
from core.processes import Process, wait_for
from equipoise.demo.report import write_report
from equipoise.demo.services import DemoError, Deployment, Service, running_service, running_worker
from equipoise.demo.state import MAJORITY, MINORITY, Demo, DemoConfig, Timeline, events, say, snapshots
from equipoise.demo.traffic import Stream, meld_conversations
from model.artifact import CONTEXT_FILE, ModelArtifact, derive_artifact, load_artifact

# ---------------------------------------------------------------------------------------------- setup


def faulty_release(base: ModelArtifact, out: Path, bias: float) -> ModelArtifact:
    """`base` with `bias` added to the neutral logit of its emotion head; everything else, card data included,
    unchanged."""
    from retraining.graphs import EmotionHead, read_head, write_head

    head = read_head(base.context_path)
    lean = np.zeros_like(head.bias)
    lean[base.emotions.index(MAJORITY)] = bias
    work = out / "work"
    context = write_head(base.context_path, work / CONTEXT_FILE, EmotionHead(head.weight, head.bias + lean))
    version = f"{base.version}-faulty"
    card = (
        f"# {version}\n\nA deliberately faulty release made by `equipoise demo`: {base.version} with {bias:+g} added "
        f"to the {MAJORITY} logit of its emotion head. It carries {base.version}'s metrics and reference class mix, "
        "as a release whose packaging went wrong would.\n"
    )
    artifact = derive_artifact(base, out / version, version=version, graphs={CONTEXT_FILE: context}, card_text=card)
    shutil.rmtree(work)
    return artifact


def prepare(config: DemoConfig) -> Deployment:
    """A fresh OUT (state directory, SQLite database, logs) and the settings every process shares."""
    out = config.out
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"{out} is not empty; give --out a new directory")
    logs = out / "logs"
    logs.mkdir(parents=True)
    settings = {
        "data_dir": str(config.data_dir),
        "default_model_dir": str(config.model_dir),
        "shipped_default": "false",
        "device": "cpu",
        "monitor_in_service": "false",  # the demo runs `equipoise monitor run` after every window, as cron would
        "monitor_window": str(config.window),
        "minority_classes": ",".join(MINORITY),
        "model_poll_interval_s": "1",
        "log_flush_interval_s": "0.2",
        "log_level": "info",
    }
    return Deployment(out / "state", f"sqlite:///{out / 'equipoise.db'}", logs, settings)


# ---------------------------------------------------------------------------------------------- monitoring


def _minority_recall(row: MonitoringSnapshot) -> str:
    estimated = "-" if row.minority_recall_estimated is None else f"{row.minority_recall_estimated:.2f}"
    if row.minority_recall_measured is None or row.minority_recall_measured_halfwidth is None:
        return f"{estimated} (estimated)"
    measured = f"{row.minority_recall_measured:.2f} ± {row.minority_recall_measured_halfwidth:.2f}"
    return f"{measured} measured, {estimated} estimated"


def monitor(demo: Demo) -> list[CollapseEvent]:
    """`equipoise monitor run`; prints the new windows; the collapse events it recorded."""
    seen_snapshots, seen_events = len(snapshots(demo.engine)), {e.id for e in events(demo.engine)}
    demo.deployment.command("monitor", "run")
    for row in snapshots(demo.engine)[seen_snapshots:]:
        recall = _minority_recall(row)
        say(
            f"monitor: window of {row.n_predictions} ({row.model_version}): {MAJORITY} {row.majority_share:.2f} "
            f"of predictions (reference {row.reference_shares[MAJORITY]:.2f}), minority recall {recall}, "
            f"class-mix drift {'yes' if row.drift_detected else 'no'}"
        )
    new = [event for event in events(demo.engine) if event.id not in seen_events]
    for event in new:
        say(f"monitor: COLLAPSE EVENT {event.id} on {event.model_version}: queued retraining job {event.job_id}")
    return new


def traffic_windows(demo: Demo, service: Service, phase: str, windows: int, stop_on_event: bool) -> list[Any]:
    """Up to `windows` windows of conversations, `equipoise monitor run` after each; stops at an event if asked."""
    fired: list[CollapseEvent] = []
    with service.client() as client:
        for k in range(windows):
            sent = demo.stream.send(client, phase, demo.config.window, f"{phase} window {k + 1}")
            if not sent:
                break
            fired += monitor(demo)
            if fired and stop_on_event:
                break
    return fired


# ---------------------------------------------------------------------------------------------- phases


def healthy(demo: Demo, service: Service) -> None:
    demo.versions["default"] = service.serving() or ""
    say(f"service {service.url} serves {demo.versions['default']}; worker polling the job queue")
    fired = traffic_windows(demo, service, "healthy", demo.config.healthy_windows, stop_on_event=False)
    if fired:
        raise DemoError(f"the detector fired on the healthy default: events {[e.id for e in fired]}")


def collapse(demo: Demo, service: Service) -> CollapseEvent:
    faulty = faulty_release(load_artifact(demo.config.model_dir), demo.config.out / "releases", demo.config.bias)
    demo.versions["faulty"], demo.artifacts["faulty"] = faulty.version, faulty.path
    demo.deployment.command("models", "register", str(faulty.path), "--promote")
    wait_for(lambda: service.serving() == faulty.version, 120, f"the service to load {faulty.version}")
    say(f"promoted {faulty.version} ({demo.config.bias:+g} on the {MAJORITY} logit); the service reloaded it")
    fired = traffic_windows(demo, service, "faulty", demo.config.max_collapse_windows, stop_on_event=True)
    if not fired:
        raise DemoError(f"no collapse event after {demo.config.max_collapse_windows} windows on {faulty.version}")
    return fired[0]


def job_row(engine: Engine, job_id: int) -> RetrainingJob:
    with session_scope(engine) as session:
        job = session.get_one(RetrainingJob, job_id)
        session.expunge(job)
        return job


def retraining(demo: Demo, service: Service, worker: Process, event: CollapseEvent) -> RetrainingJob:
    assert event.job_id is not None
    job = wait_job(demo, worker, event.job_id)
    result = job.result
    if job.status != JobStatus.SUCCEEDED:
        raise DemoError(f"retraining job {job.id} {job.status.value}: {job.error}\n{job.log[-2000:]}")
    say(f"job {job.id}: tier {result['tier']} ({result['tier_reason']}), gate: {_verdict(result)}")
    if not result.get("promoted"):
        raise DemoError(f"the gate rejected {job.candidate_version}: {result.get('reasons')}")
    new = str(job.candidate_version)
    wait_for(lambda: service.serving() == new, 120, f"the service to hot-reload {new}")
    demo.versions["retrained"] = new
    say(f"the service hot-reloaded {new}")
    return job


def _verdict(result: dict[str, Any]) -> str:
    champion, candidate = result.get("champion") or {}, result.get("candidate") or {}
    scores = (
        f"macro F1 {champion.get('macro_f1', 0):.3f} -> {candidate.get('macro_f1', 0):.3f}, minority recall "
        f"{champion.get('minority_recall') or 0:.3f} -> {candidate.get('minority_recall') or 0:.3f} "
        f"on {result.get('heldout', {}).get('turns', 0)} held-out turns"
    )
    return f"promoted ({scores})" if result.get("promoted") else f"rejected ({scores}): {result.get('reasons')}"


def wait_job(demo: Demo, worker: Process, job_id: int) -> RetrainingJob:
    """The job once finished, with a bar of the elapsed time and its newest log line."""
    deadline = time.monotonic() + demo.config.job_timeout_s
    with tqdm(desc=f"job {job_id}", bar_format="{desc}: {elapsed}{postfix}", leave=False) as bar:
        while True:
            job = job_row(demo.engine, job_id)
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
                return job
            worker.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"job {job_id} still {job.status.value} after {demo.config.job_timeout_s:.0f} s")
            lines = job.log.strip().splitlines()
            latest = lines[-1].split("] ", 1)[-1] if lines else "waiting for the worker"
            bar.set_postfix_str(f"{job.status.value}: {latest[:80]}")
            bar.update(0)
            time.sleep(1.0)


def recovery(demo: Demo, service: Service) -> None:
    fired = traffic_windows(demo, service, "retrained", demo.config.recovery_windows, stop_on_event=False)
    served = {turn.version for turn in demo.stream.sent if turn.phase == "retrained"}
    if served and served != {demo.versions["retrained"]}:
        raise DemoError(f"after the reload the service answered with {sorted(served)}")
    if fired:
        raise DemoError(f"the detector fired on the retrained champion: events {[e.id for e in fired]}")


# ---------------------------------------------------------------------------------------------- the demo


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """The whole loop; returns the summary also written to OUT/summary.json (the report to OUT/report.md)."""
    timeline = Timeline()
    with ExitStack() as stack:
        with timeline.phase("setup", f"fresh state and SQLite database in {config.out}; service and worker"):
            deployment = prepare(config)
            engine = make_engine(deployment.database_url)
            stack.callback(engine.dispose)
            stream = Stream.of(meld_conversations(config.data_dir, config.seed, config.conversations))
            demo = Demo(config, deployment, engine, stream, timeline, artifacts={"default": config.model_dir})
            service = stack.enter_context(running_service(deployment))
            worker = stack.enter_context(running_worker(deployment))
        _phases(demo, service, worker)
        stack.close()  # the service and the worker stop before the offline evaluation
        with timeline.phase("report", "per-class recall of the three models on the held-out feedback; plots"):
            return write_report(demo)


def _phases(demo: Demo, service: Service, worker: Process) -> None:
    config = demo.config
    with demo.timeline.phase("healthy traffic", f"{config.healthy_windows} windows of {config.window} turns"):
        healthy(demo, service)
    with demo.timeline.phase("faulty release", f"promote the default with {config.bias:+g} on the {MAJORITY} logit"):
        event = collapse(demo, service)
    with demo.timeline.phase("retraining", f"`equipoise worker` runs job {event.job_id}; the gate decides"):
        job = retraining(demo, service, worker, event)
    with demo.timeline.phase("recovery", f"{config.recovery_windows} windows of traffic on the retrained champion"):
        recovery(demo, service)
    demo.summary.update(
        event={"id": event.id, "model_version": event.model_version, "reason": event.reason},
        job=_job_summary(job),
    )
    demo.artifacts["retrained"] = Path(_artifact_path(demo, demo.versions["retrained"]))


def _job_summary(job: RetrainingJob) -> dict[str, Any]:
    seconds = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
    return {
        **job.result,
        "id": job.id,
        "tier": job.tier,
        "seconds": seconds,
        "candidate_version": job.candidate_version,
    }


def _artifact_path(demo: Demo, version: str) -> str:
    from model.registry import ModelRegistry

    return ModelRegistry(demo.engine, demo.deployment.state_dir / "models").get(version).artifact_path
