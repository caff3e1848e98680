"""`equipoise serve --host --port --log-level`: the flags override the settings, and the start-up log at INFO is
quiet (no library INFO chatter) with one line per model load."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from core.processes import Process, free_port, spawn, wait_for
from core.settings import (
    SettingsError,
    available_cores,
    default_audio_intra_op_threads,
    default_batch_workers,
    default_intra_op_threads,
    load_settings,
)
from equipoise.cli import build_parser, serve_settings
from equipoise.logs import OWN_LOGGERS, configure_logging, flush_logs, quiet_export
from tests.api.conftest import server_settings, without_equipoise_environment

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


@pytest.fixture()
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    without_equipoise_environment(monkeypatch)
    return monkeypatch


def test_flags_override_the_environment(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("EQUIPOISE_HOST", "127.0.0.5")
    environment.setenv("EQUIPOISE_PORT", "8123")
    environment.setenv("EQUIPOISE_LOG_LEVEL", "debug")
    parser = build_parser()
    flagged = serve_settings(
        parser.parse_args(["serve", "--host", "127.0.0.9", "--port", "9001", "--log-level", "warning"])
    )
    assert (flagged.host, flagged.port, flagged.log_level) == ("127.0.0.9", 9001, "warning")
    partly = serve_settings(parser.parse_args(["serve", "--port", "9002"]))
    assert (partly.host, partly.port, partly.log_level) == ("127.0.0.5", 9002, "debug")
    with pytest.raises(SettingsError, match="port"):
        serve_settings(parser.parse_args(["serve", "--port", "70000"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--log-level", "loud"])


def test_info_keeps_own_loggers_and_hides_library_chatter(
    restored_logging: None, capsys: pytest.CaptureFixture[str], tiny_artifact: Path, tmp_path: Path
) -> None:
    """The real int8 quantisation (ONNX Runtime's quantiser logs INFO lines on the root logger): hidden at info,
    shown at debug."""
    from model.quantize import quantize_encoder_int8

    def quantise_and_log(level: str) -> str:
        configure_logging(level)
        logging.getLogger("api.reload").info("own line at %s", level)
        logging.getLogger("uvicorn.access").info("access line at %s", level)
        quantize_encoder_int8(tiny_artifact / "encoder.onnx", tmp_path / f"{level}.onnx")
        flush_logs()
        return capsys.readouterr().err

    info = quantise_and_log("info")
    assert "own line at info" in info and "access line at info" in info
    assert " INFO root:" not in info and "Quantization" not in info, info[-2000:]
    debug = quantise_and_log("debug")
    assert " INFO root:" in debug  # the chatter exists: it is the level that hides it
    warning = quantise_and_log("warning")
    assert "own line" not in warning and "access line" not in warning


def test_quiet_export_hides_only_the_root_loggers_warnings_outside_debug(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for level, hidden in (("info", True), ("debug", False)):
        configure_logging(level)
        with quiet_export():
            logging.getLogger().warning("advice of the quantiser")
            logging.getLogger().error("a real failure")
            logging.getLogger("model.default_model").warning("our own warning")
        flush_logs()
        err = capsys.readouterr().err
        assert ("advice of the quantiser" not in err) is hidden
        assert "a real failure" in err and "our own warning" in err
    configure_logging("info")
    logging.getLogger().warning("after the export")
    flush_logs()
    assert "after the export" in capsys.readouterr().err


def test_the_thread_default_fits_the_host(environment: pytest.MonkeyPatch) -> None:
    assert [default_intra_op_threads(cores) for cores in (1, 2, 4, 8, 64)] == [1, 1, 1, 0, 0]
    assert load_settings().intra_op_threads == default_intra_op_threads(available_cores())
    assert [default_audio_intra_op_threads(cores) for cores in (1, 2, 4, 8, 64)] == [1, 2, 4, None, None]
    assert load_settings().audio_intra_op_threads == default_audio_intra_op_threads(available_cores())
    assert [default_batch_workers(cores) for cores in (1, 2, 4, 8, 64)] == [1, 3, 5, 1, 1]
    assert load_settings().batch_workers == default_batch_workers(available_cores())


def test_serve_binds_the_flagged_port_and_starts_quietly(tmp_path: Path, tiny_artifact: Path) -> None:
    state = tmp_path / "state"
    settings = server_settings(state, f"sqlite:///{tmp_path / 'equipoise.db'}", default_model_dir=str(tiny_artifact))
    settings |= {"port": str(free_port()), "log_level": "debug"}  # both overridden by the flags below
    port = free_port()
    process = spawn("service", ["serve", "--port", str(port), "--log-level", "info"], settings, tmp_path / "serve.log")
    try:
        wait_for(lambda: _ready(process, port), 90, "the service to answer on the flagged port", 0.2)
    finally:
        process.stop()
    lines = [match.groupdict() for line in process.log().splitlines() if (match := LOG_LINE.match(line))]
    assert lines, process.log()
    loads = [line["message"] for line in lines if line["message"].startswith("loaded model")]
    assert loads == ["loaded model tiny-0.1 (champion): provider CPUExecutionProvider, precision fp32"]
    assert not [line for line in lines if line["level"] == "DEBUG"]
    strangers = [line for line in lines if line["level"] == "INFO" and line["logger"].split(".")[0] not in OWN_LOGGERS]
    assert not strangers, strangers  # no alembic, onnxscript, root (ONNX Runtime quantiser) INFO lines
    assert any(line["message"].startswith("database at revision") for line in lines)
    assert any(f"127.0.0.1:{port}" in line["message"] for line in lines if line["logger"] == "uvicorn.error")


def _ready(process: Process, port: int) -> bool:
    process.check_alive()
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
