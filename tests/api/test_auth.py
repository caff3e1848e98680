"""API keys and roles, and the start-up rules that keep an unauthenticated service on loopback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api.auth import StartupRefused, check_exposure
from core.db import crud, migrate
from core.db.models import Role
from core.db.session import make_engine, session_scope
from tests.api.conftest import InProcess, settings_for


def app_with_keys(
    start_app: Callable[..., InProcess], tmp_path: Path, **settings: Any
) -> tuple[InProcess, dict[str, str]]:
    """An app with auth on, and a key per role created before it starts (it refuses to start without one)."""
    url = str(settings_for(tmp_path).database_url)
    migrate.upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        keys = {role.value: crud.create_api_key(session, f"{role.value}-key", role)[1] for role in Role}
    engine.dispose()
    return start_app(auth_enabled=True, **settings), keys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_roles_are_enforced(
    start_app: Callable[..., InProcess], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app, keys = app_with_keys(start_app, tmp_path)
    client = app.client
    utterance = {"text": "hello"}

    def predict(headers: dict[str, str]) -> int:
        return client.post("/v1/predict/utterance", json=utterance, headers=headers).status_code

    missing = client.post("/v1/predict/utterance", json=utterance)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert predict(bearer("eqp_not-a-key")) == 401
    assert predict(bearer(keys["predict"])) == predict({"X-API-Key": keys["predict"]}) == 200
    assert predict(bearer(keys["admin"])) == 200

    for method, path in [("GET", "/v1/models"), ("POST", "/v1/models/rollback"), ("GET", "/v1/jobs/1")]:
        assert client.request(method, path).status_code == 401
        forbidden = client.request(method, path, headers=bearer(keys["predict"]))
        assert forbidden.status_code == 403 and "admin" in forbidden.json()["detail"]
    assert client.get("/v1/models", headers=bearer(keys["admin"])).status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert client.get(open_path).status_code == 200
    assert not any(key in record.getMessage() for record in caplog.records for key in keys.values())


def test_a_revoked_key_stops_working_once_its_cache_entry_expires(
    start_app: Callable[..., InProcess], tmp_path: Path
) -> None:
    app, keys = app_with_keys(start_app, tmp_path, api_key_cache_s=0)
    key = keys["predict"]
    assert app.client.post("/v1/predict/utterance", json={"text": "hi"}, headers=bearer(key)).status_code == 200
    with session_scope(app.engine) as session:
        assert crud.revoke_api_key(session, "predict-key")
    assert app.client.post("/v1/predict/utterance", json={"text": "hi"}, headers=bearer(key)).status_code == 401


@pytest.fixture()
def migrated(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'equipoise.db'}"
    migrate.upgrade(url)
    return url


def test_auth_off_beyond_loopback_refuses_to_start(tmp_path: Path, migrated: str) -> None:
    engine = make_engine(migrated)
    with pytest.raises(StartupRefused, match="authentication is off.*0.0.0.0"):
        check_exposure(settings_for(tmp_path, host="0.0.0.0", auth_enabled=False), engine)
    engine.dispose()


def test_auth_on_without_any_active_key_refuses_to_start(tmp_path: Path, migrated: str) -> None:
    engine = make_engine(migrated)
    with pytest.raises(StartupRefused, match="no active API key"):
        check_exposure(settings_for(tmp_path, host="0.0.0.0"), engine)
    with session_scope(engine) as session:
        crud.create_api_key(session, "ops", Role.ADMIN)
        crud.revoke_api_key(session, "ops")
    with pytest.raises(StartupRefused, match="no active API key"):
        check_exposure(settings_for(tmp_path, host="0.0.0.0"), engine)
    with session_scope(engine) as session:
        crud.create_api_key(session, "ops-2", Role.ADMIN)
    check_exposure(settings_for(tmp_path, host="0.0.0.0"), engine)
    engine.dispose()


def test_auth_off_on_loopback_starts_with_a_warning(tmp_path: Path, migrated: str) -> None:
    engine = make_engine(migrated)
    assert "authentication is OFF" in (check_exposure(settings_for(tmp_path), engine) or "")
    engine.dispose()
