"""Request guard shared by the HTTP servers (`sftlab serve`, `sftlab data review`): an
optional API key (`Authorization: Bearer KEY`) and a request body size limit, answered
in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None,
                   code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def add_request_guard(app: FastAPI, *, prefix: str, api_key: str | None, max_body_bytes: int) -> None:
    """Check every request under `prefix`: the API key (when set) and the body size."""

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith(prefix):
            if api_key is not None:
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not secrets.compare_digest(token.encode(), api_key.encode()):
                    return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_body_bytes:
                return error_response(413, f"request body is {length} bytes; the limit is {max_body_bytes}",
                                      code="request_too_large")
            if request.method == "POST" and len(await request.body()) > max_body_bytes:
                return error_response(413, f"request body exceeds {max_body_bytes} bytes", code="request_too_large")
        return await call_next(request)
