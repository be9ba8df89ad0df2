"""A result file streamed from the result store, whole (200) or the byte range a Range header asks for (206), so an
interrupted download resumes (curl -C -, the client's download). One path for every store: a folder's files and a
bucket's objects answer alike.

One range per request (`bytes=a-b`, `bytes=a-`, `bytes=-n`); a header naming several, or one this parser does not
read, is ignored and the whole file answers (RFC 9110 lets a server do that); a range past the end is 416.
"""
from __future__ import annotations

import re

from fastapi.responses import Response, StreamingResponse

from core.results import ResultStore
from service.errors import error_response

RANGE_PATTERN = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) of the one range `header` asks for, clipped to the file; None for the whole file; (size, size)
    when it lies wholly past the end (416)."""
    match = RANGE_PATTERN.match(header.strip()) if header else None
    if not match or match[1] == match[2] == "":
        return None
    if match[1] == "":  # the last n bytes
        return max(0, size - int(match[2])), size
    start = int(match[1])
    stop = size if match[2] == "" else min(size, int(match[2]) + 1)
    if start >= size:
        return size, size
    return (start, stop) if stop > start else None


def stored_file(store: ResultStore, key: str, size: int, range_header: str | None, media_type: str, filename: str,
                headers: dict[str, str], sha256: str | None) -> Response:
    """Stream `key` (`size` bytes, as recorded when the job succeeded) from the store."""
    common = {**headers, "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    if sha256:
        common["ETag"] = f'"{sha256}"'
    bounds = byte_range(range_header, size)
    if bounds == (size, size) and range_header:
        return error_response(416, f"Range {range_header!r} starts past the end of {filename} ({size} bytes)",
                              {"Content-Range": f"bytes */{size}"})
    start, stop = bounds or (0, size)
    common["Content-Length"] = str(stop - start)
    if bounds is None:
        return StreamingResponse(store.read_range(key, 0, size), media_type=media_type, headers=common)
    common["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return StreamingResponse(store.read_range(key, start, stop), status_code=206, media_type=media_type,
                             headers=common)
