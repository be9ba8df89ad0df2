"""What the gateway does around every request, as plain ASGI middleware (no per-request task or body buffering):
its request id, admission, and its HTTP metrics.

- The request id (core.logs) is the client's `X-Request-ID` when well formed, else a new one; it is returned in
  the response, set for every log line written while the request is served, and passed to the workers.
- Admission counts the requests this gateway process is serving; beyond `max_in_flight` a request is answered
  429 with Retry-After before any work, so overload never exhausts Redis connections, memory or the event loop.
  Liveness, readiness and metrics are always answered and not counted, so an overloaded gateway still reports on
  itself and its in-flight gauge reads 0 when it is idle.
"""
from __future__ import annotations

import json
import time

from core.logs import REQUEST_ID_HEADER, accept_request_id, request_id
from service.metrics import GatewayMetrics

ROUTE_KEY = "skdcgn.route"  # the route template of a request answered before FastAPI routed it (service.repeats)
ALWAYS_ADMITTED = frozenset({"/healthz", "/readyz", "/metrics"})


class GatewayMiddleware:
    def __init__(self, app, max_in_flight: int, metrics: GatewayMetrics):
        self.app, self.max_in_flight, self.metrics = app, max_in_flight, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        offered = next((value.decode("latin-1") for name, value in scope["headers"]
                        if name == b"x-request-id"), None)
        current = accept_request_id(offered)
        token = request_id.set(current)

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.lower().encode(), current.encode())]
            await send(message)

        try:
            if scope["path"] in ALWAYS_ADMITTED:  # answered whatever the load, and not counted against it
                await self.app(scope, receive, observed_send)
                return
            if self.in_flight >= self.max_in_flight:
                await self.refuse(observed_send)
                return
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            try:
                await self.app(scope, receive, observed_send)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
        finally:
            route = scope.get("route")
            path = route.path if route else scope.get(ROUTE_KEY, "unmatched")
            self.metrics.observe(path, scope["method"], status, time.perf_counter() - started)
            request_id.reset(token)

    async def refuse(self, send) -> None:
        body = json.dumps({"error": f"this gateway is serving {self.in_flight} requests, its maximum "
                                   f"(SKDCGN_MAX_IN_FLIGHT={self.max_in_flight}); retry shortly"}).encode()
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})
