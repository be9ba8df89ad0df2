"""`python -m workers.health`: exit 0 when a worker on this host has announced itself ready (Docker healthcheck).

The heartbeat appears only after the worker loaded and warmed up its models, and expires when it dies.
"""
from __future__ import annotations

import socket
import sys

import redis

from core.settings import Settings
from core.messages import WORKER_PREFIX


def main() -> int:
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    pattern = f"{WORKER_PREFIX}*@{socket.gethostname()}:*"
    try:
        found = next(client.scan_iter(match=pattern), None)
    except redis.RedisError as exc:
        print(f"unhealthy: Redis at {settings.redis_url} is unreachable: {exc}", file=sys.stderr)
        return 1
    if found is None:
        print(f"unhealthy: no ready worker heartbeat matching {pattern}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
