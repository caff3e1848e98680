"""`equipoise score`: the command-line options turned into a scoring run."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from core.db.models import ModelStatus
from core.settings import Settings, available_cores
from model.registry import RegistryError
from model.runtime import CUDA_PROVIDER, DeviceUnavailable, select_providers
from scoring.engine import Engine, RuntimeSpec
from scoring.local import LocalEngine
from scoring.pipeline import RunReport, ScoreConfig, run_header, run_key, run_scoring
from scoring.summary import SummaryOptions

if TYPE_CHECKING:
    from scoring.calls.batch import CallRunConfig, CallRunReport
    from scoring.calls.engines import CallEngine
    from scoring.database import PredictionLog


def run(args: argparse.Namespace, settings: Settings) -> int:
    with ExitStack() as cleanup:
        try:
            report = _run_calls(args, settings, cleanup) if args.calls else _run_turns(args, settings, cleanup)
        except (ValueError, LookupError, OSError, DeviceUnavailable, RegistryError) as error:  # the user can fix these
            print(f"equipoise score: {error}", file=sys.stderr)
            return 2
    print(report.text())
    return 0


def _run_turns(args: argparse.Namespace, settings: Settings, cleanup: ExitStack) -> RunReport:
    config = _config(args, settings)
    spec = _spec(args, settings)
    engine = _engine(args, settings, spec, cleanup)
    log = _log(args, settings, config, engine, spec, cleanup)
    return run_scoring(config, engine, log=log)


def _run_calls(args: argparse.Namespace, settings: Settings, cleanup: ExitStack) -> CallRunReport:
    """`--calls`: whole recordings. Locally one call at a time gets every core (Whisper's and ONNX Runtime's
    threads); on Ray each actor gets one."""
    from scoring.calls.batch import CallRunConfig, run_calls
    from scoring.calls.engines import LocalCallEngine, RayCallEngine
    from scoring.calls.pipeline import CallOptions
    from scoring.calls.scorer import CallSpec

    threads = settings.intra_op_threads or (1 if args.engine == "ray" else 0)
    spec = CallSpec(
        replace(_spec(args, settings), intra_op_threads=threads),
        stt_threads=threads,
        causal=args.context == "causal",
        options=replace(CallOptions.from_settings(settings), summary=_summary_options(args)),
        timelines=args.timelines is not None,
        log=args.log_to_db,
    )
    config = CallRunConfig(
        args.input, args.out, spec, args.summary, args.audio_root, args.channels, args.timelines, args.restart
    )
    if args.engine == "local":
        engine: CallEngine = LocalCallEngine.load(spec)
    else:
        _start_ray(cleanup)
        engine = RayCallEngine(spec, actors=args.actors)
    return run_calls(config, engine, log=_call_log(args, settings, config, engine, cleanup))


def _summary_options(args: argparse.Namespace) -> SummaryOptions:
    return SummaryOptions(customer=args.customer_speaker, escalation_threshold=args.escalation_threshold)


def _config(args: argparse.Namespace, settings: Settings) -> ScoreConfig:
    return ScoreConfig(
        input=args.input,
        output=args.out,
        summary=args.summary,
        audio_root=args.audio_root,
        causal=args.context == "causal",
        batch_turns=args.batch_size,
        commit_rows=args.commit_rows,
        max_text_chars=settings.max_text_chars,
        max_audio_bytes=settings.max_audio_bytes,
        max_audio_seconds=settings.max_audio_seconds,
        max_audio_channels=settings.max_audio_channels,
        channel_silence_dbfs=settings.channel_silence_dbfs,
        channel_names=args.channels,
        summary_options=_summary_options(args),
        restart=args.restart,
    )


def _spec(args: argparse.Namespace, settings: Settings) -> RuntimeSpec:
    return RuntimeSpec(
        _model_dir(args, settings),
        settings.device,
        _threads(args, settings),
        settings.precision,
        settings.int8_rescore_margin,
        settings.packed_text_path,
    )


def _model_dir(args: argparse.Namespace, settings: Settings) -> Path:
    """--model, else the registry's champion, else the configured default model, else the shipped default."""
    if args.model is not None:
        return args.model
    champion = _champion_dir(settings)
    if champion is not None:
        return champion
    if settings.default_model_dir is not None:
        return settings.default_model_dir
    if not settings.shipped_default:
        raise LookupError("no model: pass --model ARTIFACT_DIR (the registry has no champion)")
    from model.default_model import shipped_artifact

    return shipped_artifact(settings.state_dir)


def _champion_dir(settings: Settings) -> Path | None:
    from sqlalchemy.exc import SQLAlchemyError

    from core.db.session import make_engine
    from model.registry import ModelRegistry

    engine = make_engine(str(settings.database_url))
    try:
        champion = ModelRegistry(engine, Path(settings.registry_dir)).champion()
    except SQLAlchemyError:  # no database yet: no champion
        return None
    finally:
        engine.dispose()
    return Path(champion.artifact_path) if champion is not None else None


def _threads(args: argparse.Namespace, settings: Settings) -> int:
    # Ray actors and local workers get one core each; ONNX Runtime's default (every core) would oversubscribe.
    parallel = args.engine == "ray" or _workers(args, settings) > 1
    return settings.intra_op_threads or (1 if parallel else 0)


def _workers(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers is not None:
        return int(args.workers)
    return 1 if CUDA_PROVIDER in select_providers(settings.device) else available_cores()


def _engine(args: argparse.Namespace, settings: Settings, spec: RuntimeSpec, cleanup: ExitStack) -> Engine:
    if args.engine == "local":
        return LocalEngine.load(spec, _workers(args, settings))
    from scoring.ray_engine import RayEngine

    _start_ray(cleanup)
    return RayEngine.from_spec(spec, actors=args.actors)


def _start_ray(cleanup: ExitStack) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)  # RAY_ADDRESS selects a running cluster
        cleanup.callback(ray.shutdown)


def _log(
    args: argparse.Namespace,
    settings: Settings,
    config: ScoreConfig,
    engine: Engine,
    spec: RuntimeSpec,
    cleanup: ExitStack,
) -> PredictionLog | None:
    if not args.log_to_db:
        return None
    key = run_key(run_header(config, engine.model))
    return _open_log(settings, key, engine.model.version, config.causal, spec.artifact_dir, cleanup)


def _call_log(
    args: argparse.Namespace, settings: Settings, config: CallRunConfig, engine: CallEngine, cleanup: ExitStack
) -> PredictionLog | None:
    if not args.log_to_db:
        return None
    from scoring.calls.batch import call_run_key

    key, spec = call_run_key(config, engine), config.spec
    return _open_log(settings, key, engine.model.version, spec.causal, spec.runtime.artifact_dir, cleanup)


def _open_log(
    settings: Settings, key: str, version: str, causal: bool, artifact_dir: Path, cleanup: ExitStack
) -> PredictionLog:
    from scoring.database import PredictionLog

    log = PredictionLog(settings, key, version, causal)
    cleanup.callback(log.close)
    status = log.ensure_model_version(artifact_dir)
    print(f"logging to the database as model {version} ({status.value}): {_monitored(status)}")
    return log


def _monitored(status: ModelStatus) -> str:
    if status == ModelStatus.CHAMPION:
        return "`equipoise monitor run` monitors these predictions"
    return "the monitor watches the champion only; these predictions are monitored if this version is promoted"
