"""Database: typed ORM models, engine and sessions, and Alembic migrations."""
