"""`equipoise demo` on a reduced configuration (windows of 300 turns, two healthy and one recovery window), as a
user runs it: the real command, which starts the real service and worker and runs `equipoise monitor run`. Two
healthy windows, so that the feedback holds the 20 held-out conversations the gate needs by the time the job runs
(one gives 18 with this order of conversations, and the gate does not decide).

About two and a half minutes on two CPU cores: the traffic is short, but the tier-2 job encodes the MELD base corpora
(about a minute) and trains the head on them (about 40 s), whatever the window; a minute more when the shipped
default has to be assembled first (skipped when EQUIPOISE_STATE_DIR already holds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.data, pytest.mark.slow]

WINDOW = 300


def test_the_demo_collapses_retrains_promotes_and_reports(
    data_dir: Path, shipped_default: Path, tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("EQUIPOISE_")}
    arguments = ["--out", str(out), "--data-dir", str(data_dir), "--model", str(shipped_default)]
    reduced = ["--window", str(WINDOW), "--healthy-windows", "2", "--recovery-windows", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "equipoise", "demo", *arguments, *reduced],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "COLLAPSE EVENT" in done.stderr + done.stdout

    summary = json.loads((out / "summary.json").read_text())
    versions = summary["versions"]
    # The collapse fired on the faulty release and queued the job the worker ran, through tier 2 and the gate.
    assert summary["event"]["model_version"] == versions["faulty"]
    assert summary["event"]["reason"].startswith("collapse toward the majority class")
    job = summary["job"]
    assert job["tier"] == 2 and job["promoted"] and job["candidate_version"] == versions["retrained"]
    # The service answered with the new champion after the reload, and the class mix came back.
    served = summary["served"]
    assert served["faulty"]["majority_share"] > 0.8 and served["retrained"]["majority_share"] < 0.6
    heldout = {role: report["minority_recall"] for role, report in summary["heldout"].items()}
    assert heldout["retrained"] > heldout["faulty"] + 0.2, heldout
    report = (out / "report.md").read_text()
    assert versions["retrained"] in report and "**collapse**" in report
    for plot in ("recall_by_model.png", "class_mix.png"):
        assert (out / plot).stat().st_size > 10_000
