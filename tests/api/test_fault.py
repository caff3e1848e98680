"""Fault test: PostgreSQL stops in the middle of a burst of requests; no accepted prediction is lost or doubled.

The server is stopped (gracefully) while the database is still down, so the rows still in memory must go to
the spool on shutdown; a new server on the same state directory replays them once the database is back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, make_url, select

from core.db.models import Prediction
from core.db.session import make_engine, session_scope
from tests.api.conftest import Server, running_server, wait_for
from tests.conftest import POSTGRES_ADMIN_URL, postgres_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

POSTGRES_ETC = Path("/etc/postgresql")


def _cluster_version() -> str:
    if shutil.which("pg_ctlcluster") is None or not POSTGRES_ETC.is_dir() or os.geteuid() != 0:
        pytest.skip("needs root and a local PostgreSQL cluster managed by pg_ctlcluster")
    if make_url(POSTGRES_ADMIN_URL).host not in ("127.0.0.1", "localhost", None):
        pytest.skip(f"the test PostgreSQL server ({POSTGRES_ADMIN_URL}) is not this machine's")
    return sorted(POSTGRES_ETC.iterdir(), key=lambda path: [int(p) for p in path.name.split(".")])[-1].name


def _pg_ctl(version: str, action: str) -> None:
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    subprocess.run(command + (["-m", "fast"] if action == "stop" else []), check=True, timeout=120, capture_output=True)


def _accepts_connections() -> bool:
    engine = make_engine(POSTGRES_ADMIN_URL, pool_pre_ping=False)
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def postgres_stopped(version: str) -> Iterator[None]:
    """PostgreSQL is down inside the block, and is started again whatever happens, even if the test fails."""
    try:
        _pg_ctl(version, "stop")
        yield
    finally:
        for attempt in range(3):
            try:
                _pg_ctl(version, "start")
                break
            except subprocess.SubprocessError:
                if attempt == 2:
                    raise
                time.sleep(2)
        wait_for(_accepts_connections, timeout_s=60, interval_s=0.2)


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
    tmp_path: Path, tiny_artifact: Path
) -> None:
    version = _cluster_version()
    state = tmp_path / "state"
    settings = {"default_model_dir": str(tiny_artifact), "log_flush_interval_s": "0.1"}
    with postgres_database() as url:
        with running_server(state, url, **settings) as first:
            traffic = Traffic(first).start()
            try:
                time.sleep(0.8)
                with postgres_stopped(version):
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
