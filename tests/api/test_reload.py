"""Hot reload: a new champion is loaded, verified and probed before it replaces the served model."""

from __future__ import annotations

import asyncio
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from api.metrics import Metrics
from api.reload import ModelHolder, ModelReloader, probe, runtime_loader
from core.db import migrate
from core.db.models import ModelStatus, ModelVersion
from core.db.session import make_engine
from core.heap import collector_for_serving
from model.registry import ModelRegistry
from model.runtime import InferenceRuntime
from tests.api.conftest import FakeRuntime, add_version, settings_for


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'reload.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


class Loader:
    """Fake runtimes; versions named in `poison` load but give broken probabilities."""

    def __init__(self, poison: dict[str, float] | None = None) -> None:
        self.poison = poison or {}
        self.loaded: list[str] = []

    def __call__(self, row: ModelVersion) -> FakeRuntime:
        self.loaded.append(row.version)
        return FakeRuntime(version=row.version, poison=self.poison.get(row.version, 1.0))


def reloader(engine: Engine, tmp_path: Path, loader: Loader) -> tuple[ModelReloader, ModelHolder, Metrics]:
    holder, metrics = ModelHolder(), Metrics()
    registry = ModelRegistry(engine, tmp_path / "registry")
    return ModelReloader(registry, holder, loader, metrics, interval_s=60), holder, metrics


def crown(engine: Engine, version: str) -> None:
    """Switch the champion in the database directly (the registry would verify a real artifact first)."""
    with engine.begin() as connection:
        connection.execute(
            update(ModelVersion).where(ModelVersion.status == ModelStatus.CHAMPION).values(status=ModelStatus.RETIRED)
        )
        connection.execute(
            update(ModelVersion).where(ModelVersion.version == version).values(status=ModelStatus.CHAMPION)
        )


def test_a_new_champion_replaces_the_served_model(engine: Engine, tmp_path: Path) -> None:
    add_version(engine, "v1")
    add_version(engine, "v2", ModelStatus.CANDIDATE)
    loader = Loader()
    watcher, holder, metrics = reloader(engine, tmp_path, loader)
    asyncio.run(watcher.check())
    assert holder.current is not None and holder.current.version == "v1"
    crown(engine, "v2")
    asyncio.run(watcher.check())
    asyncio.run(watcher.check())
    assert holder.current.version == "v2" and loader.loaded == ["v1", "v2"]
    assert (
        metrics.registry.get_sample_value(
            "equipoise_model_info",
            {
                "version": "v2",
                "sha256": holder.current.sha256,
                "providers": "FakeExecutionProvider",
                "precision": "fp32",
                "int8_rescore_margin": "0.0",
            },
        )
        == 1
    )
    assert metrics.registry.get_sample_value("equipoise_int8_rescored_total", {"model_version": "v2"}) == 0


def test_a_champion_frozen_with_start_up_is_collected_once_replaced(engine: Engine, tmp_path: Path) -> None:
    add_version(engine, "v1")
    add_version(engine, "v2", ModelStatus.CANDIDATE)
    holder = ModelHolder()
    registry = ModelRegistry(engine, tmp_path / "registry")
    watcher = ModelReloader(registry, holder, Loader(), Metrics(), interval_s=60, refreeze_delay_s=0.05)
    asyncio.run(watcher.check())
    assert holder.current is not None
    first = holder.current.runtime
    first.itself = first  # type: ignore[attr-defined]  # a reference cycle: only the collector frees it
    served = weakref.ref(first)
    del first

    async def swap_then_wait() -> None:
        await watcher.check()
        await asyncio.sleep(0.2)

    with collector_for_serving(freeze=True, gen0_threshold=700):
        crown(engine, "v2")
        asyncio.run(swap_then_wait())
        assert holder.current.version == "v2"
        assert served() is None


@pytest.mark.parametrize("poison", [float("nan"), 2.0])
def test_a_model_with_broken_probabilities_is_refused_and_the_old_one_keeps_serving(
    engine: Engine, tmp_path: Path, poison: float
) -> None:
    add_version(engine, "good")
    add_version(engine, "broken", ModelStatus.CANDIDATE)
    loader = Loader(poison={"broken": poison})
    watcher, holder, metrics = reloader(engine, tmp_path, loader)
    asyncio.run(watcher.check())
    crown(engine, "broken")
    for _ in range(3):
        asyncio.run(watcher.check())
    assert holder.current is not None and holder.current.version == "good"
    assert loader.loaded == ["good", "broken"]  # refused once, not reloaded on every poll
    assert metrics.registry.get_sample_value("equipoise_model_reloads_total", {"outcome": "refused"}) == 1
    assert holder.last_error is not None and "broken" in holder.last_error


def test_without_a_champion_nothing_is_served_and_the_reason_is_kept(engine: Engine, tmp_path: Path) -> None:
    watcher, holder, _ = reloader(engine, tmp_path, Loader())
    asyncio.run(watcher.check())
    assert holder.current is None and holder.last_error == "no champion model is registered"


def test_the_real_runtime_passes_the_probe_and_a_corrupted_copy_is_refused(
    engine: Engine, tmp_path: Path, tiny_artifact: Path
) -> None:
    registry = ModelRegistry(engine, tmp_path / "registry")
    registry.promote(registry.register(tiny_artifact).version)
    loader = runtime_loader(settings_for(tmp_path, device="cpu", intra_op_threads=1))
    row = registry.champion()
    assert row is not None
    probe(runtime := loader(row))
    assert isinstance(runtime, InferenceRuntime) and runtime._encoder.packed is not None
    padded = runtime_loader(settings_for(tmp_path, device="cpu", intra_op_threads=1, packed_text_path=False))(row)
    assert isinstance(padded, InferenceRuntime) and padded._encoder.packed is None

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_artifact, corrupt)
    context = corrupt / "context.onnx"
    data = bytearray(context.read_bytes())
    data[len(data) // 2] ^= 0xFF
    context.write_bytes(bytes(data))
    with pytest.raises(Exception, match="context.onnx"):
        loader(ModelVersion(version=row.version, artifact_path=str(corrupt), artifact_sha256=row.artifact_sha256))
