"""Migrations go up, down and up again on SQLite and PostgreSQL, and match the ORM models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core.db import migrate
from core.db.models import Base
from core.db.session import make_engine


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert _tables(database_url) == set(Base.metadata.tables)

    migrate.downgrade(database_url, "base")
    assert _tables(database_url) == set()

    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    assert migrate.current_revision(engine) == migrate.head_revision(database_url)
    engine.dispose()


def test_migrated_schema_matches_models(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert _schema_diff(database_url) == []


def test_single_head() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_schema_check_detects_a_missing_column(sqlite_url: str) -> None:
    from sqlalchemy import Column, Integer, MetaData

    migrate.upgrade(sqlite_url)
    drifted = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["feedback"].append_column(Column("weight", Integer))
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), drifted)
    engine.dispose()
    assert [entry[0] for entry in diff] == ["add_column"]
