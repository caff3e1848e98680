"""The `equipoise` command. Each sub-command imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from core.settings import (
    CUSTOMER_SPEAKER,
    ESCALATION_THRESHOLD,
    Settings,
    SettingsError,
    get_settings,
    load_settings,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from core.db.models import RetrainingJob
    from model.registry import ModelRegistry

# Requests still running after this long are cut off so that the prediction log is flushed before exit.
GRACEFUL_SHUTDOWN_S = 30
SERVE_FLAGS = ("host", "port", "log_level")  # `serve --host --port --log-level`: settings of the same names


def _db(args: argparse.Namespace) -> int:
    if args.db_command == "purge":
        return _purge(args)
    from core.db import migrate
    from core.db.session import make_engine

    url = str(get_settings().database_url)
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        migrate.downgrade(url, args.revision)
    engine = make_engine(url)
    print(f"database {engine.url.render_as_string(hide_password=True)} at revision {migrate.current_revision(engine)}")
    engine.dispose()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from core.db import crud
    from core.db.models import Role
    from core.db.session import get_engine, session_scope

    with session_scope(get_engine()) as session:
        if args.keys_command == "create":
            key, raw = crud.create_api_key(session, args.name, Role(args.role))
            print(f"created key {key.name!r} ({key.role.value}); store it now, it is not shown again:\n{raw}")
        elif args.keys_command == "list":
            for key in crud.list_api_keys(session):
                state = "revoked" if key.revoked_at else "active"
                print(f"{key.name}\t{key.role.value}\t{key.prefix}…\t{state}\t{key.created_at:%Y-%m-%d %H:%M}")
        elif not crud.revoke_api_key(session, args.name):
            print(f"no active key named {args.name!r}", file=sys.stderr)
            return 1
    return 0


def _purge(args: argparse.Namespace) -> int:
    from api.retention import purge
    from core.db.session import get_engine

    days = args.days or get_settings().retention_days
    result = purge(get_engine(), days)
    print(
        f"purged {result.predictions} predictions (and their feedback) created before {result.cutoff:%Y-%m-%d %H:%M} "
        f"UTC, {result.calls} calls that ended before then, and {result.audio_files} stored audio files"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from core.db.session import get_engine
    from model.registry import RegistryError

    registry = _registry(get_engine())
    try:
        if args.models_command == "list":
            for row in registry.list():
                promoted = f"{row.promoted_at:%Y-%m-%d %H:%M}" if row.promoted_at else "-"
                print(f"{row.version}\t{row.status.value}\t{row.artifact_sha256[:12]}\t{promoted}")
        elif args.models_command == "register":
            row = registry.register(args.artifact_dir)
            print(f"registered {row.version} ({row.status.value}) in {row.artifact_path}")
            if args.promote:
                print(f"promoted {registry.promote(row.version).version} to champion")
        elif args.models_command == "promote":
            print(f"promoted {registry.promote(args.version).version} to champion")
        else:
            print(f"rolled back: {registry.rollback().version} is the champion again")
    except RegistryError as error:
        print(f"equipoise models: {error}", file=sys.stderr)
        return 1
    return 0


def _registry(engine: Engine) -> ModelRegistry:
    from model.registry import ModelRegistry

    registry_dir = get_settings().registry_dir
    assert registry_dir is not None  # derived from state_dir when not set
    return ModelRegistry(engine, registry_dir)


def serve_settings(args: argparse.Namespace) -> Settings:
    """The settings `serve` runs with: its flags override the environment and the config file."""
    flags = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None}
    return load_settings(**flags) if flags else get_settings()


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from sqlalchemy.exc import OperationalError

    from api.app import create_app
    from api.auth import StartupRefused, check_exposure
    from core.db import migrate
    from core.db.session import make_engine
    from equipoise.logs import configure_logging, flush_logs, write_logs_before_dying_of
    from model.registry import RegistryError

    try:
        settings = serve_settings(args)
    except SettingsError as error:
        print(f"equipoise serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    write_logs_before_dying_of(signal.SIGTERM)
    engine = make_engine(str(settings.database_url))
    try:
        migrate.upgrade(str(settings.database_url))
        logging.getLogger(__name__).info("database at revision %s", migrate.current_revision(engine))
        check_exposure(settings, engine)  # refuses early with a clear message; the app logs the warning
        _register_default_model(settings, engine)
    except (StartupRefused, RegistryError, OperationalError) as error:
        flush_logs()  # the log lines before it first
        print(f"equipoise serve: {error}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # configure_logging's handler and format serve uvicorn's loggers too
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ws_max_size=settings.stream_max_message_bytes,  # /v1/stream: larger messages close with 1009
    )
    return 0


def _register_default_model(settings: Settings, engine: Engine) -> None:
    """On a database without any model, register `default_model_dir` and make it the champion."""
    registry = _registry(engine)
    if registry.list():
        return
    source = settings.default_model_dir or _shipped_default(settings)
    if source is None or not source.is_dir():
        print(
            f"equipoise serve: no model registered and no artifact at EQUIPOISE_DEFAULT_MODEL_DIR ({source}); "
            "serving without a model (/readyz answers 503) until one is promoted",
            file=sys.stderr,
        )
        return
    registry.promote(registry.register(source).version)


def _shipped_default(settings: Settings) -> Path | None:
    """The default model shipped in model/default/, assembled on first use (None when it cannot be)."""
    from equipoise.logs import quiet_export
    from model.default_model import DefaultModelError, shipped_artifact

    if not settings.shipped_default:
        return None
    print("equipoise: assembling the shipped default model (first start only, about a minute)", file=sys.stderr)
    try:
        with quiet_export():
            return shipped_artifact(settings.state_dir)
    except (DefaultModelError, ModuleNotFoundError, OSError) as error:
        print(f"equipoise: the shipped default model cannot be assembled: {error}", file=sys.stderr)
        return None


def _default(args: argparse.Namespace) -> int:
    from model.default_model import SHIPPED_DIR, shipped_artifact

    settings = get_settings()
    if args.default_command == "assemble":
        print(shipped_artifact(settings.state_dir))
        return 0
    if settings.data_dir is None:
        print("equipoise default: no data directory; set EQUIPOISE_DATA_DIR", file=sys.stderr)
        return 2
    from training.release import rebuild, recalibrate_release, release_from_run, speech_release

    if args.default_command == "build":
        release_from_run(args.run_dir, args.into or SHIPPED_DIR, settings.data_dir, args.version)
        return 0
    if args.default_command == "recalibrate":
        recalibrate_release(SHIPPED_DIR, args.into or SHIPPED_DIR, settings.data_dir, args.version)
        return 0
    if args.default_command == "speech":
        speech_release(args.speech_dir, args.into or SHIPPED_DIR, settings.data_dir, args.version)
        return 0
    out = args.out or settings.state_dir / "default-rebuilt"
    print(rebuild(settings.state_dir / "runs", settings.data_dir, settings.state_dir / "cache", out))
    return 0


def _score(args: argparse.Namespace) -> int:
    from scoring.command import run

    return run(args, get_settings())


def _train(args: argparse.Namespace) -> int:
    from training.cli import train_command
    from training.recipe import RecipeError
    from training.run import RunError

    settings = get_settings()
    if settings.data_dir is None:
        print("equipoise train: no data directory; set EQUIPOISE_DATA_DIR", file=sys.stderr)
        return 2
    try:
        train_command(
            args.recipe,
            args.out or settings.state_dir / "runs",
            settings.data_dir,
            settings.state_dir / "cache",
            seed=args.seed,
            resume=args.resume,
            device=settings.device,
            progress=not args.quiet,
        )
    except (RecipeError, RunError) as error:
        print(f"equipoise train: {error}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.cli import export_command
    from training.run import RunError

    try:
        export_command(args.run_dir, args.out, version=args.version)
    except RunError as error:
        print(f"equipoise export: {error}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from equipoise.demo.command import run

    return run(args, get_settings())


def _monitor(_args: argparse.Namespace) -> int:
    from core.db.session import get_engine
    from monitoring.runner import monitor_champion

    run = monitor_champion(get_engine(), get_settings())
    if run is None:
        print("nothing to monitor: no champion, or it has served less than one window")
        return 0
    print(f"snapshots {run.snapshots}; collapse events {run.events}; retraining jobs queued {run.jobs}")
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _channel_names(value: str) -> tuple[str, ...]:
    from model.channels import parse_channel_names

    try:
        return parse_channel_names(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _score_arguments(score: argparse.ArgumentParser) -> None:
    score.add_argument(
        "input",
        type=Path,
        help="turns: .jsonl/.ndjson, .csv or .parquet; with --calls a directory of recordings or a .csv/.jsonl list",
    )
    score.add_argument(
        "--calls",
        action="store_true",
        help="the input is whole call recordings (WAV, FLAC, OGG, MP3), or a list of them with columns path and "
        "optional call_id and roles: each is cut into turns, transcribed and scored",
    )
    score.add_argument("--out", type=Path, required=True, help="per-utterance predictions (format by suffix)")
    score.add_argument("--summary", type=Path, help="per-conversation (per-call) summary (format by suffix)")
    score.add_argument("--timelines", type=Path, metavar="DIR", help="--calls: a timeline PNG per call into DIR")
    score.add_argument("--audio-root", type=Path, help="directory audio paths are relative to (default: the input's)")
    score.add_argument("--context", choices=["bidirectional", "causal"], default="bidirectional")
    score.add_argument(
        "--channels",
        type=_channel_names,
        metavar="NAMES",
        help="speakers of the channels of multi-channel audio, in channel order, e.g. agent,customer; each channel "
        "is a turn of its own (default: channel-0, channel-1, ...)",
    )
    score.add_argument("--engine", choices=["local", "ray"], default="local")
    score.add_argument("--model", type=Path, help="artifact directory (default: the registry's champion)")
    score.add_argument("--log-to-db", action="store_true", help="also write the predictions to the database")
    score.add_argument(
        "--batch-size",
        type=_positive,
        default=256,
        help="turns per model call, sorted by length inside it: more turns, less padding (default 256)",
    )
    score.add_argument("--actors", type=_positive, default=2, help="Ray actors, each with its own model (default 2)")
    score.add_argument(
        "--workers",
        type=_positive,
        help="local engine: threads scoring chunks at once, each with one ONNX Runtime thread unless "
        "EQUIPOISE_INTRA_OP_THREADS says otherwise (default: one per core on the CPU, 1 on CUDA)",
    )
    score.add_argument(
        "--customer-speaker",
        default=CUSTOMER_SPEAKER,
        help=f"speaker whose escalations count (default {CUSTOMER_SPEAKER})",
    )
    score.add_argument(
        "--escalation-threshold",
        type=float,
        default=ESCALATION_THRESHOLD,
        help=f"rise in anger probability that counts as an escalation (default {ESCALATION_THRESHOLD})",
    )
    score.add_argument("--commit-rows", type=_positive, default=5_000, help="rows between resume points (default 5000)")
    score.add_argument("--restart", action="store_true", help="ignore an earlier run's manifest and start over")


def _worker(args: argparse.Namespace) -> int:
    from equipoise.logs import configure_logging
    from retraining.worker import run_worker

    settings = get_settings()
    configure_logging(settings.log_level)
    run_worker(settings, once=args.once, poll_s=args.poll, lease_s=args.lease)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    import json

    from core.db.models import JobStatus, RetrainingJob
    from core.db.session import get_engine, session_scope
    from retraining.queue import list_jobs, submit_job

    with session_scope(get_engine()) as session:
        if args.jobs_command == "list":
            for job in list_jobs(session, status=JobStatus(args.status) if args.status else None, limit=args.limit):
                print(
                    f"{job.id}\t{job.status.value}\ttier {job.tier or 'auto'}\t{job.engine}\t{job.trigger.value}\t"
                    f"{job.attempts}/{job.max_attempts}\t{job.created_at:%Y-%m-%d %H:%M}\t"
                    f"{job.candidate_version or '-'}\t{job.reason.splitlines()[0] if job.reason else ''}"
                )
        elif args.jobs_command == "show":
            job = session.get(RetrainingJob, args.id)
            if job is None:
                print(f"no job {args.id}", file=sys.stderr)
                return 1
            _print_job(job)
        else:
            try:
                params = json.loads(args.params)
                if not isinstance(params, dict):
                    raise ValueError("--params must be a JSON object")
                job = submit_job(session, reason=args.reason, tier=args.tier, engine=args.engine, params=params)
            except ValueError as error:
                print(f"equipoise jobs submit: {error}", file=sys.stderr)
                return 2
            print(f"queued job {job.id} (tier {job.tier or 'auto'}, engine {job.engine})")
    return 0


def _print_job(job: RetrainingJob) -> None:
    import json

    for name in (column.key for column in job.__table__.columns if column.key not in ("params", "result", "log")):
        value = getattr(job, name)
        print(f"{name}: {getattr(value, 'value', value) if value is not None else '-'}")
    print(f"params: {json.dumps(job.params, sort_keys=True)}")
    print(f"result: {json.dumps(job.result, indent=2, sort_keys=True)}")
    print(f"log:\n{job.log}", end="")


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    levels = get_args(Settings.model_fields["log_level"].annotation)
    serve.add_argument("--host", help="bind address (default: EQUIPOISE_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: EQUIPOISE_PORT, 8000)")
    serve.add_argument("--log-level", choices=levels, help="default: EQUIPOISE_LOG_LEVEL, info")
    serve.set_defaults(handler=_serve)


def _retraining_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = commands.add_parser("worker", help="run the retraining worker (SIGTERM stops it gracefully)")
    worker.add_argument("--once", action="store_true", help="exit when no job is claimable instead of polling")
    worker.add_argument("--poll", type=float, default=5.0, help="seconds between polls of an empty queue (default 5)")
    worker.add_argument("--lease", type=float, default=120.0, help="job lease in seconds, renewed by heartbeats")
    worker.set_defaults(handler=_worker)

    jobs = commands.add_parser("jobs", help="retraining jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--limit", type=_positive, default=50)
    jobs_commands.add_parser("show", help="a job's fields, result and log").add_argument("id", type=int)
    submit = jobs_commands.add_parser("submit", help="queue a retraining job")
    submit.add_argument("--reason", required=True)
    submit.add_argument("--tier", type=int, choices=[1, 2, 3], help="default: chosen from the labels available")
    submit.add_argument("--engine", choices=["local", "ray"], default="local")
    submit.add_argument("--params", default="{}", help='JSON object, e.g. \'{"gate": {"macro_f1_tolerance": 0.02}}\'')
    jobs.set_defaults(handler=_jobs)


def _training_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser("train", help="train a model from a recipe")
    train.add_argument("recipe", help="recipe file, or the name of one in training/recipes (e.g. default)")
    train.add_argument("--out", type=Path, help="runs directory (default: <state_dir>/runs)")
    train.add_argument("--seed", type=int, help="override the recipe's seed")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=Path,
        metavar="RUN_DIR",
        help="continue from the last checkpoint (of RUN_DIR when given); a run directory that holds a checkpoint "
        "is continued even without this flag",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="export a training run to a model artifact")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    export.add_argument("--version", help="model version (default: recipe, seed and run time)")
    export.set_defaults(handler=_export)

    default = commands.add_parser("default", help="the shipped default model (model/default/)")
    default_commands = default.add_subparsers(dest="default_command", required=True)
    default_commands.add_parser("assemble", help="assemble and verify it into the state directory; print the path")
    build = default_commands.add_parser("build", help="write model/default/ (delta, release, card) from a run")
    build.add_argument("run_dir", type=Path)
    build.add_argument("--into", type=Path, help="directory to write (default: model/default/)")
    build.add_argument("--version", required=True, help="release version, e.g. equipoise-default-1.1.0")
    recalibrate = default_commands.add_parser(
        "recalibrate", help="the same weights with calibration refitted on MELD dev (text), as a new patch release"
    )
    recalibrate.add_argument("--into", type=Path, help="directory to write (default: model/default/)")
    recalibrate.add_argument("--version", required=True, help="release version, e.g. equipoise-default-1.0.2")
    speech = default_commands.add_parser(
        "speech", help="the release's text model with a speech head (python -m training.speech) as a new release"
    )
    speech.add_argument("speech_dir", type=Path, help="folder with speech.json and audio_head.safetensors")
    speech.add_argument("--into", type=Path, help="directory to write (default: model/default/)")
    speech.add_argument("--version", required=True, help="release version, e.g. equipoise-default-1.1.0")
    rebuild = default_commands.add_parser(
        "rebuild", help="train the default recipe from the data directory and compare with the committed card"
    )
    rebuild.add_argument("--out", type=Path, help="release directory to write (default: STATE/default-rebuilt)")
    default.set_defaults(handler=_default)


def build_parser() -> argparse.ArgumentParser:
    from equipoise.demo.command import add_arguments as demo_arguments

    parser = argparse.ArgumentParser(prog="equipoise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="migrate to a revision (default: head)").add_argument(
        "revision", nargs="?", default="head"
    )
    db_commands.add_parser("downgrade", help="migrate down to a revision").add_argument("revision")
    db_commands.add_parser("current", help="show the current revision")
    db_commands.add_parser("purge", help="delete predictions, feedback and audio past retention").add_argument(
        "--days", type=int, default=None, help="keep this many days (default: the retention_days setting)"
    )
    db.set_defaults(handler=_db)

    keys = commands.add_parser("keys", help="API keys (stored hashed)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument("--role", choices=["predict", "admin"], default="predict")
    keys_commands.add_parser("list", help="list keys (never the keys themselves)")
    keys_commands.add_parser("revoke", help="revoke a key by name").add_argument("name")
    keys.set_defaults(handler=_keys)

    models = commands.add_parser("models", help="the model registry")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list registered versions, newest first")
    register = models_commands.add_parser("register", help="copy a verified artifact into the registry")
    register.add_argument("artifact_dir", type=Path)
    register.add_argument("--promote", action="store_true", help="make it the champion too")
    models_commands.add_parser("promote", help="make a version the champion").add_argument("version")
    models_commands.add_parser("rollback", help="reject the champion and re-crown the previous one")
    models.set_defaults(handler=_models)

    _serve_arguments(commands.add_parser("serve", help="run the HTTP service"))
    monitor = commands.add_parser("monitor", help="monitoring of the champion's logged predictions")
    monitor.add_subparsers(dest="monitor_command", required=True).add_parser(
        "run", help="snapshot every complete window not yet monitored; queue retraining on collapse"
    )
    monitor.set_defaults(handler=_monitor)
    demo = commands.add_parser("demo", help="the whole loop on real data: collapse, retraining, promotion, report")
    demo_arguments(demo)
    demo.set_defaults(handler=_demo)
    score = commands.add_parser("score", help="batch-score call-centre logs (resumable)")
    _score_arguments(score)
    score.set_defaults(handler=_score)
    _retraining_commands(commands)
    _training_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        get_settings()
    except SettingsError as error:
        print(f"equipoise: {error}", file=sys.stderr)
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
