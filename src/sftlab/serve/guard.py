"""Request guard shared by the HTTP servers (`sftlab serve`, `sftlab data review`), answered in
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

For every request under a path prefix: the API key (`Authorization: Bearer KEY`, 401), a cap on
requests in flight (429), and the body read as it streams in: 413 as soon as it passes the size
limit (the rest is never read) and 408 when it does not arrive within the body timeout, so a
slow or oversized upload holds neither memory nor a worker for long.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sftlab.errors import SftlabError


@dataclass
class GuardLimits:
    max_body_bytes: int = 1_000_000
    max_concurrent: int = 64  # requests in flight under the prefix; more get 429
    body_timeout: float = 30.0  # seconds to receive a whole request body; slower gets 408


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None,
                   code=None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def http_error_handler(_, e: HTTPException) -> JSONResponse:
    """FastAPI's own errors (an unparsable body, e.g. JSON nested too deep; 404; 405) in OpenAI's shape."""
    return error_response(e.status_code, str(e.detail), headers=e.headers)


async def validation_error_handler(_, e) -> JSONResponse:
    """A FastAPI RequestValidationError as one 400 naming the field, or where the body is not JSON."""
    first = e.errors()[0]
    loc = first.get("loc", ())
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, f"the request body is not valid JSON: {reason} at character {loc[-1]}")
    where = ".".join(str(x) for x in loc[1:]) or None
    return error_response(400, f"invalid request: {where or 'body'}: {first.get('msg')}", param=where)


def encodable(value: str | list[str] | None):
    """A pydantic field validator: JSON may carry lone surrogates (\\ud800) that no tokenizer or
    UTF-8 file can take; refuse them at the door (400) instead of failing later (500)."""
    for text in [value] if isinstance(value, str) else value or []:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode at character {e.start} (a lone surrogate)") from None
    return value


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


class RequestGuard:
    """ASGI middleware: `app.add_middleware(RequestGuard, prefix=..., api_key=..., limits=...)`."""

    def __init__(self, app: ASGIApp, *, prefix: str, api_key: str | None, limits: GuardLimits):
        self.app, self.prefix, self.api_key, self.limits = app, prefix, api_key, limits
        self.active = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        try:
            self._check_headers(Headers(scope=scope))
            if self.active >= self.limits.max_concurrent:
                raise _Refused(error_response(
                    429, f"the server is busy ({self.limits.max_concurrent} requests in flight); retry shortly",
                    type_="rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"}))
        except _Refused as r:
            await r.response(scope, receive, send)
            return
        self.active += 1
        try:
            try:
                replay = await self._read_body(receive)
            except _Refused as r:
                await r.response(scope, receive, send)
                return
            await self.app(scope, replay, send)
        finally:
            self.active -= 1

    def _check_headers(self, headers: Headers) -> None:
        if self.api_key is not None:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                raise _Refused(error_response(401, "Incorrect API key provided.", code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise _Refused(self._too_large(f"request body is {length} bytes"))

    def _too_large(self, what: str) -> JSONResponse:
        return error_response(413, f"{what}; the limit is {self.limits.max_body_bytes} bytes", code="request_too_large",
                              headers={"Connection": "close"})

    async def _read_body(self, receive: Receive) -> Receive:
        """Read the body chunk by chunk (at most max_body_bytes are ever held) and return a
        `receive` that replays it, then hands over to the real one (disconnect notices)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        chunks, size = [], 0
        first: Message | None = None
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _Refused(error_response(
                    408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                    code="request_timeout", headers={"Connection": "close"})) from None
            if message["type"] != "http.request":  # the client went away
                first = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body_bytes:
                raise _Refused(self._too_large(f"request body passed {size} bytes"))
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break

        async def replay() -> Message:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        return replay


def add_request_guard(app, *, prefix: str, api_key: str | None, limits: GuardLimits) -> None:
    """Guard every request under `prefix` (see RequestGuard)."""
    app.add_middleware(RequestGuard, prefix=prefix, api_key=api_key, limits=limits)


def read_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key / SFTLAB_API_KEY or from a file (its first line), not both."""
    if api_key_file is None:
        return api_key or None
    if api_key:
        raise SftlabError("give the API key once: --api-key/SFTLAB_API_KEY or --api-key-file, not both")
    try:
        lines = Path(api_key_file).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SftlabError(f"{api_key_file}: cannot read the API key file: {e.strerror}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise SftlabError(f"{api_key_file}:1: the API key file is empty")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Warn (stderr) when binding an address others can reach without an API key; True if warned."""
    if api_key or is_loopback(host):
        return False
    print(f"warning: listening on {host} without an API key: anyone who can reach this address can use "
          "the server. Set SFTLAB_API_KEY or --api-key-file, or bind 127.0.0.1.", file=sys.stderr, flush=True)
    return True
