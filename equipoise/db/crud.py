"""Small typed queries shared by the CLI, the service, the monitor and the worker."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from equipoise.db.models import ApiKey, Role

KEY_PREFIX = "eqp_"


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str, role: Role) -> tuple[ApiKey, str]:
    """Store a new key's hash; the raw key is returned once and never stored."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, prefix=raw[: len(KEY_PREFIX) + 6], key_sha256=hash_key(raw), role=role)
    session.add(key)
    session.flush()
    return key, raw


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_api_key(session: Session, name: str) -> bool:
    key = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if key is None:
        return False
    key.revoked_at = datetime.now(UTC)
    return True


def find_active_key(session: Session, raw_key: str) -> ApiKey | None:
    """Look a key up by hash, then confirm with a constant-time comparison."""
    digest = hash_key(raw_key)
    key = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_sha256, digest):
        return None
    return key
