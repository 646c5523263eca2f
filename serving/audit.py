"""Append-only audit log of the requests that return forecasts: who (key id, role), what (endpoint and
parameters, the shift resolved), which model version, when, and how many bytes went out."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from serving.db import AuditRow, Database, as_utc, utcnow
from serving.keys import Principal
from serving.schemas import AuditEntry


class AuditLog:
    def __init__(self, db: Database):
        self.db = db

    def record(self, principal: Principal, endpoint: str, params: dict[str, Any], response_bytes: int,
               city: str | None = None, model_version: str | None = None) -> int:
        row = AuditRow(at=utcnow(), key_id=principal.key_id, role=principal.role.value, endpoint=endpoint,
                       params=json.dumps(params, sort_keys=True, default=str), city=city,
                       model_version=model_version, response_bytes=int(response_bytes))
        with self.db.session.begin() as session:
            session.add(row)
            session.flush()
            return int(row.id)

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
