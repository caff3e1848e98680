"""The model registry on SQLite and PostgreSQL: verified copies, one champion, atomic promotion, rollback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.db import migrate
from core.db.models import ModelStatus
from core.db.session import make_engine
from model.registry import ModelRegistry, NoPreviousChampion, RegistryError, UnknownVersion
from tests.api.conftest import fake_artifact


@pytest.fixture()
def registry(database_url: str, tmp_path: Path) -> Iterator[ModelRegistry]:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    yield ModelRegistry(engine, tmp_path / "registry")
    engine.dispose()


def statuses(registry: ModelRegistry) -> dict[str, ModelStatus]:
    return {row.version: row.status for row in registry.list()}


def test_registering_copies_and_verifies_the_artifact(registry: ModelRegistry, tmp_path: Path) -> None:
    source = fake_artifact(tmp_path / "built", "m-1")
    row = registry.register(source)
    assert row.status == ModelStatus.CANDIDATE and row.labels[0] == "neutral"
    assert Path(row.artifact_path) == registry.registry_dir / "m-1"
    assert sorted(p.name for p in Path(row.artifact_path).iterdir()) == sorted(p.name for p in source.iterdir())
    assert registry.register(source).version == "m-1"  # the same artifact again: a no-op
    assert [p.name for p in registry.registry_dir.iterdir()] == ["m-1"]  # no staging directory left behind


def test_a_different_artifact_under_a_registered_version_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.register(fake_artifact(tmp_path / "a", "m-1"))
    with pytest.raises(RegistryError, match="different artifact"):
        registry.register(fake_artifact(tmp_path / "b", "m-1", emotions=("calm", "angry")))


def test_a_tampered_artifact_is_neither_registered_nor_promoted(registry: ModelRegistry, tmp_path: Path) -> None:
    source = fake_artifact(tmp_path / "built", "m-1")
    (source / "context.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256|size"):
        registry.register(source)
    row = registry.register(fake_artifact(tmp_path / "clean", "m-2"))
    (Path(row.artifact_path) / "encoder.onnx").write_bytes(b"bit rot")
    with pytest.raises(RegistryError):
        registry.promote("m-2")
    assert registry.champion() is None


def test_promotion_retires_the_old_champion_and_rollback_restores_it(registry: ModelRegistry, tmp_path: Path) -> None:
    for version in ("m-1", "m-2", "m-3"):
        registry.register(fake_artifact(tmp_path / "built", version))
    registry.promote("m-1")
    registry.promote("m-2")
    assert statuses(registry) == {"m-1": "retired", "m-2": "champion", "m-3": "candidate"}
    registry.promote("m-3")
    restored = registry.rollback()
    assert restored.version == "m-2" and restored.status == ModelStatus.CHAMPION
    assert statuses(registry) == {"m-1": "retired", "m-2": "champion", "m-3": "rejected"}
    assert registry.rollback().version == "m-1"  # the rejected one is not rolled back to
    with pytest.raises(NoPreviousChampion):
        registry.rollback()
    assert registry.champion() is not None and registry.champion().version == "m-1"  # type: ignore[union-attr]


def test_promoting_the_champion_again_changes_nothing(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.register(fake_artifact(tmp_path / "built", "m-1"))
    first = registry.promote("m-1").promoted_at
    again = registry.promote("m-1").promoted_at
    assert first is not None and again is not None
    assert again.replace(tzinfo=None) == first.replace(tzinfo=None)  # SQLite returns naive UTC datetimes


def test_unknown_versions_and_rejecting_the_champion_are_errors(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(UnknownVersion):
        registry.promote("nope")
    registry.register(fake_artifact(tmp_path / "built", "m-1"))
    registry.promote("m-1")
    with pytest.raises(RegistryError, match="champion"):
        registry.reject("m-1", "bad")
    registry.register(fake_artifact(tmp_path / "built", "m-2"))
    assert registry.reject("m-2", "failed the gate").rejection_reason == "failed the gate"


def test_promote_if_vacant_crowns_only_while_there_is_no_champion(registry: ModelRegistry, tmp_path: Path) -> None:
    for version in ("m-1", "m-2", "m-3"):
        registry.register(fake_artifact(tmp_path / "built", version))
    registry.reject("m-3", "failed the gate")
    assert not registry.promote_if_vacant("m-3")  # a rejected version is never crowned, even on a vacant throne
    assert registry.champion() is None
    assert registry.promote_if_vacant("m-1")
    assert registry.promote_if_vacant("m-1")  # already the champion
    assert not registry.promote_if_vacant("m-2")  # never demotes the champion
    assert statuses(registry) == {
        "m-1": ModelStatus.CHAMPION,
        "m-2": ModelStatus.CANDIDATE,
        "m-3": ModelStatus.REJECTED,
    }
