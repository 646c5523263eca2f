"""The audit log, read-only (auditor and admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from serving.dependencies import Audit, Auditor
from serving.routers.hotspots import ERRORS
from serving.schemas import AuditList, AuditQuery

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditList, responses={k: ERRORS[k] for k in (401, 403, 422)},
            summary="Forecast requests, newest first")
def audit_log(principal: Auditor, query: Annotated[AuditQuery, Query()], audit: Audit) -> AuditList:
    entries = audit.entries(query.limit, query.before_id)
    return AuditList(entries=entries, limit=query.limit,
                     next_before_id=entries[-1].id if len(entries) == query.limit else None)
