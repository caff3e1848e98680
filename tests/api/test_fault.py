"""Fault test: PostgreSQL stops in the middle of a burst of requests; no accepted prediction is lost or doubled.

The server is stopped (gracefully) while the database is still down, so the rows still in memory must go to
the spool on shutdown; a new server on the same state directory replays them once the database is back. The
PostgreSQL that stops is a cluster of the test's own (`pg_createcluster`, dropped afterwards), so the other
tests, which `make test` runs beside this one, keep the shared server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from core.db.models import Prediction
from core.db.session import make_engine, session_scope
from core.processes import free_port
from tests.api.conftest import Server, running_server, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

POSTGRES_ETC = Path("/etc/postgresql")


@dataclass(frozen=True)
class Cluster:
    """A PostgreSQL cluster managed by the Debian cluster tools, and the URL of its `postgres` database."""

    version: str
    name: str
    url: str

    def ctl(self, action: str) -> None:
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action]
        options = ["-m", "fast"] if action == "stop" else []
        subprocess.run(command + options, check=True, timeout=120, capture_output=True)

    def accepts_connections(self) -> bool:
        engine = make_engine(self.url, pool_pre_ping=False)
        try:
            with engine.connect():
                return True
        except Exception:
            return False
        finally:
            engine.dispose()


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    """A running PostgreSQL cluster of this test's own, with trust authentication on a free local port."""
    if shutil.which("pg_createcluster") is None or not POSTGRES_ETC.is_dir() or os.geteuid() != 0:
        pytest.skip("needs root and PostgreSQL's cluster tools (pg_createcluster, pg_ctlcluster)")
    version = sorted(POSTGRES_ETC.iterdir(), key=lambda path: [int(p) for p in path.name.split(".")])[-1].name
    name, port = f"equipoise_fault_{uuid.uuid4().hex[:8]}", free_port()
    create = ["pg_createcluster", version, name, "-p", str(port), "--", "--auth-host=trust", "--auth-local=trust"]
    subprocess.run(create, check=True, timeout=120, capture_output=True)
    try:
        created = Cluster(version, name, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
        created.ctl("start")
        wait_for(created.accepts_connections, timeout_s=60, interval_s=0.2)
        yield created
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name], check=False, timeout=120, capture_output=True)


@contextlib.contextmanager
def stopped(cluster: Cluster) -> Iterator[None]:
    """The cluster is down inside the block, and is started again whatever happens, even if the test fails."""
    try:
        cluster.ctl("stop")
        yield
    finally:
        for attempt in range(3):
            try:
                cluster.ctl("start")
                break
            except subprocess.SubprocessError:
                if attempt == 2:
                    raise
                time.sleep(2)
        wait_for(cluster.accepts_connections, timeout_s=60, interval_s=0.2)


class Traffic:
    """Threads posting utterances and dialogues, keeping the prediction ids of every accepted (200) response."""

    def __init__(self, server: Server, threads: int = 6) -> None:
        self.server = server
        self.accepted: list[str] = []
        self.refused: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post, args=(i,)) for i in range(threads)]

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(60)

    def _post(self, worker: int) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            number = 0
            while not self._stop.is_set():
                number += 1
                text = f"worker {worker} request {number}: I want my money back"
                if number % 3:
                    response = client.post("/v1/predict/utterance", json={"text": text})
                    ids = [response.json()["prediction_id"]] if response.status_code == 200 else []
                else:
                    turns = [{"text": text, "speaker": "c"}, {"text": "Sorry to hear that.", "speaker": "a"}]
                    response = client.post("/v1/predict/dialogue", json={"turns": turns, "context": "causal"})
                    ids = [t["prediction_id"] for t in response.json()["turns"]] if response.status_code == 200 else []
                self.accepted.extend(ids)
                if response.status_code != 200:
                    self.refused.append(response.status_code)


def _metric(server: Server, sample: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(sample + " ")), "0"))


def test_every_accepted_prediction_is_stored_exactly_once_across_a_postgres_outage(
    tmp_path: Path, tiny_artifact: Path, cluster: Cluster
) -> None:
    state, url = tmp_path / "state", cluster.url
    settings = {"default_model_dir": str(tiny_artifact), "log_flush_interval_s": "0.1"}
    with running_server(state, url, **settings) as first:
        traffic = Traffic(first).start()
        try:
            time.sleep(0.8)
            with stopped(cluster):
                before_outage = len(traffic.accepted)
                time.sleep(2.0)
                during_outage = len(traffic.accepted) - before_outage
                spooled = _metric(first, 'equipoise_log_rows_total{outcome="spooled"}')
                traffic.stop()
                first.stop()  # a graceful stop with the database still down
        finally:
            traffic.stop()
    assert "Application shutdown complete" in first.log()
    assert during_outage > 0 and spooled > 0, "the outage did not exercise the spool"
    assert list((state / "spool").glob("segment-*.jsonl")), "the shutdown should have left rows in the spool"

    with running_server(state, url, **settings) as second:
        after = Traffic(second, threads=2).start()
        try:
            time.sleep(0.8)
        finally:
            after.stop()
        wait_for(lambda: _metric(second, "equipoise_log_spooled_rows") == 0, timeout_s=60)
    counts = _stored_counts(url)

    accepted = traffic.accepted + after.accepted
    assert traffic.refused == [] and after.refused == []
    assert len(set(accepted)) == len(accepted)
    assert set(counts) == set(accepted), "missing or unexpected prediction rows"
    assert set(counts.values()) == {1}


def _stored_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            rows = session.execute(select(Prediction.id, func.count()).group_by(Prediction.id)).all()
    finally:
        engine.dispose()
    return {str(prediction_id): count for prediction_id, count in rows}
