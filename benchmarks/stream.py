"""Live streams: per-turn latency of /v1/stream at 1 and 32 concurrent calls, beside resending the dialogue so far.

    python -m benchmarks.stream --model /tmp/eqstate/default-model/equipoise-default-1.0.1 --streams 1,32 --seconds 30

`equipoise serve` runs as a child process (core/processes.py) on a free loopback port with the model as champion,
a new SQLite database in a temporary directory, prediction logging on, CPU, `--intra-op-threads` ONNX Runtime
threads (default 1, the README's advice for 2-core hosts) and the production defaults otherwise.

Each simulated call takes MELD dialogues (`--split`, default test; blank turns dropped) from a shuffled rotation
of its own: it opens a stream, sends the turns one at a time, each as soon as the previous one is answered
(closed loop; `--think-ms` waits in between), closes it and opens the next. The latency of a turn is client-side,
from sending it to reading its prediction; throughput counts turns answered per wall-clock second. Each level
(`--streams`) runs for `--seconds` at most and `--turns` turns at most, after a warm-up.

The comparison (`--no-baseline` skips it) is what a client had to do without streams: the same calls, each turn
posted as the whole dialogue so far to POST /v1/predict/dialogue with `context: causal`, reading the last turn.
Before measuring, one dialogue is streamed and checked against /v1/predict/dialogue (causal): every probability
must agree to 1e-5.

The report (markdown) goes to stdout, progress to stderr; the exit status is 1 when a check fails or a turn was
refused. Figures and their reading: docs/BENCHMARKS.md, "Live streams".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.load import percentile_ms
from core.processes import Service, running_service
from core.settings import data_dir_or_exit

TOLERANCE = 1e-5
DIALOGUE_PATH = "/v1/predict/dialogue"
STREAM, RESEND = "stream", "resend"
Turn = dict[str, str]


@dataclass
class Level:
    """What one concurrency level measured."""

    mode: str
    streams: int
    latencies: list[float] = field(default_factory=list)  # seconds per answered turn
    errors: int = 0
    wall_s: float = 0.0
    load_after: float = 0.0

    @property
    def turns(self) -> int:
        return len(self.latencies)

    def row(self) -> str:
        p50, p95, p99 = (percentile_ms(self.latencies, q) for q in (50, 95, 99))
        rate = self.turns / self.wall_s if self.wall_s else 0.0
        return (
            f"| {self.mode} | {self.streams} | {self.turns:,} | {self.errors} | {rate:.1f} | "
            f"{p50 or 0:.1f} | {p95 or 0:.1f} | {p99 or 0:.1f} | {self.load_after:.2f} |"
        )


@dataclass
class Budget:
    """A level's end: `turns` answered or `deadline` passed, whichever comes first."""

    turns: int
    deadline: float
    answered: int = 0

    def open(self) -> bool:
        return self.answered < self.turns and time.monotonic() < self.deadline


def meld_dialogues(data_dir: Path, split: str, max_turns: int) -> list[list[Turn]]:
    from model.data.meld import group_dialogues, read_utterances

    dialogues = []
    for dialogue in group_dialogues(read_utterances(data_dir, split)):
        turns = [{"text": u.text, "speaker": u.speaker} for u in dialogue.utterances if u.text.strip()]
        if turns:
            dialogues.append(turns[:max_turns])
    return dialogues


# ------------------------------------------------------------------------------------------------ clients


def ws_url(service: Service) -> str:
    return service.url.replace("http://", "ws://", 1) + "/v1/stream"


async def receive(connection: ClientConnection) -> dict[str, Any]:
    return json.loads(await connection.recv())  # type: ignore[no-any-return]


async def stream_dialogue(
    service: Service, turns: list[Turn], on_answer: Callable[[float, dict[str, Any]], bool], think_s: float = 0.0
) -> None:
    """One call over /v1/stream; `on_answer(latency_s, message)` after each turn, False to stop early."""
    async with connect(ws_url(service), proxy=None, max_size=None) as connection:
        await connection.send(json.dumps({"type": "open"}))
        opened = await receive(connection)
        if opened["type"] != "opened":
            raise RuntimeError(f"the stream was not opened: {opened}")
        for turn in turns:
            started = time.perf_counter()
            await connection.send(json.dumps({"type": "turn", **turn}))
            message = await receive(connection)
            if message["type"] == "escalation":  # MELD has no "customer" speaker, but a call could
                message = await receive(connection)
            if not on_answer(time.perf_counter() - started, message):
                return
            await asyncio.sleep(think_s)
        await connection.send(json.dumps({"type": "close"}))
        while (await receive(connection))["type"] != "closed":
            pass


async def resend_dialogue(
    client: httpx.AsyncClient, turns: list[Turn], on_answer: Callable[[float, dict[str, Any]], bool], think_s: float
) -> None:
    """The same call without streams: each turn posts the dialogue so far (causal) and reads its last turn."""
    for count in range(1, len(turns) + 1):
        started = time.perf_counter()
        response = await client.post(DIALOGUE_PATH, json={"turns": turns[:count], "context": "causal"})
        answer = response.json()["turns"][-1] if response.status_code == 200 else {"status": response.status_code}
        if not on_answer(time.perf_counter() - started, {"type": "prediction", **answer}):
            return
        await asyncio.sleep(think_s)


async def run_level(
    service: Service, mode: str, streams: int, dialogues: list[list[Turn]], budget: Budget, think_s: float, seed: int
) -> Level:
    level = Level(mode, streams)

    def on_answer(latency_s: float, message: dict[str, Any]) -> bool:
        if message.get("type") == "prediction" and "emotion" in message:
            level.latencies.append(latency_s)
            budget.answered += 1
        else:
            level.errors += 1
        return budget.open()

    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:

        async def call_loop(number: int) -> None:
            rotation = dialogues[:]
            random.Random(seed * 1_000 + number).shuffle(rotation)
            position = 0
            while budget.open():
                turns = rotation[position % len(rotation)]
                position += 1
                if mode == STREAM:
                    await stream_dialogue(service, turns, on_answer, think_s)
                else:
                    await resend_dialogue(client, turns, on_answer, think_s)

        started = time.monotonic()
        await asyncio.gather(*(call_loop(number) for number in range(streams)))
        level.wall_s = time.monotonic() - started
    level.load_after = os.getloadavg()[0]
    return level


async def check_agreement(service: Service, turns: list[Turn]) -> float:
    """The largest gap between a streamed answer and /v1/predict/dialogue (causal) on the whole dialogue."""
    streamed: list[dict[str, Any]] = []

    def keep(_latency_s: float, message: dict[str, Any]) -> bool:
        streamed.append(message)
        return True

    await stream_dialogue(service, turns, keep)
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
        response = await client.post(DIALOGUE_PATH, json={"turns": turns, "context": "causal"})
    response.raise_for_status()
    gaps = [
        abs(answer[key][label] - expected[key][label])
        for answer, expected in zip(streamed, response.json()["turns"], strict=True)
        for key in ("probabilities", "sentiment_probabilities")
        for label in expected[key]
    ]
    return max(gaps)


# ------------------------------------------------------------------------------------------------ the run


async def measure(service: Service, args: argparse.Namespace, dialogues: list[list[Turn]]) -> tuple[float, list[Level]]:
    gap = await check_agreement(service, max(dialogues[:50], key=len))
    warmup = Budget(args.warmup_turns, time.monotonic() + 60)
    await run_level(service, STREAM, 4, dialogues, warmup, 0.0, args.seed)
    modes = (STREAM,) if args.no_baseline else (STREAM, RESEND)
    levels = []
    for streams in args.streams:
        for mode in modes:
            print(f"{mode}: {streams} concurrent calls ...", file=sys.stderr)
            budget = Budget(args.turns, time.monotonic() + args.seconds)
            levels.append(await run_level(service, mode, streams, dialogues, budget, args.think_ms / 1000, args.seed))
    return gap, levels


def server_settings(args: argparse.Namespace, root: Path) -> dict[str, str]:
    return {
        "state_dir": str(root / "state"),
        "database_url": f"sqlite:///{root / 'equipoise.db'}",
        "default_model_dir": str(args.model),
        "shipped_default": "false",
        "device": "cpu",
        "intra_op_threads": str(args.intra_op_threads),
        "stream_max_open": str(max(args.streams) + 8),
        "log_predictions": "true",
        "monitor_in_service": "false",
    }


def report(args: argparse.Namespace, argv: Sequence[str], gap: float, levels: list[Level], load_before: float) -> str:
    lines = [
        "# Live streams (/v1/stream)",
        "",
        f"- Command: `python -m benchmarks.stream {' '.join(argv)}`",
        f"- Machine: {os.cpu_count()} logical CPUs, {platform.machine()}, Python {platform.python_version()}; "
        f"1-minute load average {load_before:.2f} before the run",
        f"- Model: {args.model.name}, fp32, CPU, ONNX Runtime threads {args.intra_op_threads}; prediction logging on",
        f"- MELD {args.split} dialogues, closed loop (think time {args.think_ms:g} ms); each level at most "
        f"{args.seconds:g} s and {args.turns:,} turns",
        f"- Streamed answers vs /v1/predict/dialogue (causal): largest probability gap {gap:.1e} "
        f"({'PASS' if gap <= TOLERANCE else 'FAIL'}, tolerance {TOLERANCE:g})",
        "",
        "| mode | concurrent calls | turns | errors | turns/s | p50 ms | p95 ms | p99 ms | load after |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        *(level.row() for level in levels),
        "",
        "stream: one WebSocket per call, one turn per message, context kept by the service; "
        "resend: each turn posts the dialogue so far to /v1/predict/dialogue (causal).",
    ]
    return "\n".join(lines)


def _counts(value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in value.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an artifact directory (e.g. the assembled default)")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"), help="MELD split (test)")
    parser.add_argument("--streams", type=_counts, default=(1, 32), help="concurrent calls per level (1,32)")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of a level at most (30)")
    parser.add_argument("--turns", type=int, default=20_000, help="turns of a level at most (20000)")
    parser.add_argument("--warmup-turns", type=int, default=100, help="streamed turns before measuring (100)")
    parser.add_argument("--max-turns", type=int, default=200, help="turns of a dialogue at most (the stream limit)")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause between a call's turns (0: closed loop)")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="EQUIPOISE_INTRA_OP_THREADS (1)")
    parser.add_argument("--no-baseline", action="store_true", help="streams only, no resending of dialogues")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    dialogues = meld_dialogues(data_dir_or_exit(args.data_dir), args.split, args.max_turns)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="equipoise-stream-") as temporary:
        root = Path(temporary)
        with running_service(server_settings(args, root), root / "server.log", timeout_s=300) as service:
            gap, levels = asyncio.run(measure(service, args, dialogues))
    text = report(args, argv, gap, levels, load_before)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0 if gap <= TOLERANCE and not any(level.errors for level in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
