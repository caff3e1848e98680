"""Shared fixtures: the real data directory (skips with a reason when absent) and isolated settings."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from equipoise.logs import OWN_LOGGERS
from model.default_model import shipped_artifact

REPO_ROOT = Path(__file__).resolve().parents[1]

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a red run reproduces and a
# green one is not luck; elsewhere each run draws new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _data_dir() -> Path | None:
    configured = os.environ.get("EQUIPOISE_DATA_DIR")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    return candidate if (candidate / "meld").is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real corpora; tests that need them skip when the directory is absent (it is present in CI)."""
    found = _data_dir()
    if found is None:
        pytest.skip("data directory not found: set EQUIPOISE_DATA_DIR or place the corpora in ../shared/data")
    return found


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory of this run, shared by its pytest-xdist workers (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def one_worker_at_a_time(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Held by one pytest-xdist worker at a time, for what a machine holds once (a local Ray cluster sized to every
    core) or what the first worker builds and the others reuse."""
    from filelock import FileLock

    with FileLock(run_root(tmp_path_factory) / f"{name}.lock"):
        yield


@pytest.fixture(scope="session")
def shipped_default(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default release, assembled once for the whole run (about half a minute on two cores), by the
    first worker that needs it, and only read by the tests that share it; under EQUIPOISE_STATE_DIR when set, where a
    developer's state holds it already."""
    configured = os.environ.get("EQUIPOISE_STATE_DIR")
    if configured:
        return shipped_artifact(Path(configured))
    with one_worker_at_a_time("shipped-default", tmp_path_factory):
        return shipped_artifact(run_root(tmp_path_factory) / "shipped-default")


POSTGRES_ADMIN_URL = os.environ.get("EQUIPOISE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("TESTS_REQUIRE_POSTGRES") == "1"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the test server, dropped afterwards.

    Skips when the server is unreachable, unless TESTS_REQUIRE_POSTGRES=1 (CI), where it fails.
    """
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}, pool_pre_ping=True
    )
    name = f"equipoise_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        admin.dispose()
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL required (TESTS_REQUIRE_POSTGRES=1) but unreachable: {error}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'equipoise.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each database-backed test runs on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete artifact (fp32 + int8 encoder) of a tiny random-weight model, exported once per session."""
    import torch

    from model.artifact import export_artifact
    from model.labels import EMOTIONS
    from model.network import EmotionModel, ModelConfig

    torch.manual_seed(0)
    model = EmotionModel(ModelConfig.tiny()).eval()
    shares = dict.fromkeys(EMOTIONS, 1 / len(EMOTIONS))
    path = tmp_path_factory.mktemp("tiny_artifact") / "tiny-0.1"
    export_artifact(model, path, version="tiny-0.1", reference_distribution=shares, metrics={"macro_f1": 0.0})
    return path


@pytest.fixture(scope="session")
def text_only_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact with its preprocessing saying that audio never trained it (what export writes for a
    text-only recipe): it scores a clip beside text as the text alone and refuses audio alone."""
    import dataclasses

    from model.artifact import load_artifact, write_artifact

    source = load_artifact(tiny_artifact)
    written = write_artifact(
        tmp_path_factory.mktemp("text_only_artifact") / "tiny-text-only",
        version="tiny-text-only",
        graphs={"encoder.onnx": source.encoder_path, "context.onnx": source.context_path},
        tokenizer=source.tokenizer_path,
        model_config=source.config,
        preprocessing=dataclasses.replace(source.preprocessing, hears_audio=False),
        calibration=source.calibration,
        reference_distribution=source.reference_distribution,
    )
    return written.path


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs a worker per core) each worker keeps to one intra-op torch thread, so
    two workers do not run four OpenMP threads on two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread while a package's tests run: their tensors are tiny and OpenMP contention on a
    shared CPU made single tests 5-10x slower under load. Restored afterwards for the rest of the session."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def restored_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put the root handlers and the levels back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in OWN_LOGGERS}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, own in levels.items():
        logging.getLogger(name).setLevel(own)
