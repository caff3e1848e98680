"""Security: admin routes refuse predict keys and no key; keys never reach the logs or the database; personal
data is redacted before anything is written; the retention purge removes what it should and nothing else.

Already covered elsewhere, not repeated here: roles on three admin routes in-process and the promote route over
HTTP with the access log free of valid keys (tests/api/test_auth.py, tests/api/test_server.py), the redaction
patterns themselves (tests/api/test_redaction.py), redacted rows in the database from the logger
(tests/api/test_prediction_log.py) and one purge of one expired prediction (tests/api/test_service.py).
This file adds what those leave open: admin routes enumerated from the app's route table rather than listed by
hand, wrong keys, the database and every file the server writes, the spool during an outage, and a purge through
the `equipoise db purge` command with rows on both sides of the cut-off.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import Engine, LargeBinary, MetaData, func, select, text
from sqlalchemy.orm import Session

from api import deps
from api.app import create_app
from core.db import crud, migrate
from core.db.models import (
    ApiKey,
    Feedback,
    JobTrigger,
    ModelStatus,
    ModelVersion,
    MonitoringSnapshot,
    Prediction,
    RequestKind,
    RetrainingJob,
    Role,
)
from core.db.session import make_engine, session_scope
from tests.api.conftest import (
    Server,
    add_version,
    keys_by_role,
    running_server,
    server_environment,
    settings_for,
    wait_for,
)
from tests.api.test_prediction_log import Outage, make_logger, record
from tests.hardening.conftest import FIGURES

pytestmark = pytest.mark.slow

EMAIL, CARD, PHONE = "jane.roe+vip@example.org", "4111 1111 1111 1111", "+44 20 7946 0958"
PERSONAL = (EMAIL, CARD, PHONE, "4111111111111111", "jane.roe")


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class AuthServer:
    server: Server
    keys: dict[Role, str]
    wrong_key: str
    state_dir: Path

    def headers(self, key: str, style: str = "bearer") -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if style == "bearer" else {"X-API-Key": key}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> Iterator[AuthServer]:
    """A real server with auth on, debug logging and redaction on (the default), a key per role."""
    root = tmp_path_factory.mktemp("security")
    url = f"sqlite:///{root / 'equipoise.db'}"
    keys = keys_by_role(url)
    wrong = "eqp_" + secrets.token_urlsafe(24)  # the shape of a real key, unknown to the server
    with running_server(
        root / "state", url, default_model_dir=str(tiny_artifact), auth_enabled="true", log_level="debug"
    ) as server:
        yield AuthServer(server, keys, wrong, root / "state")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    has_body: bool


def admin_routes() -> list[Route]:
    """The routes of the app that need the admin role: found by their dependency on the admin-key check, and
    required to match the routes tagged `admin` (a route in the admin section without the check fails here)."""
    app = create_app(settings_for(Path("/nonexistent-equipoise-state")))

    def needs_admin(dependant: Any) -> bool:
        return any(sub.call is deps._admin_key or needs_admin(sub) for sub in dependant.dependencies)

    guarded, tagged = [], []
    for context in iter_route_contexts(app.routes):  # included routers flattened, prefixes applied
        if not isinstance(context.original_route, APIRoute):
            continue  # the documentation pages
        routes = [Route(method, context.path, context.body_field is not None) for method in sorted(context.methods)]
        if needs_admin(context.dependant):
            guarded.extend(routes)
        if "admin" in context.tags:
            tagged.extend(routes)
    assert guarded == tagged
    return guarded


def request_target(route: Route) -> tuple[str, str, dict[str, Any]]:
    """A method, a concrete path and a well-formed body for `route`, so that only the key decides the answer."""
    path = re.sub(r"\{version\}", "tiny-0.1", route.path)
    path = re.sub(r"\{[^}]+\}", "1", path)
    return route.method, path, {"reason": "security test"} if route.has_body else {}


def every_text_value(engine: Engine) -> Iterator[tuple[str, str]]:
    """(table.column, value as text) for every non-null value of every table of the database."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(table.select()).mappings():
                for column, value in row.items():
                    if value is None:
                        continue
                    if isinstance(table.c[column].type, LargeBinary) or isinstance(value, bytes):
                        value = bytes(value).decode("latin-1")
                    yield f"{table.name}.{column}", value if isinstance(value, str) else json.dumps(value, default=str)


def every_file_text(directory: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes().decode("utf-8", errors="replace")


def wav_bytes(seconds: float = 0.4) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * np.sin(np.arange(int(seconds * 16000)) / 7)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ admin routes


def test_every_admin_route_refuses_no_key_wrong_keys_and_predict_keys(auth_server: AuthServer) -> None:
    routes = admin_routes()
    assert len(routes) >= 5  # list, promote, rollback, create and read jobs at the time of writing
    predict, admin = auth_server.keys[Role.PREDICT], auth_server.keys[Role.ADMIN]
    answers: dict[str, dict[str, int]] = {}
    with auth_server.server.client() as client:
        for route in routes:
            method, path, body = request_target(route)

            def send(headers: dict[str, str], payload: Any = body, method: str = method, path: str = path) -> int:
                return client.request(method, path, json=payload, headers=headers).status_code

            refused = {
                "no key": send({}),
                "no key, malformed body": send({}, payload=["not", "an", "object"]),
                "bearer without a key": send({"Authorization": "Bearer"}),
                "basic credentials": send({"Authorization": "Basic YWRtaW46YWRtaW4="}),
                "unknown key": send(auth_server.headers(auth_server.wrong_key)),
                "predict key (Bearer)": send(auth_server.headers(predict)),
                "predict key (X-API-Key)": send(auth_server.headers(predict, "x-api-key")),
                "predict key, malformed body": send(auth_server.headers(predict), payload=["x"]),
            }
            answers[f"{method} {route.path}"] = refused
            expected = {name: 403 if name.startswith("predict") else 401 for name in refused}
            assert refused == expected, f"{method} {path}"
        with session_scope(make_engine(auth_server.server.database_url)) as session:
            assert session.scalar(select(func.count()).select_from(RetrainingJob)) == 0  # no refused call acted
        # The same requests with the admin key get through to the handlers: the refusals above were the keys'.
        for route in routes:
            method, path, body = request_target(route)
            status = client.request(method, path, json=body, headers=auth_server.headers(admin)).status_code
            assert status not in (401, 403), f"{method} {path} refused the admin key"
            answers[f"{method} {route.path}"]["admin key"] = status
    FIGURES.append(f"admin routes from the route table: {len(routes)}")
    for label, statuses in answers.items():
        FIGURES.append(f"  {label}: {statuses}")


# ------------------------------------------------------------------------------------------------ keys


def test_keys_never_reach_the_log_or_the_database(auth_server: AuthServer) -> None:
    keys = [*auth_server.keys.values(), auth_server.wrong_key]
    with auth_server.server.client() as client:
        for key in keys:
            for style in ("bearer", "x-api-key"):
                headers = auth_server.headers(key, style)
                client.post("/v1/predict/utterance", json={"text": "key check"}, headers=headers)
                client.get("/v1/models", headers=headers)
                client.get("/v1/jobs/999", headers=headers)
                client.post("/v1/predict/dialogue", content=b"{broken", headers=headers | {"content-type": "x/y"})
    engine = make_engine(auth_server.server.database_url)
    wait_for(lambda: crud_count(engine, Prediction) >= 4)  # the accepted predictions are stored...
    sent = len(keys) * 2 * 4  # the access log is written by its own thread: wait for every request's line
    log = wait_for(lambda: (text := auth_server.server.log()).count("uvicorn.access") >= sent and text)
    assert '"POST /v1/predict/utterance HTTP/1.1" 401' in log  # ...and the refused requests are in the access log
    for key in keys:
        secret = key.removeprefix("eqp_")
        assert secret not in log
        assert not [column for column, value in every_text_value(engine) if secret in value]
        assert not [path for path, content in every_file_text(auth_server.state_dir) if secret in content]
    with session_scope(engine) as session:
        stored = {row.name: (row.prefix, row.key_sha256) for row in session.scalars(select(ApiKey))}
    for role, key in auth_server.keys.items():  # only a short prefix, to tell keys apart in listings
        prefix, _ = stored[f"{role.value}-key"]
        assert key.startswith(prefix) and len(prefix) <= len("eqp_") + 6 < len(key) - 16
    engine.dispose()


def crud_count(engine: Engine, model: type[Any]) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# ------------------------------------------------------------------------------------------------ redaction


def test_personal_data_is_redacted_before_any_write(auth_server: AuthServer) -> None:
    said = f"my card is {CARD}, mail {EMAIL} or call {PHONE}"
    headers = auth_server.headers(auth_server.keys[Role.PREDICT])
    with auth_server.server.client() as client:
        sent = [
            client.post("/v1/predict/utterance", json={"text": said, "speaker": "caller"}, headers=headers),
            client.post(
                "/v1/predict/dialogue",
                json={"conversation_id": "call-pii", "turns": [{"text": "hello"}, {"text": said}]},
                headers=headers,
            ),
            client.post(
                "/v1/predict/utterance",
                data={"text": said},
                files={"audio": ("pii.wav", wav_bytes())},
                headers=headers,
            ),
            client.post(
                "/v1/predict/dialogue",
                data={"turns": json.dumps([{"text": said}]), "context": "causal"},
                files={"audio_0": ("pii.wav", wav_bytes())},
                headers=headers,
            ),
            client.post(
                "/v1/predict/utterance",
                json={"text": said, "audio": base64.b64encode(wav_bytes()).decode()},
                headers=headers,
            ),
        ]
    assert [response.status_code for response in sent] == [200] * 5, [response.text for response in sent]
    engine = make_engine(auth_server.server.database_url)
    stored = wait_for(lambda: (rows := stored_texts(engine)) and sum("[CARD]" in text for text in rows) >= 5 and rows)
    assert sum(text == "my card is [CARD], mail [EMAIL] or call [PHONE]" for text in stored) >= 5
    leaks = [column for column, value in every_text_value(engine) if any(item in value for item in PERSONAL)]
    assert leaks == [], f"personal data stored in {leaks}"
    files = [path for path, content in every_file_text(auth_server.state_dir) if any(p in content for p in PERSONAL)]
    assert files == [], f"personal data written to {files}"
    assert not any(item in auth_server.server.log() for item in PERSONAL)
    engine.dispose()


def stored_texts(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return [value for value in session.scalars(select(Prediction.text)) if value]


def test_the_spool_holds_only_redacted_text_during_an_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other place prediction rows are written: the spool (and rejected.jsonl) while the database is down."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    add_version(engine)
    outage = Outage(monkeypatch)
    outage.down = True
    logger, _ = make_logger(engine, tmp_path)
    logger.RETRY_FIRST_S = 60.0  # no replay during the test: the rows stay in the spool
    logger.start()
    logger.submit([record(f"card {CARD} mail {EMAIL}"), record(f"phone {PHONE}")])
    assert logger.flush(timeout_s=10)
    spooled = "".join(content for _, content in every_file_text(tmp_path / "spool"))
    assert "[CARD]" in spooled and "[EMAIL]" in spooled and "[PHONE]" in spooled
    assert not any(item in spooled for item in PERSONAL)
    outage.down = False
    logger.close()
    assert not any(item in value for _, value in every_text_value(engine) for item in PERSONAL)
    engine.dispose()


# ------------------------------------------------------------------------------------------------ retention

AGES_DAYS = {"ancient": 400.0, "old": 31.0, "just-expired": 30.0 + 1 / 24, "just-kept": 30.0 - 1 / 24, "new": 0.0}
RETENTION_DAYS = 30


def seed_history(session: Session, audio_dir: Path, now: datetime) -> dict[str, uuid.UUID]:
    """Two predictions per age (one with feedback and stored audio), and rows of every other kind, all old."""
    ancient = now - timedelta(days=1000)
    session.add(
        ModelVersion(
            version="v-old",
            status=ModelStatus.CHAMPION,
            artifact_path="/nonexistent/v-old",
            artifact_sha256="0" * 64,
            labels=["neutral", "joy"],
            created_at=ancient,
        )
    )
    session.flush()
    session.add(RetrainingJob(trigger=JobTrigger.ADMIN, reason="old job", created_at=ancient, updated_at=ancient))
    session.add(
        MonitoringSnapshot(
            model_version="v-old",
            created_at=ancient,
            window_start=ancient,
            window_end=ancient,
            n_predictions=1,
            n_labelled=0,
            class_shares={},
            reference_shares={},
            majority_share=1.0,
        )
    )
    crud.create_api_key(session, "old-admin", Role.ADMIN)[0].created_at = ancient
    ids = {}
    for name, days in AGES_DAYS.items():
        for copy in ("a", "b"):
            created = now - timedelta(days=days)
            audio = audio_dir / f"{name}-{copy}.wav"
            audio.parent.mkdir(parents=True, exist_ok=True)
            audio.write_bytes(b"RIFF")
            prediction = Prediction(
                id=uuid.uuid4(),
                created_at=created,
                model_version="v-old",
                request_kind=RequestKind.UTTERANCE,
                has_text=True,
                has_audio=copy == "a",
                text=f"{name} {copy}",
                audio_path=str(audio) if copy == "a" else None,
                label="joy",
                label_index=1,
                confidence=0.9,
                probabilities=[0.1, 0.9],
                latency_ms=1.0,
            )
            session.add(prediction)
            if copy == "a":
                session.add(Feedback(prediction=prediction, label="neutral", created_at=created))
            ids[f"{name}-{copy}"] = prediction.id
    return ids


def test_the_purge_command_removes_expired_rows_and_nothing_else(database_url: str, tmp_path: Path) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    state = tmp_path / "state"
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        ids = seed_history(session, state / "audio", now)
    other_tables = ["model_versions", "retraining_jobs", "monitoring_snapshots", "api_keys"]
    before = {table: table_count(engine, table) for table in other_tables}

    run = subprocess.run(
        [sys.executable, "-m", "equipoise", "db", "purge", "--days", str(RETENTION_DAYS)],
        capture_output=True,
        text=True,
        env=server_environment(state, database_url),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    expired = {name for name, days in AGES_DAYS.items() if days > RETENTION_DAYS}
    assert f"purged {2 * len(expired)} predictions" in run.stdout and f"and {len(expired)} stored audio" in run.stdout

    with session_scope(engine) as session:
        kept = set(session.scalars(select(Prediction.id)))
        feedback_of = set(session.scalars(select(Feedback.prediction_id)))
    expected = {key for key, value in ids.items() if key.rsplit("-", 1)[0] not in expired}
    assert kept == {ids[key] for key in expected}
    assert feedback_of == {ids[key] for key in expected if key.endswith("-a")}
    for name in AGES_DAYS:
        assert (state / "audio" / f"{name}-a.wav").exists() == (name not in expired), name
        assert (state / "audio" / f"{name}-b.wav").exists()  # not referenced by any row: never touched
    assert {table: table_count(engine, table) for table in other_tables} == before
    FIGURES.append(
        f"retention purge ({engine.dialect.name}, --days {RETENTION_DAYS}): {run.stdout.strip()}; "
        f"{len(kept)} newer predictions and every other table kept"
    )
    engine.dispose()


def table_count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_a_purge_larger_than_one_chunk_removes_every_expired_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge deletes in chunks of CHUNK rows; a chunk boundary must not stop it early nor cross the cut-off."""
    from api import retention

    monkeypatch.setattr(retention, "CHUNK", 3)
    url = f"sqlite:///{tmp_path / 'chunks.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        seed_history(session, tmp_path / "audio", now)  # 6 expired, 4 kept
    result = retention.purge(engine, RETENTION_DAYS, now=now)
    assert (result.predictions, result.audio_files) == (6, 3)
    assert table_count(engine, "predictions") == 4 and table_count(engine, "feedback") == 2
    engine.dispose()
