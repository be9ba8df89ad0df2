"""What the Redis servers' memory settings risk, said once at start-up by the gateway and by `make run`.

The broker Redis holds queued tasks and job records, which must never be evicted: it should run `noeviction`.
The batch cache only grows, so it belongs in a Redis of its own, bounded by `maxmemory` with `allkeys-lru`
(SKDCGN_CACHE_URL; `make run` starts one bounded by SKDCGN_CACHE_MAX_MEMORY).
"""
from __future__ import annotations

import redis

from core.settings import Settings


def memory_policy(url: str) -> tuple[int, str] | None:
    """(maxmemory bytes, maxmemory-policy) of the Redis at `url`; None where CONFIG is not allowed or it is down."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2, decode_responses=True)
        config = client.config_get("maxmemory*")
        return int(config.get("maxmemory", 0)), config.get("maxmemory-policy", "")
    except (redis.RedisError, OSError, ValueError):
        return None


def memory_warnings(settings: Settings) -> list[str]:
    """A line for each risk: cache entries sharing the broker Redis, a broker that may evict, an unbounded cache."""
    warnings = []
    broker = memory_policy(settings.redis_url)
    if settings.cache_url == settings.redis_url:
        warnings.append("the batch cache shares the broker Redis (SKDCGN_CACHE_URL unset or equal to "
                        "SKDCGN_REDIS_URL): cache entries grow with every distinct request until that Redis runs out "
                        "of memory, and then queued tasks and job records are refused, or evicted under an eviction "
                        "policy; point SKDCGN_CACHE_URL at a Redis of its own with maxmemory and allkeys-lru")
    elif settings.cache_url:
        cache = memory_policy(settings.cache_url)
        if cache is not None and (cache[0] == 0 or cache[1] == "noeviction"):
            warnings.append(f"the cache Redis has maxmemory {cache[0]} and policy {cache[1]}: set a maxmemory bound "
                            "and allkeys-lru, or the cache grows until it refuses writes")
    if broker is not None and broker[1] != "noeviction":
        warnings.append(f"the broker Redis evicts keys (maxmemory-policy {broker[1]}): under memory pressure it may "
                        "drop queued tasks and job records; run it with noeviction")
    return warnings
