"""The model registry: artifact directories under `registry_dir/<version>` and their rows in `model_versions`.

Registration copies the artifact in (into a temporary directory first, then one rename) and verifies every
hash of the copy. At most one version is the champion; promotion retires the old champion and crowns the new
one in one transaction, and the database's partial unique index turns a concurrent promotion into an error
rather than two champions. Rollback rejects the current champion and re-crowns the most recently retired one.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import ModelStatus, ModelVersion
from core.db.session import session_scope
from model.artifact import ArtifactError, ModelArtifact, load_artifact


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why."""


class UnknownVersion(RegistryError):
    pass


class NoPreviousChampion(RegistryError):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class ModelRegistry:
    def __init__(self, engine: Engine, registry_dir: Path) -> None:
        self.engine = engine
        self.registry_dir = Path(registry_dir)

    def register(
        self,
        artifact_dir: Path,
        *,
        parent_version: str | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Copy a verified artifact into the registry as a candidate; registering the same artifact twice is a
        no-op, registering a different artifact under an existing version is an error."""
        artifact = _verified(Path(artifact_dir))
        with session_scope(self.engine) as session:
            existing = session.get(ModelVersion, artifact.version)
            if existing is not None:
                if existing.artifact_sha256 != artifact.sha256:
                    raise RegistryError(
                        f"version {artifact.version} is already registered with a different artifact "
                        f"(sha256 {existing.artifact_sha256[:12]}…, this one {artifact.sha256[:12]}…)"
                    )
                return existing
            stored = self._store(Path(artifact_dir), artifact)
            row = ModelVersion(
                version=artifact.version,
                status=ModelStatus.CANDIDATE,
                parent_version=parent_version,
                artifact_path=str(stored),
                artifact_sha256=artifact.sha256,
                labels=list(artifact.emotions.names),
                recipe=recipe or {},
                metrics=artifact.metrics,
            )
            session.add(row)
            return row

    def list(self) -> list[ModelVersion]:
        with session_scope(self.engine) as session:
            return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())))

    def get(self, version: str) -> ModelVersion:
        with session_scope(self.engine) as session:
            return _get(session, version)

    def champion(self) -> ModelVersion | None:
        with session_scope(self.engine) as session:
            return _champion(session)

    def verify(self, version: str) -> ModelArtifact:
        """Re-check the stored artifact's hashes against the registered sha256."""
        row = self.get(version)
        artifact = _verified(Path(row.artifact_path))
        if artifact.sha256 != row.artifact_sha256:
            raise RegistryError(f"{version}: the stored artifact's sha256 no longer matches the registered one")
        return artifact

    def promote(self, version: str) -> ModelVersion:
        self.verify(version)
        return self._crown(version, demoted_status=ModelStatus.RETIRED)

    def promote_if_vacant(self, version: str) -> bool:
        """Make `version` the champion only while there is none; True when it is the champion afterwards. Never
        demotes anyone: a champion crowned at the same moment wins (the unique index refuses the second), and a
        rejected version is left rejected."""
        current = self.champion()
        if current is not None:
            return current.version == version
        self.verify(version)
        try:
            with session_scope(self.engine) as session:
                target = _get(session, version, for_update=True)
                if target.status == ModelStatus.REJECTED or _champion(session) is not None:
                    return target.status == ModelStatus.CHAMPION
                _make_champion(target)
                return True
        except IntegrityError:
            return False

    def rollback(self) -> ModelVersion:
        """Reject the current champion and re-crown the previous one (the most recently retired)."""
        with session_scope(self.engine) as session:
            previous = session.scalar(
                select(ModelVersion)
                .where(ModelVersion.status == ModelStatus.RETIRED)
                .order_by(ModelVersion.retired_at.desc())
                .limit(1)
            )
        if previous is None:
            raise NoPreviousChampion("there is no previous champion to roll back to")
        self.verify(previous.version)
        return self._crown(previous.version, demoted_status=ModelStatus.REJECTED, reason="rolled back")

    def reject(self, version: str, reason: str) -> ModelVersion:
        with session_scope(self.engine) as session:
            row = _get(session, version)
            if row.status == ModelStatus.CHAMPION:
                raise RegistryError(f"{version} is the champion: promote another version or roll back first")
            row.status, row.rejection_reason = ModelStatus.REJECTED, reason
            return row

    def _crown(self, version: str, *, demoted_status: ModelStatus, reason: str | None = None) -> ModelVersion:
        try:
            with session_scope(self.engine) as session:
                target = _get(session, version, for_update=True)
                if target.status == ModelStatus.CHAMPION:
                    return target
                current = _champion(session, for_update=True)
                if current is not None:
                    current.status, current.retired_at = demoted_status, _now()
                    current.rejection_reason = reason
                    session.flush()  # the old champion must step down before the unique index sees the new one
                _make_champion(target)
                return target
        except IntegrityError as error:
            raise RegistryError("another promotion happened at the same time; retry") from error

    def _store(self, source: Path, artifact: ModelArtifact) -> Path:
        destination = self.registry_dir / artifact.version
        if destination.resolve() == source.resolve():
            return destination
        if destination.exists():
            if _verified(destination).sha256 != artifact.sha256:
                raise RegistryError(f"{destination} exists and holds a different artifact")
            return destination
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        staging = self.registry_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            shutil.copytree(source, staging)
            if _verified(staging).sha256 != artifact.sha256:
                raise RegistryError(f"the copy of {source} in {staging} does not verify")
            staging.rename(destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return destination


def _make_champion(row: ModelVersion) -> None:
    row.status, row.promoted_at = ModelStatus.CHAMPION, _now()
    row.retired_at = row.rejection_reason = None


def _verified(path: Path) -> ModelArtifact:
    try:
        return load_artifact(path)
    except ArtifactError as error:
        raise RegistryError(f"{path}: {error}") from error


def _get(session: Session, version: str, *, for_update: bool = False) -> ModelVersion:
    query = select(ModelVersion).where(ModelVersion.version == version)
    row = session.scalar(query.with_for_update() if for_update else query)
    if row is None:
        raise UnknownVersion(f"no model version {version!r}")
    return row


def _champion(session: Session, *, for_update: bool = False) -> ModelVersion | None:
    query = select(ModelVersion).where(ModelVersion.status == ModelStatus.CHAMPION)
    return session.scalar(query.with_for_update() if for_update else query)
