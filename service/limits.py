"""What the gateway refuses before an endpoint runs: bodies over the size limit, and POST bodies that are not JSON.

`BodyLimit` is pure ASGI middleware (no BaseHTTPMiddleware, so nothing buffers the body first): it answers 413 on
a Content-Length over the limit before a byte of the body is read, and counts the bytes of chunked or streamed
bodies as they arrive. `json_bodies` is a dependency of every route: a POST body must be JSON (415 otherwise).
Both answer in the one error shape (service.errors).
"""
from __future__ import annotations

from email.message import Message

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError, clip, error_response, human_size


class BodyTooLarge(Exception):
    """Raised from `receive` once a request body passes the limit; the middleware answers 413 itself."""


def declared_length(scope: Scope) -> int | None:
    raw = Headers(scope=scope).get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class BodyLimit:
    """413 for a request body over `max_bytes`: by Content-Length before reading, or counted while it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def refusal(self, size: str) -> JSONResponse:
        # Connection: close, since the rest of the body is never read.
        return error_response(413, f"the request body ({size}) is over this server's limit of {self.max_bytes} "
                                   f"bytes ({human_size(self.max_bytes)}, SKDCGN_MAX_BODY_BYTES); send less, or use "
                                   "POST /jobs for datasets", {"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self.refusal(f"{declared} bytes by its Content-Length")(scope, receive, send)
            return
        received, exceeded, started = 0, False, False

        async def counted() -> dict:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge(received)
            return message

        async def guarded(message: dict) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body it could not read: the 413 below replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            if started:
                raise
        if exceeded and not started:
            await self.refusal(f"at least {received} bytes, as it streamed")(scope, receive, send)


def is_json(content_type: str) -> bool:
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def json_bodies(request: Request) -> None:
    """415 for a POST whose body is not declared JSON (FastAPI would otherwise validate its raw bytes)."""
    if request.method != "POST" or not await request.body():
        return
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        got = f"Content-Type {clip(content_type)!r}" if content_type else "no Content-Type"
        raise ServiceError(415, f"{request.method} {clip(request.url.path)} takes a JSON body: send it with "
                                f"Content-Type: application/json (got {got})")

