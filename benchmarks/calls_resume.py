"""Batch scoring of many calls killed with SIGKILL and resumed (issue 22's acceptance): exactly one output row and one
logged prediction per turn, and the same rows as an uninterrupted run.

    python -m benchmarks.calls_resume --data-dir ../shared/data --calls 100 --json /tmp/calls_resume.json

`--calls` stereo 8 kHz calls of 2-4 clips of RAVDESS's held-out actors (benchmarks/call_builder.py) in a directory;
`equipoise score --calls --log-to-db` runs on them as a child process with the shipped default, is killed after
`--kill-after` calls are committed (most likely inside the next one), and is started again with the same arguments.
An uninterrupted run on a second database is the reference.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from benchmarks.call_builder import assemble, ravdess_utterances
from core.db import migrate
from core.db.models import Prediction
from core.db.session import make_engine, session_scope
from core.processes import spawn
from core.settings import data_dir_or_exit
from scoring.manifest import manifest_path

ROLES = "agent,customer"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--kill-after", type=int, default=40, help="committed calls before the kill (default 40)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def build_calls(data_dir: Path, directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    for index in range(count):
        call = assemble(ravdess_utterances(data_dir, 2 + index % 3, seed=100 + index), seed=100 + index)
        (directory / f"call-{index:03d}.wav").write_bytes(call.wav(8_000))


def score(work: Path, state: Path, name: str, kill_after: int | None = None) -> float:
    """One `equipoise score --calls` run into `work/<state name>.jsonl`; killed after `kill_after` commits."""
    output = work / f"{state.name}.jsonl"
    args = ["score", str(work / "calls"), "--calls", "--out", str(output), "--channels", ROLES, "--log-to-db"]
    settings = {"state_dir": str(state), "intra_op_threads": "0"}
    start = time.perf_counter()
    process = spawn(name, args, settings, work / f"{name}.log")
    while process.alive():
        if kill_after is not None and _commits(output) >= kill_after:
            process.popen.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.popen.wait()
    return time.perf_counter() - start


def _commits(output: Path) -> int:
    path = manifest_path(output)
    return max(0, len(path.read_bytes().splitlines()) - 1) if path.exists() else 0


def logged(state: Path) -> list[tuple[str, int, str]]:
    engine = make_engine(f"sqlite:///{state / 'equipoise.db'}")
    with session_scope(engine) as session:
        rows = session.execute(select(Prediction.conversation_id, Prediction.turn_index, Prediction.label)).all()
    engine.dispose()
    return sorted((str(c), int(t), str(label)) for c, t, label in rows)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = data_dir_or_exit(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="equipoise-calls-resume-") as temporary:
        return _measure(args, data_dir, Path(temporary))


def _measure(args: argparse.Namespace, data_dir: Path, work: Path) -> dict[str, Any]:
    build_calls(data_dir, work / "calls", args.calls)
    states = {name: work / name for name in ("resumed", "reference")}
    for state in states.values():
        state.mkdir()
        migrate.upgrade(f"sqlite:///{state / 'equipoise.db'}")
    killed_s = score(work, states["resumed"], "killed", args.kill_after)
    committed = _commits(work / "resumed.jsonl")
    resumed_s = score(work, states["resumed"], "resumed")
    reference_s = score(work, states["reference"], "reference")
    rows = [json.loads(line) for line in (work / "resumed.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (work / "reference.jsonl").read_text().splitlines()]
    keys = Counter((row["conversation_id"], row["turn"]) for row in rows if not row["error"])
    return {
        "calls": args.calls,
        "committed_before_kill": committed,
        "seconds": {"killed": killed_s, "resumed": resumed_s, "reference": reference_s},
        "turns": len(keys),
        "most_rows_for_one_turn": max(keys.values()),
        "rows_equal_reference": [_kept(r) for r in rows] == [_kept(r) for r in reference],
        "logged_predictions": len(logged(states["resumed"])),
        "logged_equal_reference": logged(states["resumed"]) == logged(states["reference"]),
        "errors": sum(1 for row in rows if row["error"]),
    }


def _kept(row: dict[str, Any]) -> tuple[Any, ...]:
    """What must not change between runs: the turn, its times and text, the label (probabilities to 1e-4)."""
    probabilities = tuple(round(value, 4) for key, value in sorted(row.items()) if key.startswith("p_"))
    return (row["conversation_id"], row["turn"], row["start_s"], row["end_s"], row["text"], row["label"], probabilities)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    figures = measure(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
