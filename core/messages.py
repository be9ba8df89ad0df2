"""The wire contract between the gateway and the workers: queues, task names, Redis keys and typed messages.

Both sides import this module and neither imports the other. Every message carries `schema`, the version of
this contract; a worker that receives a message of another version refuses it loudly (an error reply and a log
line naming both versions) instead of guessing at fields, so a gateway and workers of different releases never
render something other than what was asked.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

# 3: workers announce themselves in WORKERS_KEY (one hash) instead of one key each; a worker of an older release is
# invisible to this gateway and refuses its tasks loudly, so mixed releases never serve half-working.
MESSAGE_SCHEMA = 3

INTERACTIVE_QUEUE = "interactive"
JOBS_QUEUE = "jobs"
QUEUES = (INTERACTIVE_QUEUE, JOBS_QUEUE)
RENDER_TASK = "workers.tasks.render"
CHUNK_TASK = "workers.tasks.render_chunk"
TASK_QUEUES = {RENDER_TASK: INTERACTIVE_QUEUE, CHUNK_TASK: JOBS_QUEUE}

CACHE_PREFIX = "skdcgn:cache:"
WORKERS_KEY = "skdcgn:workers"  # hash: worker name -> its heartbeat (JSON with `expires_at`, Redis server time)
STATS_KEY = "skdcgn:stats"

RenderKind = Literal["counterfactual", "mechanism"]


class MessageSchemaError(ValueError):
    """A message of another contract version, or one missing fields: refused, never guessed at."""


def redis_now(time_reply) -> float:
    """Redis TIME's (seconds, microseconds) as epoch seconds: every heartbeat is stamped and judged on the Redis
    server's clock, so hosts whose clocks disagree still agree on which workers are alive."""
    seconds, micros = time_reply
    return int(seconds) + int(micros) / 1e6


def live_heartbeats(beats: dict, now: float, forget_after: float) -> tuple[list[dict], list[str]]:
    """The heartbeats in WORKERS_KEY that have not expired at `now` (Redis time), sorted by name, and the names of
    those expired more than `forget_after` seconds ago or unreadable (to drop: a worker that was only late keeps its
    field). Its cost grows with the workers, never with what else Redis holds."""
    live, forgotten = [], []
    for name, raw in beats.items():
        try:
            beat = json.loads(raw)
            expires_at = float(beat["expires_at"])
        except (ValueError, TypeError, KeyError):
            forgotten.append(name)
            continue
        if expires_at > now:
            live.append(beat)
        elif expires_at < now - forget_after:
            forgotten.append(name)
    return sorted(live, key=lambda beat: beat["name"]), forgotten


def lost_workers(before: list[dict], now: list[dict]) -> list[str]:
    """Names of the workers of `before` that are gone in `now`: their heartbeat vanished, or a new incarnation
    announced itself under the same node name (the worker's name without its pid): the worker restarted. Whatever
    such a worker had taken from a queue and not answered is lost."""
    def node(beat: dict) -> str:
        return beat["name"].rsplit(":", 1)[0]

    def identity(beat: dict) -> tuple:
        return beat["name"], beat.get("incarnation")

    known, current = {identity(beat) for beat in before}, {identity(beat) for beat in now}
    restarted = {node(beat) for beat in now if identity(beat) not in known}
    return [beat["name"] for beat in before if identity(beat) not in current or node(beat) in restarted]


def reply_key(reply_to: str) -> str:
    """The list a worker pushes a batch's answers to; the gateway waits on it with BLPOP."""
    return f"skdcgn:reply:{reply_to}"


def _check_schema(kind: str, message: dict) -> dict:
    if not isinstance(message, dict) or message.get("schema") != MESSAGE_SCHEMA:
        found = message.get("schema") if isinstance(message, dict) else type(message).__name__
        raise MessageSchemaError(f"{kind} message has contract version {found!r}, this side speaks {MESSAGE_SCHEMA}: "
                                 "run the gateway and the workers from the same release")
    return {key: value for key, value in message.items() if key != "schema"}


def _build(cls, kind: str, message: dict):
    body = _check_schema(kind, message)
    names = {item.name for item in fields(cls)}
    unknown, missing = set(body) - names, {item.name for item in fields(cls) if item.name not in body}
    if unknown or missing:
        raise MessageSchemaError(f"{kind} message does not match contract version {MESSAGE_SCHEMA}: "
                                 f"unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    return cls(**body)


@dataclass(frozen=True)
class RenderRequest:
    """One interactive request, resolved to a model version by the gateway.

    `labels` maps each rendered mechanism to its label (all three for a counterfactual, one for a mechanism);
    `z` optionally maps mechanisms to n explicit noise vectors; `mask` is a core.compose.MaskModifiers dict.
    """

    kind: RenderKind
    family: str
    version: str
    manifest_sha256: str
    labels: dict[str, int]
    n: int
    seed: int
    mask: dict[str, float] = field(default_factory=dict)
    z: Optional[dict[str, list[list[float]]]] = None
    return_components: bool = False
    return_noise: bool = False
    request_id: str = ""  # the HTTP request's id, for the logs of both sides; no part of the output

    def to_dict(self) -> dict:
        return {"schema": MESSAGE_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, message: dict) -> "RenderRequest":
        return _build(cls, "render request", message)

    @property
    def mechanism(self) -> str:
        """The mechanism a `mechanism` request renders."""
        (name,) = self.labels
        return name

    def cache_key(self) -> str:
        """Every input that determines the output, the model version and its manifest hash included."""
        determining = {key: value for key, value in self.to_dict().items() if key != "request_id"}
        canonical = json.dumps(determining, sort_keys=True, separators=(",", ":"))
        return CACHE_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RenderBatch:
    """Interactive requests that the gateway batched into one task; the worker answers them all at once, as one
    `BatchReply` pushed to the reply list named by `reply_to` (one list, so the gateway blocks on one connection
    per batch, not one per request)."""

    requests: list[RenderRequest]
    reply_to: str
    sent_at: float = 0.0  # epoch seconds when the gateway queued it: the worker measures the queue wait

    def to_dict(self) -> dict:
        return {"schema": MESSAGE_SCHEMA, "requests": [r.to_dict() for r in self.requests], "reply_to": self.reply_to,
                "sent_at": self.sent_at}

    @classmethod
    def from_dict(cls, message: dict) -> "RenderBatch":
        body = _check_schema("render batch", message)
        try:
            return cls([RenderRequest.from_dict(item) for item in body["requests"]], str(body["reply_to"]),
                       float(body.get("sent_at", 0.0)))
        except (KeyError, TypeError) as exc:
            raise MessageSchemaError(f"render batch message is malformed: {exc!r}") from exc


@dataclass(frozen=True)
class RenderReply:
    """A worker's answer to one request: the payload, or an error with the HTTP status the gateway returns."""

    payload: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    status: int = 200

    def to_dict(self) -> dict:
        return {"schema": MESSAGE_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, message: dict) -> "RenderReply":
        return _build(cls, "render reply", message)

    @classmethod
    def failure(cls, status: int, error: str) -> "RenderReply":
        return cls(error=error, status=status)


@dataclass(frozen=True)
class BatchReply:
    """The answers to a RenderBatch, in the order of its requests."""

    replies: list[RenderReply]

    def to_dict(self) -> dict:
        return {"schema": MESSAGE_SCHEMA, "replies": [reply.to_dict() for reply in self.replies]}

    @classmethod
    def from_dict(cls, message: dict) -> "BatchReply":
        body = _check_schema("batch reply", message)
        return cls([RenderReply.from_dict(item) for item in body["replies"]])


@dataclass(frozen=True)
class ChunkTask:
    """Render chunk `chunk` of job `job_id`: the job's spec is stored once, in its record, not in each message."""

    job_id: str
    chunk: int
    sent_at: float = 0.0  # epoch seconds when it was queued

    def to_dict(self) -> dict:
        return {"schema": MESSAGE_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, message: dict) -> "ChunkTask":
        return _build(cls, "chunk task", message)

    @property
    def task_id(self) -> str:
        """Deterministic: it names the job and the chunk, in logs and in the queue."""
        return f"{self.job_id}-{self.chunk:06d}"
