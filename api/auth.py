"""API keys with roles, sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Keys are looked up by their SHA-256 (core.db.crud.find_active_key, constant-time confirmed). A key that
checked out is trusted for `api_key_cache_s` seconds, keyed by its hash, so predictions keep flowing through a
short database outage; revocation takes effect within that time. The raw key is never logged or stored.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import Engine, exists, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from api.errors import Problem, unavailable
from core.db import crud
from core.db.models import ApiKey, Role
from core.db.session import session_scope
from core.settings import Settings

log = logging.getLogger(__name__)

GRANTS: dict[Role, frozenset[Role]] = {
    Role.PREDICT: frozenset({Role.PREDICT}),
    Role.ADMIN: frozenset({Role.PREDICT, Role.ADMIN}),
}


class StartupRefused(RuntimeError):
    """The service must not start with this configuration; the message says what to change."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


ANONYMOUS = Principal("anonymous (auth off)", Role.ADMIN)
HEADER_HINT = "`Authorization: Bearer <key>` or `X-API-Key: <key>`"


class Authenticator:
    def __init__(self, engine: Engine, *, required: bool, cache_s: float) -> None:
        self.engine = engine
        self.required = required
        self._cache_s = cache_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def cached(self, raw_key: str) -> Principal | None:
        with self._lock:
            entry = self._cache.get(crud.hash_key(raw_key))
        return entry[0] if entry and entry[1] > time.monotonic() else None

    def lookup(self, raw_key: str) -> Principal | None:
        """The key's principal from the database (blocking); None for unknown or revoked keys."""
        with session_scope(self.engine) as session:
            key = crud.find_active_key(session, raw_key)
            principal = Principal(key.name, key.role) if key else None
        if principal is not None:
            with self._lock:
                self._cache[crud.hash_key(raw_key)] = (principal, time.monotonic() + self._cache_s)
        return principal


def presented_key(connection: HTTPConnection) -> str | None:
    """The key in the headers of a request or a WebSocket handshake."""
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return connection.headers.get("x-api-key") or None


async def authorize(request: Request, authenticator: Authenticator, role: Role) -> Principal:
    return await authorize_key(presented_key(request), authenticator, role)


async def authorize_key(
    raw: str | None, authenticator: Authenticator, role: Role, where: str = HEADER_HINT
) -> Principal:
    """The principal of the key `raw` (presented as `where` says) if it may act as `role`; a 401, 403 or 503
    Problem otherwise."""
    if not authenticator.required:
        return ANONYMOUS
    if raw is None:
        raise Problem(
            401, f"An API key is required: send {where}.", kind="unauthorized", headers={"WWW-Authenticate": "Bearer"}
        )
    principal = authenticator.cached(raw)
    if principal is None:
        try:
            principal = await run_in_threadpool(authenticator.lookup, raw)
        except SQLAlchemyError as error:
            log.warning("cannot check an API key, the database is unavailable: %s", error)
            raise unavailable("API keys cannot be checked right now (database unavailable).") from None
    if principal is None:
        raise Problem(
            401, "The API key is unknown or revoked.", kind="unauthorized", headers={"WWW-Authenticate": "Bearer"}
        )
    if role not in GRANTS[principal.role]:
        raise Problem(
            403, f"This key has the {principal.role.value} role; this operation needs {role.value}.", kind="forbidden"
        )
    return principal


def check_exposure(settings: Settings, engine: Engine) -> str | None:
    """Refuse to serve with auth off beyond loopback, or with auth on but no key to get in with; returns the
    warning to log when auth is off (on loopback)."""
    if not settings.auth_required:
        if not settings.binds_loopback:
            raise StartupRefused(
                f"refusing to start: authentication is off (EQUIPOISE_AUTH_ENABLED=false) but the service would bind "
                f"to {settings.host}, beyond this machine. Bind to 127.0.0.1, or turn authentication on and create "
                f"keys with `equipoise keys create NAME --role admin`."
            )
        return (
            f"authentication is OFF: anyone who can reach {settings.host}:{settings.port} can predict and administer "
            "models. This is only allowed on loopback; set EQUIPOISE_AUTH_ENABLED=true to require API keys."
        )
    with session_scope(engine) as session:
        has_keys = session.scalar(select(exists().where(ApiKey.revoked_at.is_(None))))
    if not has_keys:
        raise StartupRefused(
            "refusing to start: authentication is on but the database holds no active API key, so nobody could "
            "call the service. Create one with `equipoise keys create NAME --role admin`."
        )
    return None
