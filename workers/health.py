"""`python -m workers.health`: exit 0 when a worker on this host has announced itself ready (Docker healthcheck).

The heartbeat appears only after the worker loaded and warmed up its models, and expires when it dies. One HGETALL
of the workers' hash: the check costs the same however many keys Redis holds.
"""
from __future__ import annotations

import socket
import sys

import redis

from core.settings import Settings
from core.messages import WORKERS_KEY, live_heartbeats, redis_now


def main() -> int:
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2,
                                  decode_responses=True)
    host = f"@{socket.gethostname()}:"
    try:
        now, beats = client.pipeline(transaction=False).time().hgetall(WORKERS_KEY).execute()
    except redis.RedisError as exc:
        print(f"unhealthy: Redis at {settings.redis_url} is unreachable: {exc}", file=sys.stderr)
        return 1
    live, _ = live_heartbeats(beats, redis_now(now), forget_after=0.0)
    if not any(host in beat["name"] for beat in live):
        print(f"unhealthy: no current heartbeat of a worker on this host (name containing {host!r}) in "
              f"{WORKERS_KEY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
