"""Logging shared by the gateway and the workers: every line carries the request id it is about.

A request id comes from the client's `X-Request-ID` (when it is 1–128 characters of `[A-Za-z0-9._-]`) or is
made here; the gateway returns it, passes it with the task, and both sides keep it in a context variable that
a logging filter copies onto every record. `SKDCGN_LOG_FORMAT=json` writes one JSON object per line instead.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
NO_REQUEST = "-"
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
request_id = contextvars.ContextVar("request_id", default=NO_REQUEST)


def accept_request_id(offered: str | None) -> str:
    """The client's id when it is well formed, a new one otherwise."""
    return offered if offered and REQUEST_ID_PATTERN.match(offered) else uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Copies the current request id onto each record (as `request_id`), unless the record names its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", NO_REQUEST), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def formatter(fmt: str) -> logging.Formatter:
    """`text` or `json`."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {fmt!r}: use text or json")


def attach(handler: logging.Handler, fmt: str) -> None:
    """Give a handler (ours, or one Celery set up) the project's format and the request-id filter."""
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RequestIdFilter())


def configure(fmt: str, level: int = logging.INFO) -> None:
    """Route every logger (uvicorn's included) through one stderr handler of format `fmt`."""
    handler = logging.StreamHandler(sys.stderr)
    attach(handler, fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
