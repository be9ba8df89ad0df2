"""Repeated render requests, answered from the batch cache without parsing and validating them again.

A render request with an explicit seed is a pure function of its bytes (path, query, content type, Accept, body)
and of the model version its family resolves to. The first time such a request is answered, the gateway keeps
the validated request under a digest of those bytes; a byte-identical request is then answered straight from the
batch cache, skipping FastAPI's parsing, validation and dependencies, as long as the family still resolves to
the same version and manifest (two stat calls, service.catalog) and the answer is still cached. Anything else,
a cache miss included, takes the full path. Never kept: requests without a seed (each gets a new one), with
explicit z (large), asking for a PNG, larger than MAX_BODY, or while rendering needs an API key.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Awaitable, Callable

from core.messages import RenderRequest
from service.middleware import ROUTE_KEY

RENDER_PATHS = ("/counterfactual", "/generate/")
MAX_BODY = 16 << 10  # bytes of a body worth remembering (a render request without z is well under 1 KiB)
MEMO_SIZE = 4096  # remembered requests, least recently used dropped first (a small heap: no long GC pauses)
REMEMBER = "skdcgn.remember"  # scope key an endpoint sets to (request, asked version) once it has answered

Answer = Callable[[RenderRequest, str], Awaitable[object]]  # (request, cached payload) -> ASGI response


class RepeatedRenders:
    """Pure ASGI middleware around the FastAPI app; `resolve(family, version)` is the catalog's, `cached(key)`
    reads the batch cache, `answer(request, payload)` builds the response (and records the metrics)."""

    def __init__(self, app, resolve, cached, answer: Answer, enabled: Callable[[], bool]):
        self.app, self.resolve, self.cached, self.answer, self.enabled = app, resolve, cached, answer, enabled
        self.memo: OrderedDict[bytes, tuple[RenderRequest, str | None]] = OrderedDict()

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers", [])) if scope["type"] == "http" else {}
        length = headers.get(b"content-length", b"")
        if (scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(RENDER_PATHS)
                or not length.isdigit() or int(length) > MAX_BODY or b"image/" in headers.get(b"accept", b"")
                or not self.enabled()):
            await self.app(scope, receive, send)
            return
        body, messages = await read_body(receive)
        digest = hashlib.sha256(b"\0".join([scope["path"].encode(), scope.get("query_string", b""),
                                            headers.get(b"content-type", b""), headers.get(b"accept", b""),
                                            body])).digest()
        if await self.answered(digest, scope, receive, send):
            return
        scope[REMEMBER] = None
        await self.app(scope, replay(messages, receive), send)
        if scope.get(REMEMBER) is not None:
            self.memo[digest] = scope[REMEMBER]
            while len(self.memo) > MEMO_SIZE:
                self.memo.popitem(last=False)

    async def answered(self, digest: bytes, scope, receive, send) -> bool:
        """Answer from the cache when `digest` is a remembered request that still resolves and is still cached."""
        entry = self.memo.get(digest)
        if entry is None:
            return False
        request, asked_version = entry
        try:
            model = self.resolve(request.family, asked_version)
        except Exception:  # gone or broken: the full path says what is wrong
            return False
        if (model.version, model.manifest_sha256) != (request.version, request.manifest_sha256):
            return False
        payload = await self.cached(request.cache_key())
        if payload is None:
            return False
        if digest in self.memo:  # it may have been dropped while the cache was read
            self.memo.move_to_end(digest)
        scope[ROUTE_KEY] = "/counterfactual" if request.kind == "counterfactual" else "/generate/{mechanism}"
        response = await self.answer(request, payload)
        await response(scope, receive, send)
        return True


async def read_body(receive) -> tuple[bytes, list[dict]]:
    """The whole request body, and the messages it came in (to hand them on unchanged)."""
    messages, parts = [], []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts), messages


def replay(messages: list[dict], receive):
    """A `receive` that hands out `messages` first, then whatever the client sends next (a disconnect)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
