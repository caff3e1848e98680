"""The retraining loop end to end, with a real service process, a real worker process and a real database.

Real MELD test conversations go through `equipoise serve`, whose champion (the tiny test model with its emotion
head leaning toward neutral) answers nearly everything with "neutral": the logged class mix has collapsed. The
gold labels come back through /v1/feedback. `equipoise monitor run` sees the collapse, records a collapse event
and queues a retraining job; `equipoise worker` runs it (tier 2: the emotion head retrained, class-balanced, on
the logged embeddings plus the base corpora, on the CPU) in under three minutes; the gate promotes the candidate;
the service hot-reloads it and answers with the new version, whose minority recall on the held-out feedback is
higher, measured by the gate and again here from the service's own answers. A candidate the gate rejects is
registered but never served.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from core.db.models import (
    CollapseEvent,
    JobStatus,
    JobTrigger,
    ModelStatus,
    ModelVersion,
    MonitoringSnapshot,
    RetrainingJob,
)
from core.db.session import make_engine, session_scope
from core.processes import Process, equipoise_environment, spawn, wait_for
from core.redaction import text_sha256
from model.artifact import derive_artifact, load_artifact
from model.data.meld import Dialogue, group_dialogues, read_utterances
from model.labels import EMOTIONS
from monitoring.estimation import mean_recall, measure_recall
from retraining.dataset import conversation_key, is_heldout
from tests.api.conftest import Server, running_server, server_settings

pytestmark = [pytest.mark.data, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
MINORITY = ("sadness", "disgust", "fear")  # the product's default minority_classes
MONITOR_WINDOW = 300  # predictions per monitoring window (the detector needs two suspicious ones to fire)
JOB_BUDGET_S = 180.0  # tier 2 on the CPU: "in under three minutes"
IMPOSSIBLE_GATE = {"gate": {"macro_f1_tolerance": -1.0}}  # a macro F1 gain above +1.0: impossible
# Tier 3 on the tiny model with part of the base corpora: long enough to be killed mid-way, short enough for CI.
FINE_TUNING = {"fine_tuning": {"epochs": 4}, "base_max_dialogues": 300}
SHORT_LEASE_S = "3"  # the killed worker's lease: the successor takes over this long after the kill


@dataclass(frozen=True)
class Sent:
    """One turn as the service answered it, with its gold label."""

    conversation: int  # index into Production.dialogues
    text: str
    label: str
    predicted: str
    version: str
    prediction_id: str


@dataclass
class Production:
    server: Server
    state_dir: Path
    database_url: str
    engine: Engine
    data_dir: Path
    dialogues: list[Dialogue]
    turns: list[Sent]
    champion: str

    def client(self) -> httpx.Client:
        return self.server.client()

    def command(self, *args: str, timeout_s: float = 120, **settings: str) -> subprocess.CompletedProcess[str]:
        """`python -m equipoise ARGS` on the service's database and state directory, to completion."""
        return subprocess.run(
            [sys.executable, "-m", "equipoise", *args],
            cwd=REPO_ROOT,
            env=equipoise_environment(self.settings(**settings)),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def settings(self, **settings: str) -> dict[str, str]:
        return server_settings(self.state_dir, self.database_url, **settings)


def _context(index: int) -> str:
    return ("causal", "bidirectional")[index % 2]  # production uses both context modes


def _post_dialogue(client: httpx.Client, dialogue: Dialogue, index: int, suffix: str = "") -> dict[str, Any]:
    body = {
        "turns": [{"text": u.text, "speaker": u.speaker} for u in dialogue.utterances],
        "context": _context(index),
        "conversation_id": f"meld-test-{dialogue.dialogue_id}{suffix}",
    }
    response = client.post("/v1/predict/dialogue", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _serving(client: httpx.Client) -> str | None:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return response.json()["serving"]


def _job(client: httpx.Client, job_id: int) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _finished(client: httpx.Client, job_id: int, worker: Process | None = None) -> Callable[[], Any]:
    def check() -> dict[str, Any] | None:
        job = _job(client, job_id)
        if job["status"] in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value):
            return job
        if worker is not None and not worker.alive():
            pytest.fail(
                f"the worker exited with {worker.popen.returncode} before job {job_id} finished: {job['status']}"
            )
        return None

    return check


def _heldout(production: Production, turn: Sent) -> bool:
    """In the gate's held-out split: the hash of the conversation the service logged it in."""
    conversation = f"meld-test-{production.dialogues[turn.conversation].dialogue_id}"
    return is_heldout(conversation_key(conversation, text_sha256(turn.text)))


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _minority_recall(labels: Sequence[str], predicted: Sequence[str]) -> float:
    true, guessed = [EMOTIONS.index(x) for x in labels], [EMOTIONS.index(x) for x in predicted]
    recall = mean_recall(measure_recall(true, guessed, EMOTIONS), MINORITY)
    assert recall is not None, "no minority turn in the held-out feedback"
    return recall


@contextlib.contextmanager
def _worker(production: Production, log_path: Path, *args: str) -> Iterator[Process]:
    """`python -m equipoise worker ARGS`, stopped with SIGTERM (then killed) however the block ends."""
    worker = spawn("worker", ["worker", *args], production.settings(data_dir=str(production.data_dir)), log_path)
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def collapsed_champion(champion_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model leaning hard toward neutral (tests/retraining/conftest.py), with the reference profile a
    healthy model recorded on held-out data: MELD's own class mix. Against it the monitor sees the collapse."""
    train = Counter(u.emotion for u in read_utterances(data_dir, "train"))
    shares = {name: train[name] / sum(train.values()) for name in EMOTIONS}
    out = tmp_path_factory.mktemp("collapsed") / "tiny-collapsed-1"
    derive_artifact(load_artifact(champion_dir), out, version="tiny-collapsed-1", reference_distribution=shares)
    return out


@pytest.fixture(scope="module")
def production(
    collapsed_champion: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Production]:
    """The service on a fresh SQLite database with the collapsed champion, after it answered every MELD test
    conversation and received the gold label of every turn as feedback."""
    root = tmp_path_factory.mktemp("e2e")
    state_dir, database_url = root / "state", f"sqlite:///{root / 'equipoise.db'}"
    # Production drifted toward emotional calls: the MELD test conversations with a minority-class turn.
    dialogues = [
        dialogue
        for dialogue in group_dialogues(read_utterances(data_dir, "test"))
        if any(utterance.emotion in MINORITY for utterance in dialogue.utterances)
    ]
    # every prediction is offered for audit, and every gold label comes back as one: a random sample of the traffic
    settings = {"default_model_dir": str(collapsed_champion), "monitor_in_service": "false", "audit_share": "1"}
    with running_server(state_dir, database_url, **settings) as server, server.client() as client:
        champion = _serving(client)
        assert champion == "tiny-collapsed-1"
        turns = []
        for index, dialogue in enumerate(dialogues):
            answer = _post_dialogue(client, dialogue, index)
            for utterance, turn in zip(dialogue.utterances, answer["turns"], strict=True):
                turns.append(
                    Sent(
                        index,
                        utterance.text,
                        utterance.emotion,
                        turn["emotion"],
                        answer["model_version"],
                        turn["prediction_id"],
                    )
                )
        for turn, utterance in zip(turns, (u for d in dialogues for u in d.utterances), strict=True):
            feedback = {
                "prediction_id": turn.prediction_id,
                "label": turn.label,
                "sentiment": utterance.sentiment,
                "source": "e2e",
                "kind": "audit",
            }
            response = client.post("/v1/feedback", json=feedback)
            assert response.status_code == 201, response.text
        engine = make_engine(database_url)
        try:
            yield Production(server, state_dir, database_url, engine, data_dir, dialogues, turns, champion)
        finally:
            engine.dispose()


def test_a_collapse_is_retrained_gated_promoted_and_served(production: Production, tmp_path: Path) -> None:
    turns = production.turns
    # The traffic really collapsed: the champion answers (nearly) everything with the majority class.
    assert {turn.version for turn in turns} == {production.champion}
    neutral_share = sum(turn.predicted == "neutral" for turn in turns) / len(turns)
    assert neutral_share > 0.9, neutral_share

    # The monitor turns the collapse into one event and one retraining job.
    monitor = production.command("monitor", "run", monitor_window=str(MONITOR_WINDOW))
    assert monitor.returncode == 0, monitor.stderr
    with session_scope(production.engine) as session:
        events = list(session.scalars(select(CollapseEvent)))
        snapshots = list(session.scalars(select(MonitoringSnapshot)))
        assert len(snapshots) >= 2, monitor.stdout
        assert len(events) == 1, f"{monitor.stdout}\n{[s.majority_share for s in snapshots]}"
        event = events[0]
        assert event.model_version == production.champion and event.job_id is not None
        assert event.reason.startswith("collapse toward the majority class")
        job_id = event.job_id

    with production.client() as client:
        job = _job(client, job_id)
        assert (job["status"], job["trigger"]) == (JobStatus.QUEUED.value, JobTrigger.COLLAPSE.value)

        # The worker runs it: tier 2, on the CPU, within the budget.
        started = time.monotonic()
        with _worker(production, tmp_path / "worker.log", "--poll", "0.5") as worker:
            job = wait_for(_finished(client, job_id, worker), JOB_BUDGET_S + 60, f"job {job_id}", interval_s=1)
            waited = time.monotonic() - started
            assert worker.stop() == 0, worker.log()
        log = (tmp_path / "worker.log").read_text()
        assert job["status"] == JobStatus.SUCCEEDED.value, f"{job['error']}\n{log}"
        result = job["result"]
        assert job["tier"] == 2 and result["tier"] == 2 and job["attempts"] == 1, result.get("tier_reason")
        assert result["collapse"]["event_id"] == event.id
        job_seconds = _seconds(job["started_at"], job["finished_at"])
        assert job_seconds < JOB_BUDGET_S and waited < JOB_BUDGET_S, (job_seconds, waited)
        print(f"job {job_id}: {job_seconds:.1f} s in the worker, {waited:.1f} s from the worker's start")

        # Gated on the held-out feedback and promoted.
        assert result["promoted"], result["reasons"]
        assert result["parity_max_abs_diff"] is not None and result["parity_max_abs_diff"] <= 1e-4
        assert result["heldout"]["feedback"] >= 100 and result["heldout"]["base"] == 0
        assert result["heldout"]["set"] == "feedback" and result["heldout"]["conversations"] >= 20
        gains = result["paired"]["gains"]  # the paired bootstrap over conversations cleared both bounds
        assert gains["minority_recall"]["lower"] > 0 and gains["macro_f1"]["lower"] > -0.01
        print(f"gate: {result['heldout']}, gains {gains}")
        champion, candidate = result["champion"], result["candidate"]
        assert candidate["minority_recall"] > champion["minority_recall"] + 0.02
        assert candidate["macro_f1"] > champion["macro_f1"]
        new = job["candidate_version"]
        assert new == f"{production.champion}-retrain{job_id}"
        versions = {row["version"]: row for row in client.get("/v1/models").json()["versions"]}
        assert (
            versions[new]["status"] == ModelStatus.CHAMPION.value
            and versions[new]["parent_version"] == production.champion
        )
        assert versions[production.champion]["status"] == ModelStatus.RETIRED.value

        # The running service hot-reloads the new champion and answers with it.
        wait_for(lambda: _serving(client) == new, 60, f"the service serving {new}")
        probe = client.post("/v1/predict/utterance", json={"text": "I am so sad, I cannot stop crying."})
        assert probe.status_code == 200 and probe.json()["model_version"] == new

        # Minority recall on the held-out feedback, from the service's own answers: old champion vs new.
        heldout = {turn.conversation for turn in turns if _heldout(production, turn)}
        old, fresh, labels = [], [], []
        for index in sorted(heldout):
            answer = _post_dialogue(client, production.dialogues[index], index, suffix="-again")
            assert answer["model_version"] == new
            sent = [turn for turn in turns if turn.conversation == index]
            for turn, again in zip(sent, answer["turns"], strict=True):
                old.append(turn.predicted)
                fresh.append(again["emotion"])
                labels.append(turn.label)
    before, after = _minority_recall(labels, old), _minority_recall(labels, fresh)
    assert len(labels) >= 100 and after > before + 0.02, (before, after)


def test_a_candidate_the_gate_rejects_is_never_served(production: Production, tmp_path: Path) -> None:
    with production.client() as client:
        serving = _serving(client)
        assert serving is not None
        response = client.post(
            "/v1/jobs", json={"reason": "e2e: an impossible gate", "tier": 2, "params": IMPOSSIBLE_GATE}
        )
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        seen = set()
        with _worker(production, tmp_path / "worker.log", "--once") as worker:

            def done() -> dict[str, Any] | None:
                seen.add(_serving(client))
                return _finished(client, job_id, None)()

            job = wait_for(done, JOB_BUDGET_S + 60, f"job {job_id}")
            assert worker.popen.wait(timeout=60) == 0, worker.log()
        assert job["status"] == JobStatus.SUCCEEDED.value, job["error"]
        result, rejected = job["result"], job["candidate_version"]
        assert not result["promoted"] and any("macro F1" in reason for reason in result["reasons"])
        versions = {row["version"]: row for row in client.get("/v1/models").json()["versions"]}
        assert versions[rejected]["status"] == ModelStatus.REJECTED.value
        assert "macro F1" in versions[rejected]["rejection_reason"]
        assert versions[serving]["status"] == ModelStatus.CHAMPION.value

        time.sleep(2)  # several reload polls (0.5 s) later, the service still serves the champion
        seen.add(_serving(client))
        probe = client.post("/v1/predict/utterance", json={"text": "That is disgusting."})
        assert probe.status_code == 200
        assert seen == {serving} and probe.json()["model_version"] == serving


def _job_row(production: Production, job_id: int) -> RetrainingJob:
    with session_scope(production.engine) as session:
        job = session.get(RetrainingJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _registry_rows(production: Production) -> dict[str, str]:
    with session_scope(production.engine) as session:
        return {row.version: row.status.value for row in session.scalars(select(ModelVersion))}


def test_a_worker_killed_mid_fine_tuning_is_taken_over_and_the_champion_is_untouched(
    production: Production, tmp_path: Path
) -> None:
    with production.client() as client:
        serving, registry_before = _serving(client), _registry_rows(production)
        body = {"reason": "e2e: kill -9 mid-training", "tier": 3, "params": FINE_TUNING}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        with _worker(production, tmp_path / "killed.log", "--poll", "0.5", "--lease", SHORT_LEASE_S) as killed:
            wait_for(lambda: "step finetune: started" in _job_row(production, job_id).log, 120, "fine-tuning")
            time.sleep(3.0)  # inside the training loop by now
            killed.popen.kill()
            assert killed.popen.wait(timeout=30) == -signal.SIGKILL
        orphan = _job_row(production, job_id)
        assert (orphan.status, orphan.attempts, orphan.candidate_version) == (JobStatus.RUNNING, 1, None)
        assert _registry_rows(production) == registry_before and _serving(client) == serving

        with _worker(production, tmp_path / "successor.log", "--poll", "0.5") as successor:
            started = time.monotonic()
            job = wait_for(_finished(client, job_id, successor), 600, f"job {job_id} after the takeover", 1)
            print(f"job {job_id}: finished {time.monotonic() - started:.1f} s after the successor started")
        log = (tmp_path / "successor.log").read_text()
        assert job["status"] == JobStatus.SUCCEEDED.value, f"{job['error']}\n{log}"
        assert job["attempts"] == 2 and "took over from" in _job_row(production, job_id).log
        result, candidate = job["result"], job["candidate_version"]
        assert result["tier"] == 3 and result["parity_max_abs_diff"] <= 1e-4
        registry_after = _registry_rows(production)
        # Only the gate's verdict changed the registry: one new version, the champion kept unless it was promoted.
        assert set(registry_after) == set(registry_before) | {candidate}
        if result["promoted"]:
            assert registry_after[candidate] == ModelStatus.CHAMPION.value
        else:
            assert registry_after[candidate] == ModelStatus.REJECTED.value
            assert registry_after[serving] == ModelStatus.CHAMPION.value and _serving(client) == serving
