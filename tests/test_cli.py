"""The `equipoise` entry point as a user runs it: a real subprocess against a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.db import migrate

COMMANDS = ("serve", "train", "export", "score", "monitor", "worker", "keys", "db")


def _run(args: list[str], state_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EQUIPOISE_")}
    environment.update(EQUIPOISE_STATE_DIR=str(state_dir), **env)
    return subprocess.run(
        [sys.executable, "-m", "equipoise", *args], capture_output=True, text=True, env=environment, timeout=120
    )


def test_help_lists_every_sub_command(tmp_path: Path) -> None:
    result = _run(["--help"], tmp_path)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    result = _run(["db", "upgrade"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"at revision {migrate.head_revision('sqlite://')}" in result.stdout
    assert (tmp_path / "equipoise.db").is_file()


def test_keys_are_created_listed_and_revoked_without_printing_them_again(tmp_path: Path) -> None:
    assert _run(["db", "upgrade"], tmp_path).returncode == 0
    created = _run(["keys", "create", "ops", "--role", "admin"], tmp_path)
    raw_key = created.stdout.strip().splitlines()[-1]
    assert raw_key.startswith("eqp_")
    listed = _run(["keys", "list"], tmp_path)
    assert "ops\tadmin" in listed.stdout and raw_key not in listed.stdout
    assert _run(["keys", "revoke", "ops"], tmp_path).returncode == 0
    assert "revoked" in _run(["keys", "list"], tmp_path).stdout
    assert _run(["keys", "revoke", "ops"], tmp_path).returncode == 1


@pytest.mark.parametrize(("variable", "value"), [("EQUIPOISE_PORT", "eighty"), ("EQUIPOISE_NOT_A_SETTING", "1")])
def test_bad_settings_fail_at_start_up_naming_the_setting(tmp_path: Path, variable: str, value: str) -> None:
    result = _run(["db", "upgrade"], tmp_path, **{variable: value})
    assert result.returncode == 2
    assert variable in result.stderr
    assert not (tmp_path / "equipoise.db").exists()
