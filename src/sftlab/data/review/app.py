"""The review web app: one static page (`page.html`) and a small JSON API under /api/.

Safety: the page puts every text into the DOM as text (never as HTML), and its Content
Security Policy allows only the page's own inline script and style (by hash), so even a
record holding `<script>` cannot run. /api/ takes the same optional API key, body size
limit, body timeout and concurrency cap as `sftlab serve` (serve/guard.py); POSTs must be JSON (a cross-site form cannot send that without a
CORS preflight, which this server never grants) and come from the page's own origin; on a
loopback address only loopback Host names are answered (no DNS rebinding). The server
writes nothing but the review log, inside the review folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from sftlab.data.conversation import jsonable
from sftlab.data.review.session import MAX_LABEL, MAX_REASON, Conflict, ReviewSession, UnknownExample
from sftlab.errors import SftlabError
from sftlab.serve.guard import (GuardLimits, add_request_guard, encodable, error_response, http_error_handler,
                                validation_error_handler)

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class Action(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["accept", "reject", "reset", "edit", "label", "unlabel", "score"]
    reason: str | None = Field(None, max_length=MAX_REASON)
    message: int | None = Field(None, ge=0)
    content: str | None = None
    base: str | None = None  # the text the edit started from (a changed one is a conflict)
    label: str | None = Field(None, max_length=MAX_LABEL)
    score: int | None = Field(None, ge=1, le=5)

    _check_text = field_validator("reason", "content", "base", "label")(encodable)


def _page() -> tuple[str, str]:
    """The page, and a CSP that allows exactly its inline <script> and <style>."""
    page = resources.files("sftlab.data.review").joinpath("page.html").read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    csp = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, csp


def create_app(session: ReviewSession, *, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               allowed_hosts: list[str] | None = None, limits: GuardLimits | None = None) -> FastAPI:
    """The review app for `session`. `allowed_hosts`: Host names answered (None: any); `limits`
    (concurrency, body timeout) default to GuardLimits with `max_body_bytes`."""
    page, csp = _page()
    app = FastAPI(title="sftlab data review", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(Conflict)
    async def _conflict(_, e: Conflict):
        return error_response(409, str(e), param=e.current, code="edit_conflict")

    @app.exception_handler(SftlabError)
    async def _bad(_, e: SftlabError):
        return error_response(400, str(e))

    @app.exception_handler(UnknownExample)
    async def _missing(_, e: UnknownExample):
        return error_response(404, str(e), code="not_found")

    app.add_exception_handler(HTTPException, http_error_handler)
    add_request_guard(app, prefix="/api/", api_key=api_key, limits=limits or GuardLimits(max_body_bytes=max_body_bytes))

    @app.middleware("http")
    async def _same_origin(request: Request, call_next):
        host = request.headers.get("host", "")
        if allowed_hosts is not None and host.rsplit(":", 1)[0] not in allowed_hosts:
            return error_response(400, f"Host '{host}' is not served here", code="bad_host")
        if request.method == "POST":
            if not request.headers.get("content-type", "").startswith("application/json"):
                return error_response(415, "send JSON (Content-Type: application/json)", code="unsupported_media_type")
            origin = request.headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != host:
                return error_response(403, f"requests from {origin} are not allowed", code="cross_origin")
        response = await call_next(request)
        response.headers.update({"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})
        return response

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/meta")
    def meta():
        tokenizer = session.tokenizer
        return {"data": session.data, "review_dir": str(session.dir), "total": len(session.ids),
                "labels": session.known_labels(), "flags": session.flag_counts(),
                "model": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}

    @app.get("/api/items")
    def items(status: Literal["pending", "accepted", "rejected"] | None = None, flag: str | None = None,
              label: str | None = None, q: str | None = None):
        session.log.refresh()
        return {"ids": session.matching(status=status, flag=flag, label=label, q=q), "progress": session.progress()}

    @app.get("/api/items/{item_id}")
    def item(item_id: str):
        session.log.refresh()
        return session.item(item_id)

    @app.get("/api/items/{item_id}/tokens")
    def tokens(item_id: str):
        return session.token_view(item_id)

    @app.post("/api/items/{item_id}/actions")
    def act(item_id: str, action: Action):
        session.act(item_id, action.model_dump(exclude_none=action.action != "score"))
        return {"item": session.item(item_id), "progress": session.progress(), "labels": session.known_labels()}

    @app.get("/api/changes")
    def changes(since: int = 0):
        session.log.refresh()
        return {"changed": sorted(session.log.changed_since(since)), "progress": session.progress(),
                "suggest": session.suggest_status, "labels": session.known_labels()}

    @app.get("/api/export.jsonl")
    def export():
        body = "".join(json.dumps(c.to_json(), ensure_ascii=False, default=jsonable) + "\n" for c in session.approved())
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="reviewed.jsonl"'})

    return app
