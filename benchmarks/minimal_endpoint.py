"""The floor a cache hit is measured against: FastAPI under uvicorn, one hash of the body, one Redis GET, the
stored bytes back.

POST /counterfactual reads the body, hashes it to a key (`body_key`: sha256 of the raw bytes, as the gateway hashes
a request to its cache key) and answers that key's value from Redis as JSON; nothing is parsed, validated or
counted. uvicorn runs as `python -m service` runs the gateway (its defaults: uvloop and httptools when installed,
log level info), so the gap between the two is the gateway's own work per hit. benchmarks/serving.py starts it on
a free port against the service's cache Redis and stores there, under `body_key(body)`, the service's real
cache-hit answer for each body it sends (one repeated body, and the same distinct bodies as the gateway's
distinct-hit point), so both return the same bytes for the same requests. An unknown body is answered 404.

    python -m benchmarks.minimal_endpoint --port 8001 --redis-url redis://127.0.0.1:6379/0
"""
from __future__ import annotations

import argparse
import hashlib
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

KEY_PREFIX = "skdcgn:bench:minimal:"
POOL_SIZE = 64  # Redis connections; a request beyond them waits for one (a plain pool would fail it)


def body_key(body: bytes, prefix: str = KEY_PREFIX) -> str:
    """The Redis key the endpoint reads for a request body: `prefix` + sha256 of the body's bytes."""
    return prefix + hashlib.sha256(body).hexdigest()


def create_app(redis_url: str, prefix: str = KEY_PREFIX) -> FastAPI:
    client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=POOL_SIZE, timeout=5, socket_connect_timeout=1, socket_timeout=5))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await client.aclose()

    app = FastAPI(title="minimal FastAPI + one Redis GET", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/counterfactual")
    async def counterfactual(request: Request):
        key = body_key(await request.body(), prefix)
        value = await client.get(key)
        if value is None:
            return JSONResponse({"error": f"nothing stored under {key}"}, status_code=404)
        return Response(value, media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.minimal_endpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default=KEY_PREFIX, help="of the keys it reads (then the body's sha256)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.redis_url, args.prefix), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
