"""`equipoise jobs` and `equipoise worker` as an operator runs them (subprocesses, SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], state_dir: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EQUIPOISE_")}
    environment["EQUIPOISE_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "equipoise", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=180,
        cwd=REPO_ROOT,
    )


def test_submit_list_work_and_show(tmp_path: Path) -> None:
    assert _run(["db", "upgrade"], tmp_path).returncode == 0
    submitted = _run(
        [
            "jobs",
            "submit",
            "--tier",
            "2",
            "--reason",
            "minority recall fell",
            "--params",
            '{"gate": {"macro_f1_tolerance": 0.02}}',
        ],
        tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "queued job 1 (tier 2, engine local)" in submitted.stdout
    assert _run(["jobs", "submit", "--reason", "x", "--params", "[1]"], tmp_path).returncode == 2

    listed = _run(["jobs", "list", "--status", "queued"], tmp_path)
    assert listed.stdout.startswith("1\tqueued\ttier 2\tlocal\tadmin\t0/3")

    # No model is registered: the job cannot be retried into success and fails at once, with the reason.
    worked = _run(["worker", "--once"], tmp_path)
    assert worked.returncode == 0, worked.stderr
    shown = _run(["jobs", "show", "1"], tmp_path)
    assert "status: failed" in shown.stdout and "no champion to retrain" in shown.stdout
    assert '"macro_f1_tolerance": 0.02' in shown.stdout and "claimed: attempt 1/3" in shown.stdout
    assert _run(["jobs", "show", "99"], tmp_path).returncode == 1
