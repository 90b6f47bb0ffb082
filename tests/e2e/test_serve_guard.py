"""The request guard of the HTTP servers, over real sockets: the body limit while it streams in
(413 before the body ends), the body timeout (408), the cap on requests in flight (429), uvicorn's
limits on slow or oversized headers, the key from a file, and the warning for a reachable address."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

KEY = "guard-key"


class StubBackend:
    """Answers "ok" after `delay` seconds, so requests stay in flight as long as a test needs."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer, self.delay = tokenizer, delay

    async def generate(self, *, ids, max_tokens, **_):
        from sftlab.serve.backends import Completion

        await asyncio.sleep(self.delay)
        return Completion("ok", "stop", len(ids), 1)


class ThreadServer:
    def __init__(self, app, **config):
        import uvicorn

        from sftlab.serve.openai_api import server_config
        from sftlab.serve.triton_server import free_port

        self.port = free_port()
        self.server = uvicorn.Server(server_config(app, port=self.port, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _serve(tokenizer, delay=0.0, **limits):
    from sftlab.serve.openai_api import Limits, create_app

    limits = {"max_body_bytes": 10_000, "max_concurrent": 4, "body_timeout": 1.0, **limits}
    return ThreadServer(create_app(StubBackend(tokenizer, delay), "stub", api_key=KEY, limits=Limits(**limits)),
                        keep_alive_timeout=1)


@pytest.fixture
def server(tokenizer):
    srv = _serve(tokenizer)
    yield srv
    srv.close()


def _raw(port: int, head: str, body_parts: list[bytes], wait: float = 5.0) -> tuple[bytes, float]:
    """Send `head` and `body_parts` on a socket WITHOUT ending the body; return the response (read
    until the server closes) and the seconds its first bytes took to come."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head.encode())
        start = time.monotonic()
        for part in body_parts:
            s.sendall(part)
        data, took = b"", None
        try:
            while chunk := s.recv(65536):
                data += chunk
                took = took or time.monotonic() - start
        except (socket.timeout, ConnectionResetError):
            pass
        return data, took or time.monotonic() - start


def _head(extra: str) -> str:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n")


def test_oversized_chunked_body_gets_413_before_it_ends(server):
    # No Content-Length: the size is only known while reading. 12 KB of a never-ending body are
    # sent; a server that read the whole body first would wait here until the body timeout.
    chunk = b"x" * 4000
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 3
    data, took = _raw(server.port, _head("Transfer-Encoding: chunked\r\n"), parts)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"request_too_large" in data and took < 0.9  # body_timeout is 1 s: not a timeout in disguise
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


def test_declared_oversized_body_is_refused_from_its_headers(server):
    data, _ = _raw(server.port, _head("Content-Length: 999999\r\n"), [])
    assert data.startswith(b"HTTP/1.1 413") and b"999999 bytes" in data


def test_slow_body_gets_408(server):
    data, took = _raw(server.port, _head("Content-Length: 100\r\n"), [b'{"messages": ['])
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_timeout" in data and 0.9 < took < 4


def test_requests_beyond_the_cap_get_429_and_the_slots_come_back(tokenizer):
    srv = _serve(tokenizer, delay=1.0, max_concurrent=2)
    body = {"messages": [{"role": "user", "content": "hi"}]}

    async def burst(n: int, stream: bool = False):
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json={**body, "stream": stream})
                                          for _ in range(n)])

    try:
        for stream in (False, True):  # a stream holds its slot until its last chunk
            codes = sorted(r.status_code for r in asyncio.run(burst(6, stream)))
            assert codes == [200, 200, 429, 429, 429, 429], codes
        busy = asyncio.run(burst(3))
        refused = [r for r in busy if r.status_code == 429][0]
        assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
        assert httpx.get(srv.url + "/health").status_code == 200  # outside /v1/: never capped
    finally:
        srv.close()


def test_oversized_headers_and_idle_connections_are_cut(server):
    data, _ = _raw(server.port, _head("X-Filler: " + "a" * 20_000 + "\r\nContent-Length: 0\r\n"), [])
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")) or data == b"", data[:100]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        start, data = time.monotonic(), b""
        while chunk := s.recv(65536):  # keep_alive_timeout=1: the server closes the idle connection
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'"model":"stub"}')
        assert 0.9 < time.monotonic() - start < 3


def _closed_after(s: socket.socket, drip: bytes = b"") -> float:
    """Send `drip` a byte every 0.2 s until the server closes the connection; the seconds it took."""
    start = time.monotonic()
    for i in range(200):
        try:
            if i < len(drip):
                s.sendall(drip[i:i + 1])
            s.settimeout(0.2)
            if s.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
    return float("inf")


def test_slow_headers_are_cut_at_the_header_deadline(tokenizer):
    from sftlab.serve.openai_api import create_app

    app = create_app(StubBackend(tokenizer, delay=1.5), "stub")
    srv = ThreadServer(app, keep_alive_timeout=30, header_timeout=1.0)
    slow = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as silent, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=5) as dripping:
            assert _closed_after(silent) < 3  # no byte at all
            assert _closed_after(dripping, slow) < 3  # a byte every 0.2 s, never the blank line
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            assert _closed_after(s, slow) < 3  # the next request on a kept-alive connection too
        # headers in time, answer slower than the deadline (delay=1.5): the deadline no longer applies
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    finally:
        srv.close()


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from sftlab.errors import SftlabError
    from sftlab.serve.guard import read_api_key

    f = tmp_path / "key"
    f.write_text("s3cret\n")
    assert read_api_key(None, f) == "s3cret" and read_api_key("argv", None) == "argv"
    f.write_text("\n")
    with pytest.raises(SftlabError, match=r"key:1: the API key file is empty"):
        read_api_key(None, f)
    with pytest.raises(SftlabError, match="cannot read"):
        read_api_key(None, tmp_path / "missing")
    with pytest.raises(SftlabError, match="not both"):
        read_api_key("argv", f)


def test_warning_for_a_reachable_address_without_a_key(capsys, monkeypatch, tokenizer):
    import uvicorn

    from sftlab.serve.openai_api import create_app, run_server

    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: configs.append(self.config))
    app = create_app(StubBackend(tokenizer), "stub")
    for host, key, warned in [("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True),
                              ("example.org", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                              ("localhost", None, False), ("::1", None, False)]:
        run_server(app, host=host, port=1, api_key=key)
        err = capsys.readouterr().err
        assert ("without an API key" in err) == warned, (host, key, err)
    assert {(c.timeout_keep_alive, c.h11_max_incomplete_event_size, c.limit_concurrency, c.http.keywords["header_timeout"])
            for c in configs} == {(5, 16384, 512, 10.0)}


def test_cli_reads_the_key_file_named_in_the_environment(tmp_path, tiny_model_dir):
    from sftlab.serve.triton_server import free_port

    (tmp_path / "key").write_text("from-file\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
           "SFTLAB_API_KEY_FILE": str(tmp_path / "key")}
    env.pop("SFTLAB_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "serve", str(tiny_model_dir), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no start"
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-file"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("url, body, where", [
    ("/v1/chat/completions", b"[" * 50_000, "error parsing the body"),  # nested past Python's recursion limit
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    ("/v1/completions", b'{"prompt": ["fine", "x\\udfff"]}', "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b"\xff\xfe not UTF-8", "not valid JSON"),  # read as UTF-16 (its BOM): garbage
    ("/v1/chat/completions", b'{"messages": ', "the request body is not valid JSON: "),
    ("/v1/chat/completions", b"\xff\xfe not json", "error parsing the body"),  # odd length: not even UTF-16
])
def test_malformed_bodies_get_openai_shaped_400s(tokenizer, url, body, where):
    from sftlab.serve.openai_api import create_app

    async def post():
        transport = httpx.ASGITransport(app=create_app(StubBackend(tokenizer), "stub"), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(url, content=body, headers={"Content-Type": "application/json"})

    r = asyncio.run(post())
    assert r.status_code == 400 and where in r.json()["error"]["message"], r.text[:300]


def test_review_refuses_bad_text_with_400_and_keeps_its_log(tmp_path):
    import json

    from starlette.testclient import TestClient

    from sftlab.data.review.app import create_app
    from sftlab.data.review.session import ReviewSession

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    session = ReviewSession(data)
    with TestClient(create_app(session), raise_server_exceptions=False) as client:
        item = client.get("/api/items").json()["ids"][0]
        for body in (b'{"action": "edit", "message": 1, "content": "x\\ud800", "base": "a"}',
                     b'{"action": "reject", "reason": "\\udfff"}', b"[" * 50_000):
            r = client.post(f"/api/items/{item}/actions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "error" in r.json(), r.text[:300]
        assert client.post(f"/api/items/{item}/actions", json={"action": "accept"}).status_code == 200
    assert [json.loads(line)["action"] for line in session.log.path.read_text().splitlines()] == ["accept"]
