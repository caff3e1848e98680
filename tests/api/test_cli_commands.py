"""`equipoise serve`, `equipoise models ...` and `equipoise db purge` as an operator runs them."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from core.db.session import get_engine
from core.settings import get_settings
from equipoise.cli import main
from tests.api.conftest import fake_artifact, running_server, server_environment


def equipoise(state: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    environment = server_environment(state, f"sqlite:///{state / 'equipoise.db'}", **settings)
    return subprocess.run(
        [sys.executable, "-m", "equipoise", *args], capture_output=True, text=True, env=environment, timeout=120
    )


@pytest.fixture()
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """`equipoise ARGS` in this process (fast), on a state directory of its own: (status, stdout, stderr)."""
    for name, value in server_environment(tmp_path / "state", f"sqlite:///{tmp_path / 'cli.db'}").items():
        monkeypatch.setenv(name, value)
    caches = (get_settings.cache_clear, get_engine.cache_clear)

    def run(*args: str) -> tuple[int, str, str]:
        output, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
            status = main(list(args))
        return status, output.getvalue(), errors.getvalue()

    for clear in caches:
        clear()
    yield run
    get_engine().dispose()
    for clear in caches:
        clear()


def test_models_are_registered_listed_promoted_and_rolled_back(
    run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    assert run_cli("db", "upgrade")[0] == 0
    for version in ("m-1", "m-2"):
        status, out, err = run_cli("models", "register", str(fake_artifact(tmp_path / "built", version)), "--promote")
        assert status == 0, err
        assert f"promoted {version} to champion" in out
    listed = run_cli("models", "list")[1].splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["m-2", "champion"], ["m-1", "retired"]]
    assert "m-1 is the champion again" in run_cli("models", "rollback")[1]
    status, _, err = run_cli("models", "promote", "m-9")
    assert status == 1 and "no model version 'm-9'" in err
    assert run_cli("models", "rollback")[0] == 1
    status, out, _ = run_cli("db", "purge", "--days", "30")
    assert status == 0 and out.startswith("purged 0 predictions")


def test_serve_refuses_to_start_exposed_without_authentication(tmp_path: Path) -> None:
    exposed = equipoise(tmp_path / "a", "serve", host="0.0.0.0", auth_enabled="false")
    assert exposed.returncode == 2 and "authentication is off" in exposed.stderr and "0.0.0.0" in exposed.stderr
    no_keys = equipoise(tmp_path / "b", "serve", auth_enabled="true")
    assert no_keys.returncode == 2 and "no active API key" in no_keys.stderr


def test_serve_without_any_model_is_alive_but_not_ready(tmp_path: Path) -> None:
    with running_server(tmp_path / "state", f"sqlite:///{tmp_path / 'equipoise.db'}", ready=False) as server:
        assert httpx.get(server.url + "/healthz").status_code == 200
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and "no model" in ready.json()["detail"]
        predict = httpx.post(server.url + "/v1/predict/utterance", json={"text": "hello"})
        assert predict.status_code == 503 and predict.headers["content-type"] == "application/problem+json"
        assert predict.headers["retry-after"] == "1"
    assert "authentication is OFF" in server.log()
