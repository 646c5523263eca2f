"""Limits that keep one client from stalling the service, checked before any work is done for a request.

- Request heads (request line and headers) above ``MAX_HEAD_BYTES`` get a 431 as soon as that many bytes have
  arrived (:class:`LimitedHttpToolsProtocol`, uvicorn's parser otherwise accepts any size), so a slow 64 MB
  header neither occupies the worker nor is parsed.
- Request bodies are checked before they are parsed: a declared ``Content-Length`` above ``MAX_BODY_BYTES`` is
  refused at once (413), a chunked body as soon as it passes the limit; and the API key of a ``/v1`` request with
  a body is checked before a byte of the body is read (401), so anonymous uploads cost nothing.
- Every response carries ``X-Content-Type-Options: nosniff`` and a no-referrer policy.
"""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line plus headers: browsers send a few KB
MAX_BODY_BYTES = 1024 * 1024  # a patrol report of every cell of a large city is a few hundred KB
BODY_METHODS = {"POST", "PUT", "PATCH"}
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY")]


def _json_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n").encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on the request head: 431 and close once it is passed."""

    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_head, self._head_bytes = True, 0

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self.transport.write(_json_response(
                    431, "Request Header Fields Too Large",
                    f"the request line and headers exceed {self.max_head_bytes // 1024} KB: send shorter headers"))
                self.transport.close()
                return
        super().data_received(data)


class RequestLimitsMiddleware:
    """Pure ASGI: security headers on every response; body size and, for /v1, the key before the body."""

    def __init__(self, app: ASGIApp, keys=None, audit_refusal=None, max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.keys, self.audit_refusal, self.max_body_bytes = app, keys, audit_refusal, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if scope["method"] in BODY_METHODS:
            refused = await self._refusal(scope)
            if refused is None:
                receive, refused = await self._read_body(scope, receive)
            if refused is not None:
                status, detail = refused
                await _send_json(send_secure, status, detail)
                return
        await self.app(scope, receive, send_secure)

    async def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413, f"the request body ({int(declared)} bytes) exceeds {self.max_body_bytes} bytes: send less"
        if self.keys is None or not scope["path"].startswith("/v1/"):
            return None
        key = headers.get(b"x-api-key", b"").decode("latin-1")
        if not key:
            refusal = 401, "missing API key: send it in the X-API-Key header"
        elif await run_in_threadpool(self.keys.verify, key) is None:
            refusal = 401, "invalid or revoked API key"
        else:
            return None
        if self.audit_refusal is not None:
            await run_in_threadpool(self.audit_refusal, key, scope["path"], refusal[0], refusal[1])
        return refusal

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, tuple[int, str] | None]:
        """The whole body (up to the limit), replayed to the app; a refusal once the limit is passed."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return receive, (413, f"the request body exceeds {self.max_body_bytes} bytes: send less")
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return replayed.pop() if replayed else await receive()

        return replay, None


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
