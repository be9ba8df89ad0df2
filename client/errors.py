"""Typed errors of the client: one class per HTTP status the gateway answers, each carrying the server's message.

Every error the gateway sends has the body `{"error": "..."}` (validation errors add `detail`); `APIError.message`
is that text. `ClientError` covers 4xx, `ServerError` 5xx; `ConnectionFailed`, `ChecksumMismatch`, `JobFailed`,
`JobCancelled` and `WaitTimeout` are raised by the client itself. All derive from `SkdcgnError`.
"""
from __future__ import annotations

from typing import Any, Optional


class SkdcgnError(Exception):
    """Base of every error this package raises."""


class APIError(SkdcgnError):
    """A non-2xx answer of the service."""

    status: int = 0

    def __init__(self, status: int, message: str, detail: Optional[list] = None, headers: Optional[dict] = None,
                 method: str = "", url: str = ""):
        self.status, self.message, self.detail = status, message, detail
        self.headers = dict(headers or {})
        self.method, self.url = method, url
        where = f" ({method} {url})" if method else ""
        super().__init__(f"HTTP {status}{where}: {message}")

    @property
    def retry_after(self) -> Optional[float]:
        """The Retry-After header in seconds, when the server sent one in seconds."""
        try:
            return float(self.headers.get("retry-after", ""))
        except ValueError:
            return None


class ClientError(APIError):
    """4xx: the request was refused; change it before sending it again."""


class ServerError(APIError):
    """5xx: the service failed or is unavailable."""


class BadRequest(ClientError):
    status = 400


class AuthenticationRequired(ClientError):
    status = 401


class PermissionDenied(ClientError):
    status = 403


class NotFound(ClientError):
    status = 404


class MethodNotAllowed(ClientError):
    status = 405


class Conflict(ClientError):
    """409: e.g. the result of a job that has not succeeded (yet)."""

    status = 409


class Gone(ClientError):
    status = 410


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class RangeNotSatisfiable(ClientError):
    status = 416


class ValidationError(ClientError):
    """422: invalid fields; `detail` lists them as the server reported them."""

    status = 422


class RateLimited(ClientError):
    """429: a queue is over its bound or too many jobs are active; retried after Retry-After (bounded)."""

    status = 429


class InternalServerError(ServerError):
    status = 500


class ServiceUnavailable(ServerError):
    """503: Redis or every worker is down, or a model version is refused; retried after Retry-After (bounded)."""

    status = 503


class GatewayTimeout(ServerError):
    status = 504


class InsufficientStorage(ServerError):
    """507: the job's result would not fit on the server's disk."""

    status = 507


BY_STATUS: dict[int, type[APIError]] = {cls.status: cls for cls in (
    BadRequest, AuthenticationRequired, PermissionDenied, NotFound, MethodNotAllowed, Conflict, Gone,
    PayloadTooLarge, UnsupportedMediaType, RangeNotSatisfiable, ValidationError, RateLimited, InternalServerError,
    ServiceUnavailable, GatewayTimeout, InsufficientStorage,
)}


def api_error(status: int, body: Any, text: str = "", headers: Optional[dict] = None, method: str = "",
              url: str = "") -> APIError:
    """The typed error of an answer: the server's `error` text, or the start of a body that is not ErrorBody."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, detail = body["error"], body.get("detail")
    else:
        message, detail = (text.strip()[:300] or "(no message)"), None
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else ClientError if status >= 400 else APIError)
    return cls(status, message, detail, headers, method, url)


class ConnectionFailed(SkdcgnError):
    """The service could not be reached (after the bounded retries)."""


class ChecksumMismatch(SkdcgnError):
    """A downloaded file does not match the sha256 the server published; the bad copy was removed."""

    def __init__(self, name: str, expected: str, actual: str):
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(f"{name}: sha256 {actual} does not match the server's {expected}; the corrupt download was "
                         "removed, download again")


class JobFailed(SkdcgnError):
    """The job ended failed; `message` is the server's error and `job` its last status."""

    def __init__(self, job, message: str):
        self.job, self.message = job, message
        super().__init__(f"job {job.id} {job.state}: {message}")


class JobCancelled(JobFailed):
    """The job was cancelled before it succeeded."""


class WaitTimeout(SkdcgnError):
    """The job did not end within the time `wait` was given."""
