"""Errors the API returns on purpose, and the handlers that shape them.

422 bodies always have FastAPI's shape (``detail`` = list of {loc, msg, type}) plus ``field``, and every
``msg`` starts with the parameter's name, whether pydantic or the service rejected the value. 401/403/404/503
bodies are ``{"detail": "..."}`` with what to do about it.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


class FieldError(Exception):
    """A parameter that passed type validation but is wrong for this city, panel or model (422)."""

    def __init__(self, field: str, message: str, location: str = "query"):
        super().__init__(message)
        self.field, self.location = field, location
        self.message = message if message.startswith(f"{field}:") else f"{field}: {message}"


def _problem(loc: list, msg: str, kind: str) -> dict:
    field = next((str(part) for part in reversed(loc) if isinstance(part, str) and part not in {"query", "path", "body"}),
                 str(loc[-1]) if loc else "request")
    return {"loc": [p if isinstance(p, (str, int)) else str(p) for p in loc], "field": field,
            "msg": msg if msg.startswith(f"{field}:") else f"{field}: {msg}", "type": kind}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_problem(list(err.get("loc", ())), str(err.get("msg", "invalid value")), str(err.get("type", "value_error")))
                    for err in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(FieldError)
    async def _field(_request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse({"detail": [_problem([exc.location, exc.field], exc.message, "value_error")]}, status_code=422)

    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
