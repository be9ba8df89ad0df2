"""The floor a cache hit is measured against: FastAPI under uvicorn, one Redis GET, the stored bytes back.

POST /counterfactual reads the body, GETs one key from Redis and answers its value as JSON; nothing is parsed,
validated, hashed or counted. uvicorn runs as `python -m service` runs the gateway (its defaults: uvloop and
httptools when installed, log level info), so the gap between the two is the gateway's own work per hit.
benchmarks/serving.py starts it on a free port against the service's cache Redis and stores there, under KEY,
a real cache-hit answer, so both return the same bytes.

    python -m benchmarks.minimal_endpoint --port 8001 --redis-url redis://127.0.0.1:6379/0
"""
from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

KEY = "skdcgn:bench:minimal-endpoint"
POOL_SIZE = 64  # Redis connections; a request beyond them waits for one (a plain pool would fail it)


def create_app(redis_url: str, key: str = KEY) -> FastAPI:
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
        await request.body()
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
    parser.add_argument("--key", default=KEY)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.redis_url, args.key), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
