"""Append-only audit log of the requests that return forecasts: who (key id, role), what (endpoint and
parameters, the shift resolved), which model version, when, and how many bytes went out.

Entries are written by one writer thread per log with group commit: a request hands its entry over and waits
until the transaction holding it has committed, so no forecast leaves without its entry and none is dropped,
while concurrent requests share one commit (and one fsync) instead of queueing for the database lock one by
one. A failed batch is retried row by row, so one bad entry cannot fail the others.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from serving.chain import chain_insert
from serving.db import AuditRow, Database, as_utc, utcnow
from serving.keys import Principal, split_key
from serving.schemas import AuditEntry


class AuditLog:
    BATCH = 256  # entries per transaction at most
    IDLE_SECONDS = 10.0  # the writer thread ends after this long without entries (restarted on the next one)
    WAIT_SECONDS = 60.0  # a request waits at most this long for its entry to commit, then fails (503)

    def __init__(self, db: Database):
        self.db = db
        self._queue: queue.SimpleQueue[tuple[dict[str, Any], Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writing = False

    def record(self, principal: Principal, endpoint: str, params: dict[str, Any], response_bytes: int,
               city: str | None = None, model_version: str | None = None, flagged: list[str] | str | None = None) -> int:
        """Write one entry and return its id once it is committed (raises if it cannot be written). ``flagged``:
        the H3 ids a hotspots response handed out, in rank order (scored later by the accuracy record), or their
        JSON array already encoded (a city-wide response slices it from its forecast's cached ranking)."""
        done = self._submit(_entry(principal, endpoint, params, response_bytes, city, model_version, flagged))
        return done.result(timeout=self.WAIT_SECONDS)

    async def record_async(self, principal: Principal, endpoint: str, params: dict[str, Any], response_bytes: int,
                           city: str | None = None, model_version: str | None = None,
                           flagged: list[str] | str | None = None) -> int:
        """:meth:`record` awaited on the event loop: a request that only waits for its commit holds no pool thread
        (a cached forecast then makes no thread-pool trip at all)."""
        done = self._submit(_entry(principal, endpoint, params, response_bytes, city, model_version, flagged))
        async with asyncio.timeout(self.WAIT_SECONDS):
            return await asyncio.wrap_future(done)

    def _submit(self, values: dict[str, Any]) -> Future:
        """Queue one entry for the writer thread (started when idle); its future resolves when it is committed."""
        done: Future = Future()
        with self._lock:
            self._queue.put((values, done))
            if not self._writing:
                self._writing = True
                threading.Thread(target=self._write_loop, name="audit-writer", daemon=True).start()
        return done

    def record_refusal(self, key: str | None, endpoint: str, status: int, reason: str) -> int:
        """A refused request (401/403) is audited too: the key id it claimed (never the secret), the reason."""
        return self.record(*refusal_entry(key, endpoint, status, reason))

    def _write_loop(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=self.IDLE_SECONDS)]
            except queue.Empty:
                with self._lock:  # record() puts under this lock: nothing can slip in unseen
                    if self._queue.empty():
                        self._writing = False
                        return
                continue
            while len(batch) < self.BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[dict[str, Any], Future]]) -> None:
        try:
            with self.db.engine.begin() as conn:
                ids = chain_insert(conn, "audit_log", [values for values, _ in batch])
        except Exception:  # noqa: BLE001 - retry one by one: only the entries that cannot be written fail
            for values, done in batch:
                try:
                    with self.db.engine.begin() as conn:
                        done.set_result(chain_insert(conn, "audit_log", [values])[0])
                except Exception as exc:  # noqa: BLE001
                    done.set_exception(exc)
            return
        for (_, done), new_id in zip(batch, ids):
            done.set_result(int(new_id))

    def entries(self, limit: int = 100, before_id: int | None = None) -> list[AuditEntry]:
        """Newest first."""
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(AuditRow.id < before_id)
        with self.db.session() as session:
            rows = session.scalars(query).all()
        return [
            AuditEntry(id=r.id, at=as_utc(r.at), key_id=r.key_id, role=r.role, endpoint=r.endpoint,
                       params=json.loads(r.params), city=r.city, model_version=r.model_version,
                       response_bytes=r.response_bytes)
            for r in rows
        ]


def _entry(principal: Principal, endpoint: str, params: dict[str, Any], response_bytes: int, city: str | None,
           model_version: str | None, flagged: list[str] | str | None) -> dict[str, Any]:
    values = dict(at=utcnow(), key_id=principal.key_id, role=principal.role.value, endpoint=endpoint,
                  params=json.dumps(params, sort_keys=True, default=str), city=city,
                  model_version=model_version, response_bytes=int(response_bytes))
    if flagged is not None:
        values["flagged"] = flagged if isinstance(flagged, str) else json.dumps(list(flagged))
    return values


def refusal_entry(key: str | None, endpoint: str, status: int, reason: str) -> tuple[Any, str, dict[str, Any], int]:
    """The audit entry of a refused request: the key id it claimed (never the secret), or none/malformed."""
    parsed = split_key(key) if key else None
    key_id = parsed[0][:32] if parsed else ("none" if not key else "malformed")
    principal = SimpleNamespace(key_id=key_id, role=SimpleNamespace(value="refused"))
    return principal, endpoint[:200], {"status": status, "reason": reason}, 0
