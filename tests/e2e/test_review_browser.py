"""The review page in a real browser (Debian's Chromium driven by Playwright): three examples
reviewed with the keyboard and the mouse, the export holds exactly those decisions, a second
tab sees them, a record holding `<script>` shows as text without running, and the filters,
the search (`/`) and the trained-token view (`t`) work.

Needs the `chromium` apt package (`bash scripts/install_system_packages.sh`); skips without it.
`python tests/e2e/test_review_browser.py` refreshes the screenshot in docs/review.png.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY = "browser-key"
TOKENIZER = str(ROOT / "tests" / "fixtures" / "smollm2-tokenizer")
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
RECORDS = [
    {"instruction": "Convert this date to ISO format: March 5, 2021", "output": "2021-03-05", "task": "dates"},
    {"messages": [{"role": "user", "content": "Show me some <b>HTML</b>"}, {"role": "assistant", "content": HOSTILE}]},
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Classify the sentiment: 'The film was a delight.'"},
                  {"role": "assistant", "content": "positive, I think"}], "task": "sentiment"},
    {"instruction": "Extract the name as JSON: 'Contact Ada Lovelace at ada@example.com'",
     "output": "{\"name\": \"Ada Lovelace\"}"},
    {"instruction": "Convert this date to ISO format: 5 March 2021", "output": "2021-03-05"},
    {"tools": [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
     "messages": [{"role": "user", "content": "Is it warm in Lima?"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
                  {"role": "tool", "content": "24 C"}, {"role": "assistant", "content": "Yes, 24 C."}]},
]


def chromium_path() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.access(p, os.X_OK)), None)


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; it is in the dev extra)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium browser: run `bash scripts/install_system_packages.sh` as root (Debian package 'chromium')")
    return sync_playwright, exe


def _cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SFTLAB_API_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "sftlab.cli", "data", "review", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class ReviewServer:
    """`sftlab data review DATA` as a subprocess on a free port."""

    def __init__(self, data: Path, *extra: str, cwd: Path | None = None):
        from sftlab.serve.triton_server import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = _cli(str(data), "--port", str(port), "--labels", "dates,sentiment,extraction", *extra,
                         cwd=cwd)
        deadline = time.time() + 90
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/api/meta", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the review server did not start"
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=20)


def write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def test_review_three_examples_with_keyboard_and_mouse(tmp_path):
    sync_playwright, exe = _browser()
    data = write_data(tmp_path / "data.jsonl")
    server = ReviewServer(data, "--model", TOKENIZER, "--chat-template", "chatml")  # chatml writes tools
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(server.url + "/#key=" + KEY)
            source = page.locator("#source")
            source.filter(has_text=f"{data}:1").wait_for()
            other = browser.new_page()  # a second tab on the same example
            other.goto(server.url + "/#key=" + KEY)
            other.locator("#source").filter(has_text=f"{data}:1").wait_for()

            # 1: keyboard only: score 4, label "dates", accept (moves on)
            page.keyboard.press("4")
            page.locator("#scores button.on").filter(has_text="4").wait_for()
            page.keyboard.press("l")
            page.keyboard.type("dates")
            page.keyboard.press("Enter")
            page.locator("#labels .chip").filter(has_text="dates").wait_for()
            page.keyboard.press("Escape")
            page.keyboard.press("a")
            source.filter(has_text=f"{data}:2").wait_for()

            # 2: HTML and <script> in the data show as text and do not run; rejected with the mouse
            answer = page.locator(".msg.assistant .content")
            assert answer.text_content() == HOSTILE
            assert page.locator(".msg.user .content").text_content() == "Show me some <b>HTML</b>"
            assert page.locator("#messages script, #messages img, #messages b").count() == 0
            page.click("#reason")
            page.keyboard.type("answer is markup, not help")
            page.click("#reject")
            source.filter(has_text=f"{data}:3").wait_for()

            # 3: edit the answer (keyboard), score 5 and accept with the mouse
            page.keyboard.press("e")
            page.locator(".msg.assistant textarea").fill("positive")
            page.keyboard.press("Control+Enter")
            page.locator(".msg.assistant .edited").wait_for()
            page.locator("#scores button", has_text="5").click()
            page.locator("#scores button.on").filter(has_text="5").wait_for()
            page.locator("#label-options button", has_text="sentiment").click()
            page.locator("#labels .chip").filter(has_text="sentiment").wait_for()
            page.click("#accept")
            source.filter(has_text=f"{data}:4").wait_for()

            progress = page.locator("#progress")
            assert progress.text_content() == "Reviewed 3 / 6 · accepted 2 · rejected 1"
            assert page.evaluate("window.__pwned") is None
            # the other tab learns of the decisions by polling, without a reload
            other.locator("#badge.accepted").wait_for(timeout=10_000)
            other.locator("#progress").filter(has_text="Reviewed 3 / 6").wait_for(timeout=10_000)
            assert other.locator("#labels .chip").all_text_contents() == ["dates×"]
            # back twice (key, then button): the rejected example shows its reason
            page.keyboard.press("k")
            source.filter(has_text=f"{data}:3").wait_for()
            page.click("#prev")
            page.locator("#reason-shown").filter(has_text="Rejected: answer is markup, not help").wait_for()

            # filters (status, flag), the text search (/) and the trained tokens (t)
            position = page.locator("#position")
            page.select_option("#f-status", "accepted")
            position.filter(has_text="Example 1 of 2").wait_for()
            assert source.text_content() == f"{data}:1"
            # two filter changes in a row, the first one's list answered last (held back 500 ms):
            # the page must show the list of the latest filters, not of the last answer
            page.evaluate("""() => { const f = window.fetch; window.__fetch = f;
                window.fetch = (u, o) => String(u).startsWith("/api/items?") && !String(u).includes("flag=")
                    ? new Promise((done) => setTimeout(done, 500)).then(() => f(u, o)) : f(u, o); }""")
            page.select_option("#f-status", "")
            page.select_option("#f-flag", "PII")  # the e-mail address in record 4
            source.filter(has_text=f"{data}:4").wait_for()
            position.filter(has_text="Example 1 of 1").wait_for()
            page.wait_for_timeout(800)  # the held-back list has come back by now
            assert position.text_content() == "Example 1 of 1"
            page.evaluate("() => { window.fetch = window.__fetch; }")
            page.select_option("#f-flag", "")
            page.keyboard.press("Escape")  # leave the select, so keys act on the page again
            page.keyboard.press("/")
            page.keyboard.type("5 march")
            source.filter(has_text=f"{data}:5").wait_for()
            position.filter(has_text="Example 1 of 1").wait_for()
            page.keyboard.press("Escape")
            page.keyboard.press("t")
            page.locator("#tokens .trained").first.wait_for()
            trained = "".join(page.locator("#tokens .trained").all_text_contents())
            assert trained.startswith("2021-03-05") and "March" not in trained
            tokens = int(page.locator("#token-count").text_content().split()[1])
            assert page.locator("#tokens div").first.text_content().startswith(f"{tokens} tokens, ")
            # a turn that calls a tool shows its call
            page.fill("#f-q", "lima")
            source.filter(has_text=f"{data}:6").wait_for()
            assert page.locator(".msg.assistant .calls").all_text_contents() == ['→ get_weather({"city":"Lima"})']
            assert page.evaluate("window.__pwned") is None and other.evaluate("window.__pwned") is None
            assert errors == []
            browser.close()
    finally:
        server.close()

    out = tmp_path / "reviewed.jsonl"
    done = _cli(str(data), "--export", str(out))
    assert done.wait(timeout=60) == 0, done.stdout.read()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["review"]["source"] for r in records] == [f"{data}:1", f"{data}:3"]
    assert [(r["review"]["labels"], r["review"]["score"]) for r in records] == [(["dates"], 4), (["sentiment"], 5)]
    assert records[0]["messages"][-1]["content"] == "2021-03-05" and records[0]["task"] == "dates"
    assert records[1]["messages"][-1]["content"] == "positive" and records[1]["review"]["edited_messages"] == [2]
    log = [json.loads(line) for line in (tmp_path / "data.jsonl.review" / "log.jsonl").read_text().splitlines()]
    assert [x["action"] for x in log] == ["score", "label", "accept", "reject", "edit", "score", "label", "accept"]
    assert log[3]["reason"] == "answer is markup, not help" and log[3]["source"] == f"{data}:2"


def screenshot(out: Path) -> None:
    """A screenshot of the page mid-review for the docs: a flag, the embedded default model's
    real suggestion (`--suggest default`), labels, an edit and the trained tokens."""
    import tempfile

    sync_playwright, exe = _browser()
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp) / "demo.jsonl")
        from sftlab.data.review.session import ReviewSession

        os.chdir(tmp)  # relative paths on the page, as a person would type them
        session = ReviewSession("demo.jsonl")
        session.act(session.ids[0], {"action": "label", "label": "dates"})
        session.act(session.ids[0], {"action": "accept"})
        session.act(session.ids[1], {"action": "reject", "reason": "markup, not an answer"})
        session.act(session.ids[2], {"action": "accept"})
        session.act(session.ids[3], {"action": "edit", "message": 1, "content": '{"name": "Ada Lovelace", "title": null}'})
        server = ReviewServer(Path("demo.jsonl"), "--model", TOKENIZER, "--suggest", "default", cwd=Path(tmp))
        try:
            deadline = time.time() + 900
            while (suggest := httpx.get(server.url + "/api/changes", headers={"Authorization": f"Bearer {KEY}"}
                                        ).json()["suggest"])["state"] in ("off", "running"):
                assert time.time() < deadline, suggest
                time.sleep(1)
            assert suggest["state"] == "done", suggest
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 780})
                page.goto(server.url + "/#key=" + KEY)
                page.locator("#source").filter(has_text="demo.jsonl:4").wait_for()
                page.keyboard.press("t")
                page.locator("#tokens .trained").first.wait_for()
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            server.close()
            os.chdir(ROOT)


if __name__ == "__main__":
    screenshot(ROOT / "docs" / "review.png")
    print("wrote docs/review.png", file=sys.stderr)
