"""Alembic environment and revisions of the database schema (core.db.models)."""
