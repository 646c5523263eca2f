"""API keys with roles, stored hashed.

A key reads ``hsk_<key id>_<secret>``. Only the key id, a random per-key salt and sha256(salt + secret) are
stored; the plaintext is returned once by :func:`create_key` and cannot be recovered. The secret has 256 bits
of entropy, so a salted sha256 is enough (a slow hash protects low-entropy passwords, not random tokens);
comparison is constant-time.

Verified keys are remembered for ``KeyStore.cache_seconds`` (2 s) so that a busy client does not cost a
database read per request: a key revoked through the same store stops working at once, one revoked by another
process (``hotspots keys revoke`` while the service runs) within those 2 s.

Roles are cumulative: planner reads forecasts and records patrols; analyst also reads the model registry and
the patrol log; auditor also reads the audit log; admin may do everything (key management included).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from sqlalchemy import select

from features.settings import Settings, get_settings
from serving.db import ApiKeyRow, Database, as_utc, utcnow

KEY_PREFIX = "hsk"


class Role(str, Enum):
    planner = "planner"
    analyst = "analyst"
    auditor = "auditor"
    admin = "admin"


class Permission(str, Enum):
    forecasts = "forecasts"
    models = "models"
    audit = "audit"
    keys = "keys"
    patrols = "patrols"  # record patrols (POST /v1/patrols)
    patrol_log = "patrol_log"  # read the patrol log back (GET /v1/patrols)


PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.planner: frozenset({Permission.forecasts, Permission.patrols}),
    Role.analyst: frozenset({Permission.forecasts, Permission.patrols, Permission.models, Permission.patrol_log}),
    Role.auditor: frozenset({Permission.forecasts, Permission.patrols, Permission.models, Permission.patrol_log,
                             Permission.audit}),
    Role.admin: frozenset(Permission),
}


def roles_with(permission: Permission) -> list[Role]:
    return [role for role, allowed in PERMISSIONS.items() if permission in allowed]


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: Role

    def can(self, permission: Permission) -> bool:
        return permission in PERMISSIONS[self.role]


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    parts = key.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class KeyStore:
    cache_seconds = 2.0  # how long a verified key is trusted without reading the database again
    cache_entries = 10_000

    def __init__(self, db: Database):
        self.db = db
        self._verified: dict[bytes, tuple[float, str, Role]] = {}  # sha256(key) -> (expiry, key id, role)
        self._verified_lock = threading.Lock()

    def create_key(self, role: Role | str, name: str) -> str:
        """Create a key and return its plaintext: show it once, it is not stored."""
        role = Role(role)
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
        with self.db.session.begin() as session:
            session.add(ApiKeyRow(key_id=key_id, name=name, role=role.value, salt=salt, digest=_digest(salt, secret),
                                  created_at=utcnow(), revoked_at=None))
        return f"{KEY_PREFIX}_{key_id}_{secret}"

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key (kept for the audit trail); False when there is no such active key."""
        with self.db.session.begin() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
        with self._verified_lock:
            self._verified = {token: hit for token, hit in self._verified.items() if hit[1] != key_id}
        return True

    def verify(self, key: str | None) -> tuple[str, Role] | None:
        """(key id, role) of an active key, else None."""
        return self.recently_verified(key) or self._verify_stored(key)

    def recently_verified(self, key: str | None) -> tuple[str, Role] | None:
        """(key id, role) when this key was verified within ``cache_seconds`` (a hash and a lookup: safe on the
        event loop), else None (unknown: :meth:`verify` it)."""
        parsed = split_key(key) if key else None
        if parsed is None:
            return None
        hit = self._verified.get(_token(*parsed))
        return (hit[1], hit[2]) if hit is not None and hit[0] > time.monotonic() else None

    def _verify_stored(self, key: str | None) -> tuple[str, Role] | None:
        parsed = split_key(key) if key else None
        if parsed is None:
            return None
        key_id, secret = parsed
        with self.db.session() as session:
            row = session.get(ApiKeyRow, key_id)
        if row is None:
            _digest(b"\0" * 16, secret)  # same work whether or not the id exists
            return None
        if not hmac.compare_digest(row.digest, _digest(row.salt, secret)) or row.revoked_at is not None:
            return None
        token, now = _token(key_id, secret), time.monotonic()
        with self._verified_lock:
            if len(self._verified) >= self.cache_entries:
                self._verified = {t: h for t, h in self._verified.items() if h[0] > now}
            if len(self._verified) < self.cache_entries:
                self._verified[token] = (now + self.cache_seconds, row.key_id, Role(row.role))
        return row.key_id, Role(row.role)

    def list_keys(self) -> list[KeyInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)).all()
        return [KeyInfo(r.key_id, r.name, Role(r.role), as_utc(r.created_at), r.revoked_at and as_utc(r.revoked_at))
                for r in rows]


def _token(key_id: str, secret: str) -> bytes:
    """What the verified-key cache is keyed by (never the secret itself)."""
    return hashlib.sha256(f"{key_id}_{secret}".encode()).digest()


# --- module-level helpers (for the CLI): the store of the configured data folder -----------------------
def _with_store(settings: Settings | None, action):
    db = Database.for_settings(settings or get_settings())
    try:
        return action(KeyStore(db))
    finally:
        db.dispose()


def create_key(role: Role | str, name: str, settings: Settings | None = None) -> str:
    return _with_store(settings, lambda store: store.create_key(role, name))


def revoke_key(key_id: str, settings: Settings | None = None) -> bool:
    return _with_store(settings, lambda store: store.revoke_key(key_id))


def verify(key: str, settings: Settings | None = None) -> tuple[str, Role] | None:
    return _with_store(settings, lambda store: store.verify(key))


def list_keys(settings: Settings | None = None) -> list[KeyInfo]:
    return _with_store(settings, lambda store: store.list_keys())
