"""The SKDCGN client: the counterfactual service from Python (`Client`, `AsyncClient`) and the `skdcgn` CLI.

Needs only httpx, numpy, pillow and tqdm (`pip install .[client]`); torch only for `client.torch_data`.
"""
from client.api import AsyncClient, Client, DownloadedFile, Job, JobFile, Rendered, load_npz
from client.errors import (
    APIError, AuthenticationRequired, BadRequest, ChecksumMismatch, ClientError, Conflict, ConnectionFailed,
    GatewayTimeout, Gone, InsufficientStorage, InternalServerError, JobCancelled, JobFailed, MethodNotAllowed,
    NotFound, PayloadTooLarge, PermissionDenied, RateLimited, ServerError, ServiceUnavailable, SkdcgnError,
    ValidationError, WaitTimeout,
)

__all__ = [
    "AsyncClient", "Client", "DownloadedFile", "Job", "JobFile", "Rendered", "load_npz",
    "APIError", "AuthenticationRequired", "BadRequest", "ChecksumMismatch", "ClientError", "Conflict",
    "ConnectionFailed", "GatewayTimeout", "Gone", "InsufficientStorage", "InternalServerError", "JobCancelled",
    "JobFailed", "MethodNotAllowed", "NotFound", "PayloadTooLarge", "PermissionDenied", "RateLimited", "ServerError",
    "ServiceUnavailable", "SkdcgnError", "ValidationError", "WaitTimeout",
]
