"""The audit log, read-only (auditor and admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from serving.dependencies import Audit, Auditor
from serving.errors import ApiError
from serving.routers.hotspots import ERRORS
from serving.schemas import AuditList, AuditQuery

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditList, responses={k: ERRORS[k] for k in (401, 403, 422)},
            summary="Forecast requests, newest first")
def audit_log(request: Request, principal: Auditor, query: Annotated[AuditQuery, Query()], audit: Audit) -> AuditList:
    entries = audit.entries(query.limit, query.before_id)
    try:  # reading the log is itself audited (after the read: the entry is not in its own page)
        audit.record(principal, request.url.path, {"limit": query.limit, "before_id": query.before_id,
                                                   "rows": len(entries)}, 0)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "the audit log cannot be written; it is not served without an audit entry") from exc
    return AuditList(entries=entries, limit=query.limit,
                     next_before_id=entries[-1].id if len(entries) == query.limit else None)
