"""`equipoise demo`: arguments and entry point (heavy imports only when it runs)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="new directory for everything (default: ./equipoise-demo-<time>)")
    parser.add_argument("--data-dir", type=Path, help="corpora with meld/ (default: the data_dir setting)")
    parser.add_argument(
        "--model", type=Path, help="first champion's artifact (default: the shipped default, assembled once)"
    )
    parser.add_argument("--window", type=int, default=400, help="predictions per monitoring window (default 400)")
    parser.add_argument(
        "--bias", type=float, default=5.0, help="added to the faulty release's neutral logit (default 5)"
    )
    parser.add_argument("--healthy-windows", type=int, default=2, help="windows on the default first (default 2)")
    parser.add_argument("--recovery-windows", type=int, default=2, help="windows after the reload (default 2)")
    parser.add_argument("--conversations", type=int, help="stream at most this many MELD test conversations")
    parser.add_argument("--seed", type=int, default=0, help="order of the conversations (default 0)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from core.processes import ProcessError
    from equipoise.demo.scenario import run_demo
    from equipoise.demo.services import DemoError
    from equipoise.demo.state import DemoConfig

    data_dir = args.data_dir or settings.data_dir
    if data_dir is None or not (Path(data_dir) / "meld").is_dir():
        print(f"equipoise demo: no MELD under {data_dir}; set --data-dir or EQUIPOISE_DATA_DIR", file=sys.stderr)
        return 2
    config = DemoConfig(
        out=(args.out or Path(f"equipoise-demo-{datetime.now():%Y%m%d-%H%M%S}")).resolve(),
        data_dir=Path(data_dir).resolve(),
        model_dir=(args.model or _shipped_default(settings)).resolve(),
        window=args.window,
        bias=args.bias,
        healthy_windows=args.healthy_windows,
        recovery_windows=args.recovery_windows,
        conversations=args.conversations,
        seed=args.seed,
    )
    try:
        summary = run_demo(config)
    except (DemoError, ProcessError) as error:  # a phase failed, or a process of the demo died or hung
        print(f"equipoise demo: {error}", file=sys.stderr)
        return 1
    recall = {role: summary["heldout"][role]["minority_recall"] for role in summary["heldout"]}
    print(
        f"minority recall on the held-out feedback: default {recall['default']:.3f}, faulty {recall['faulty']:.3f}, "
        f"retrained {recall['retrained']:.3f}; total {summary['timings_s']['total'] / 60:.1f} min"
    )
    print(f"report: {config.out / 'report.md'}")
    return 0


def _shipped_default(settings: Settings) -> Path:
    from model.default_model import shipped_artifact

    print(f"equipoise demo: the shipped default model (assembled once into {settings.state_dir / 'default-model'})")
    return shipped_artifact(settings.state_dir)
