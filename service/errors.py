"""The one shape of every error the gateway sends, and the handlers that give every failure that shape.

Every answer other than 2xx has the body `{"error": "<what was wrong and what is valid>"}`, with a `detail` list
after it for a 422. A route refuses by raising `ServiceError` (status, message, headers); FastAPI's validation
errors, Starlette's own errors (unknown route, method not allowed, unreadable body), Redis outages and anything
unexpected are answered in the same shape. No message echoes more than ECHO_CHARS of the client's input.
"""
from __future__ import annotations

import json

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route, compile_path

from core.results import StoreError


class ServiceError(Exception):
    """An answer other than 2xx, with a message the caller can act on."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


ECHO_CHARS = 80  # an error message or a 422 detail never repeats more of the client's input than this
ERRORS_REPORTED = 10  # a 422 lists the first few invalid fields, however many the body has
MESSAGE_CHARS = 200
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def clip(value, limit: int = ECHO_CHARS) -> str:
    """`value` as text, cut to `limit` characters (with an ellipsis) so an error never echoes a whole input."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def short_json(value) -> object:
    """A 422 detail's `input`: the value itself when its JSON is short, else a clipped text of it."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return clip(repr(value))
    return value if len(text) <= ECHO_CHARS else clip(text)


def human_size(size: int) -> str:
    """A size in bytes for people: KiB under a MiB, MiB under a GiB, else GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1024:.1f} KiB"


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   detail: list | None = None) -> JSONResponse:
    """The one error body of the gateway: {"error": ...}, and `detail` where there is one."""
    body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


# --- the handlers --------------------------------------------------------------------------------------------------

async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error["type"] == "json_invalid" for error in errors):
        detail = "; ".join(clip(error.get("ctx", {}).get("error", error["msg"]), MESSAGE_CHARS) for error in errors)
        return error_response(400, f"the request body is not valid JSON: {detail}")
    shown = jsonable(errors[:ERRORS_REPORTED])
    more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
    summary = "; ".join(f"{clip('.'.join(str(part) for part in error['loc'][1:]) or error['loc'][0])}: "
                        f"{error['msg']}" for error in shown)
    return error_response(422, f"invalid request: {summary}{more}", detail=shown)


def jsonable(errors: list[dict]) -> list[dict]:
    """Validation errors as JSON can carry them, echoing at most a short prefix of any input."""
    def field(key: str, value):
        if key == "ctx":
            return {k: clip(v) for k, v in value.items()}
        if key == "loc":
            return [part if isinstance(part, int) else clip(part) for part in value]
        if key == "msg":
            return clip(value, MESSAGE_CHARS)
        return short_json(value) if key == "input" else value

    return [{key: field(key, value) for key, value in error.items() if key in ("type", "loc", "msg", "input", "ctx")}
            for error in errors]


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path takes, from the OpenAPI paths (a path has a route per method) and the
    documentation routes outside them."""
    path, methods = request.scope["path"], set()
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations if method.upper() in HTTP_METHODS}
    for route in request.app.router.routes:  # /docs, /openapi.json, ...
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (unknown route, method not allowed, unreadable body) in ErrorBody form."""
    where = f"{clip(request.method)} {clip(request.url.path)}"
    if exc.status_code == 404:
        templates = request.app.openapi()["paths"]
        path, hint = request.url.path, ""
        bare = path.rstrip("/")
        if bare != path and bare and any(compile_path(template)[0].match(bare) for template in templates):
            # No redirect to the path without the slash: a redirect built from the request would carry its Host.
            hint = f" (routes take no trailing slash: {clip(bare)})"
        return error_response(404, f"no route {where}{hint}; the routes are {', '.join(templates)} "
                                   "(GET /docs describes them)")
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        return error_response(405, f"{clip(request.method)} is not allowed on {clip(request.url.path)}; it takes "
                                   f"{', '.join(allowed)}", {"Allow": ", ".join(allowed)})
    if exc.status_code == 400:
        return error_response(400, f"the request body could not be read as JSON ({clip(exc.detail)})")
    return error_response(exc.status_code, clip(exc.detail, MESSAGE_CHARS), exc.headers)


def internal_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"the gateway failed unexpectedly ({type(exc).__name__}); retry, and report it if it "
                               "persists")


def add_error_handlers(app: FastAPI, redis_where: str) -> None:
    """Answer every failure of `app` in the one error shape; `redis_where` (host:port) names Redis in a 503."""
    async def redis_down(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        return error_response(503, f"Redis at {redis_where} is unreachable ({exc}); retry shortly",
                              {"Retry-After": "5"})

    async def store_down(_: Request, exc: StoreError) -> JSONResponse:
        return error_response(503, f"the result store is unreachable or refused ({clip(exc, MESSAGE_CHARS)}); retry "
                                   "shortly", {"Retry-After": "5"})

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StoreError, store_down)
    app.add_exception_handler(redis.exceptions.ConnectionError, redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, redis_down)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
