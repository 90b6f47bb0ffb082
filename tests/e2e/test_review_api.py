"""`sftlab data review` over HTTP: decisions round-trip, survive a killed server, merge across
tabs and servers, export through the CLI; the API key, limits and origin checks hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request  # module level: the stub endpoint's annotations must resolve

from sftlab.data.load import load_conversations

KEY = "review-key"
RECORDS = [{"instruction": f"Question number {i}: what is {i} + {i}?", "output": f"{2 * i}"} for i in range(12)]


def write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


class Server:
    """A review app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, data: Path, session_options: dict | None = None, **kwargs):
        import uvicorn

        from sftlab.data.review.app import LOOPBACK_HOSTS, create_app
        from sftlab.data.review.session import ReviewSession
        from sftlab.serve.triton_server import free_port

        self.session = ReviewSession(data, labels=["math"], **(session_options or {}))
        self.port = free_port()
        app = create_app(self.session, api_key=KEY, max_body_bytes=20_000, allowed_hosts=LOOPBACK_HOSTS, **kwargs)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def act(self, item_id: str, **action) -> httpx.Response:
        return self.client.post(f"/api/items/{item_id}/actions", json=action)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_data(tmp_path / "data.jsonl")


@pytest.fixture
def server(data):
    srv = Server(data)
    yield srv
    srv.close()


def test_accept_reject_edit_label_score_round_trip(server, data):
    ids = server.client.get("/api/items").json()["ids"]
    assert len(ids) == len(RECORDS)
    a, b = ids[0], ids[1]
    assert server.act(a, action="accept").json()["progress"] == {
        "total": 12, "reviewed": 1, "pending": 11, "accepted": 1, "rejected": 0, "seq": 1}
    assert server.act(b, action="reject", reason="wrong sum").json()["item"]["reason"] == "wrong sum"
    item = server.act(a, action="edit", message=1, content="0, since 0 + 0 = 0", base="0").json()["item"]
    assert item["messages"][1] == {"role": "assistant", "content": "0, since 0 + 0 = 0", "original": "0"}
    server.act(a, action="label", label="math")
    server.act(a, action="label", label="easy")
    server.act(a, action="unlabel", label="easy")
    assert server.act(a, action="score", score=5).json()["item"]["score"] == 5
    got = server.client.get(f"/api/items/{a}").json()
    assert (got["status"], got["labels"], got["score"], got["source"]) == ("accepted", ["math"], 5, f"{data}:1")
    assert server.client.get("/api/items", params={"status": "rejected"}).json()["ids"] == [b]
    assert server.client.get("/api/items", params={"label": "math"}).json()["ids"] == [a]
    assert server.client.get("/api/items", params={"q": "since 0 + 0"}).json()["ids"] == [a]
    assert server.client.get("/api/meta").json()["labels"] == ["math"]
    # everything is in the log beside the data, one line per action
    lines = [json.loads(x) for x in (data.with_name("data.jsonl.review") / "log.jsonl").read_text().splitlines()]
    assert [x["action"] for x in lines] == ["accept", "reject", "edit", "label", "label", "unlabel", "score"]
    assert {x["id"] for x in lines} == {a, b} and all(x["time"] for x in lines)
    # the download holds exactly the accepted record, edited, with its review
    exported = [json.loads(x) for x in server.client.get("/api/export.jsonl").text.splitlines()]
    assert len(exported) == 1 and exported[0]["messages"][1]["content"] == "0, since 0 + 0 = 0"
    assert exported[0]["review"]["labels"] == ["math"] and exported[0]["review"]["source"] == f"{data}:1"


def test_trained_tokens_and_the_flag_filter(tmp_path, data, tokenizer, server):
    """GET /api/items/{id}/tokens gives `sftlab data inspect`'s view; ?flag= filters by flag."""
    pii = {"instruction": "Who do I write to?", "output": "Write to jane.roe@example.org"}
    flagged = write_data(tmp_path / "flagged.jsonl")
    with flagged.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(pii) + "\n")
    srv = Server(flagged, session_options={"tokenizer": tokenizer, "max_seq_length": 40})
    try:
        ids = srv.client.get("/api/items").json()["ids"]
        assert srv.client.get("/api/items", params={"flag": "PII"}).json()["ids"] == [ids[-1]]
        assert srv.client.get("/api/items", params={"flag": "no such flag"}).json()["ids"] == []
        assert srv.client.get("/api/meta").json()["flags"]["PII"] == 1
        view = srv.client.get(f"/api/items/{ids[3]}/tokens").json()
        assert view["tokens"] == srv.client.get(f"/api/items/{ids[3]}").json()["tokens"]
        assert "Question number 3: what is 3 + 3?" in "".join(text for text, _ in view["pieces"])
        assert "".join(text for text, trained in view["pieces"] if trained).startswith("6")
        assert view["trained"] == sum(trained for _, trained in view["pieces"]) > 0
        srv.act(ids[3], action="edit", message=1, content="six, since 3 + 3 = 6", base="6")  # the view follows edits
        edited = srv.client.get(f"/api/items/{ids[3]}/tokens").json()
        assert "".join(text for text, trained in edited["pieces"] if trained).startswith("six, since")
        assert edited["tokens"] > view["tokens"]
        assert srv.client.get("/api/items/nope/tokens").status_code == 404
    finally:
        srv.close()
    bare = server.client.get(f"/api/items/{ids[0]}/tokens")  # started without --model
    assert bare.status_code == 400 and "--model" in bare.json()["error"]["message"]


def test_edit_conflict_between_tabs_keeps_both_texts(server):
    item = server.client.get("/api/items").json()["ids"][3]
    assert server.act(item, action="edit", message=1, content="six", base="6").status_code == 200
    stale = server.act(item, action="edit", message=1, content="6 (six)", base="6")  # the other tab saw "6"
    assert stale.status_code == 409 and stale.json()["error"]["param"] == "six"
    again = server.act(item, action="edit", message=1, content="6 (six)", base="six")
    assert again.status_code == 200 and again.json()["item"]["messages"][1]["content"] == "6 (six)"


def test_concurrent_decisions_from_two_servers_and_many_requests(data, server):
    other = Server(data)  # a second server on the same file: two tabs pointed at different servers
    try:
        ids = server.client.get("/api/items").json()["ids"]

        def decide(k: int) -> None:
            srv = (server, other)[k % 2]
            assert srv.act(ids[k], action="accept" if k % 3 else "reject", reason="r").status_code == 200
            assert srv.act(ids[0], action="label", label=f"tab{k}").status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(decide, range(len(ids))))
        for srv in (server, other):
            progress = srv.client.get("/api/items").json()["progress"]
            assert (progress["accepted"], progress["rejected"], progress["pending"]) == (8, 4, 0)
            assert sorted(srv.client.get(f"/api/items/{ids[0]}").json()["labels"]) == sorted(f"tab{k}" for k in range(12))
        since = other.client.get("/api/changes", params={"since": 0}).json()
        assert set(since["changed"]) == set(ids) and since["progress"]["seq"] == 24
    finally:
        other.close()


def test_guard_key_size_type_origin_host_and_headers(server):
    item = server.client.get("/api/items").json()["ids"][0]
    bare = httpx.Client(base_url=server.url, timeout=10)
    assert bare.get("/api/items").status_code == 401
    assert bare.get("/api/items", headers={"Authorization": "Bearer wrong"}).status_code == 401
    page = bare.get("/")  # the page holds no data: it loads without the key, then asks for it
    assert page.status_code == 200 and "sftlab review" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    huge = server.act(item, action="edit", message=1, content="x" * 30_000, base="0")
    assert huge.status_code == 413
    form = server.client.post(f"/api/items/{item}/actions", content="action=accept",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    cross = server.client.post(f"/api/items/{item}/actions", json={"action": "accept"},
                               headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    rebound = server.client.get("/api/items", headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 400
    assert server.act(item, action="score", score=9).status_code == 400
    assert server.act("nope", action="accept").status_code == 404
    assert server.client.get("/api/items").json()["progress"]["reviewed"] == 0
    bare.close()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "SFTLAB_API_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "sftlab.cli", "data", "review", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_up(proc: subprocess.Popen, url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if client.get("/api/meta").status_code == 200:
                return client
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the review server did not start")


def test_resume_after_a_killed_server_and_export(tmp_path, data):
    from sftlab.serve.triton_server import free_port

    port = free_port()
    proc = _cli(str(data), "--port", str(port))
    try:
        client = _wait_up(proc, f"http://127.0.0.1:{port}")
        ids = client.get("/api/items").json()["ids"]
        client.post(f"/api/items/{ids[0]}/actions", json={"action": "accept"}).raise_for_status()
        client.post(f"/api/items/{ids[0]}/actions", json={"action": "label", "label": "math"}).raise_for_status()
        client.post(f"/api/items/{ids[1]}/actions", json={"action": "reject", "reason": "bad"}).raise_for_status()
        client.post(f"/api/items/{ids[2]}/actions",
                    json={"action": "edit", "message": 1, "content": "four", "base": "4"}).raise_for_status()
        client.post(f"/api/items/{ids[2]}/actions", json={"action": "accept"}).raise_for_status()
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown handler runs
        proc.wait(timeout=10)
    proc = _cli(str(data), "--port", str(port))
    try:
        client = _wait_up(proc, f"http://127.0.0.1:{port}")
        assert client.get("/api/items", params={"status": "pending"}).json()["ids"][0] == ids[3]
        assert client.get(f"/api/items/{ids[0]}").json()["labels"] == ["math"]
        assert client.get(f"/api/items/{ids[1]}").json()["reason"] == "bad"
        client.post(f"/api/items/{ids[3]}/actions", json={"action": "accept"}).raise_for_status()
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=20)[0]
    assert "review page: http://127.0.0.1:" in out
    out_file = tmp_path / "reviewed.jsonl"
    done = _cli(str(data), "--export", str(out_file))
    assert done.wait(timeout=60) == 0, done.stdout.read()
    assert "wrote 3 accepted records" in done.stdout.read()
    back = load_conversations(out_file)
    assert [c.meta["review"]["source"] for c in back] == [f"{data}:1", f"{data}:3", f"{data}:4"]
    assert [c.messages[-1]["content"] for c in back] == ["0", "four", "6"]
    assert back[0].meta["review"]["labels"] == ["math"] and back[1].meta["review"]["edited_messages"] == [1]
    stats = json.loads((tmp_path / "reviewed.review.json").read_text())
    assert (stats["accepted"], stats["rejected"], stats["pending"]) == (3, 1, 8)
    # the server wrote nothing but its log, inside the review folder
    assert sorted(p.name for p in data.parent.iterdir()) == ["data.jsonl", "data.jsonl.review", "reviewed.jsonl",
                                                              "reviewed.review.json"]
    assert [p.name for p in data.with_name("data.jsonl.review").iterdir()] == ["log.jsonl"]
    assert data.read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS)


def _stub_endpoint(seen: list) -> tuple[str, object]:
    """A stand-in OpenAI-compatible endpoint in a thread: it scores "Question number N" as
    1 + N % 5 and labels it "Math". Returns its base URL (ending in /v1) and its server."""
    import uvicorn

    from sftlab.serve.triton_server import free_port

    stub = FastAPI()

    @stub.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append((request.headers.get("authorization"), body))
        n = int(body["messages"][0]["content"].split("Question number ")[1].split(":")[0])
        return {"choices": [{"message": {"role": "assistant", "content": f"score: {1 + n % 5}\nlabel: Math"}}]}

    port = free_port()
    endpoint = uvicorn.Server(uvicorn.Config(stub, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=endpoint.run, daemon=True).start()
    while not endpoint.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}/v1", endpoint


def _suggestions_done(client: httpx.Client, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while client.get("/api/changes").json()["suggest"]["state"] in ("off", "running") and time.time() < deadline:
        time.sleep(0.1)
    return client.get("/api/changes").json()["suggest"]


def _assert_stub_suggestions(client: httpx.Client) -> None:
    for n, item_id in enumerate(client.get("/api/items").json()["ids"]):
        got = client.get(f"/api/items/{item_id}").json()
        assert got["suggestion"]["score"] == 1 + n % 5 and got["suggestion"]["label"] == "math"
        assert got["status"] == "pending" and got["score"] is None


def test_suggestions_from_an_openai_compatible_endpoint(data):
    """A stand-in endpoint answers in the OpenAI shape; suggestions reach the page, not the decisions."""
    from sftlab.data.review.suggest import EndpointSuggester, start_suggestions

    seen = []
    url, endpoint = _stub_endpoint(seen)
    srv = Server(data)
    try:
        start_suggestions(srv.session, EndpointSuggester(url, "tiny", api_key="s3"))
        assert _suggestions_done(srv.client) == {"state": "done", "by": "tiny", "done": 12, "total": 12, "message": ""}
        _assert_stub_suggestions(srv.client)
        assert seen[0][0] == "Bearer s3" and seen[0][1]["model"] == "tiny" and seen[0][1]["temperature"] == 0
    finally:
        srv.close()
        endpoint.should_exit = True


def test_the_command_pre_scores_every_example_from_a_suggest_url(data):
    """`sftlab data review FILE --suggest-url URL` as a user starts it: suggestions complete."""
    from sftlab.serve.triton_server import free_port

    seen = []
    url, endpoint = _stub_endpoint(seen)
    port = free_port()
    proc = _cli(str(data), "--port", str(port), "--labels", "math", "--suggest-url", url, "--suggest-model", "stub",
                "--suggest-api-key", "s3")
    try:
        client = _wait_up(proc, f"http://127.0.0.1:{port}")
        assert _suggestions_done(client) == {"state": "done", "by": "stub", "done": 12, "total": 12, "message": ""}
        _assert_stub_suggestions(client)
        assert {auth for auth, _ in seen} == {"Bearer s3"} and len(seen) == 12
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
        endpoint.should_exit = True


def test_chat_template_is_the_tokenizer_s_and_suggest_chat_template_the_suggest_model_s(tmp_path, data, monkeypatch):
    """--chat-template belongs to --model; the --suggest model gets only --suggest-chat-template."""
    from sftlab import cli

    asked = []

    class Recorder:
        def __init__(self, model, chat_template=None):
            asked.append((model, chat_template))
            self.name = model

        def __call__(self, prompts, labels):
            return [{"score": 1, "label": None, "raw": ""} for _ in prompts]

    monkeypatch.setattr("sftlab.data.review.suggest.LocalSuggester", Recorder)
    monkeypatch.setattr("sftlab.serve.openai_api.run_server", lambda *a, **kw: None)
    template = Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "llama3.jinja"
    base = ["data", "review", str(data), "--model", str(Path(__file__).resolve().parents[1] / "fixtures" /
                                                         "smollm2-tokenizer"), "--chat-template", str(template),
            "--suggest", "some-model"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--suggest-chat-template", "own.jinja"]) == 0
    assert asked == [("some-model", None), ("some-model", "own.jinja")]


def _likelihood(suggester, prefix: str, option: str) -> float:
    """Log-probability of `option`'s tokens after `prefix`, from one plain forward pass over both."""
    import torch

    tok = suggester.tokenizer
    base, full = (tok(t, add_special_tokens=False)["input_ids"] for t in (prefix, prefix + option))
    start = next(j for j, (a, b) in enumerate(zip(base + [-1], full)) if a != b)
    with torch.no_grad():
        logp = suggester.model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
    return sum(logp[j - 1, full[j]].item() for j in range(start, len(full)))


def test_a_local_model_scores_and_labels_every_example_from_its_next_token_probabilities(tmp_path, tiny_model_dir):
    """Even a random tiny model, whose free text never follows the reply format, gives every
    example a score 1-5 (its most likely digit after "score: ") and one of the labels; and our own
    `sftlab serve` works as the suggestion endpoint (its greedy reply is what gets parsed)."""
    import torch
    import uvicorn

    from sftlab.data.review.session import ReviewSession
    from sftlab.data.review.suggest import EndpointSuggester, LocalSuggester, run_suggestions, suggestion_prompt
    from sftlab.evaluation.generate import generate_batch
    from sftlab.serve.backends import load_backend
    from sftlab.serve.openai_api import create_app
    from sftlab.serve.triton_server import free_port

    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]), encoding="utf-8")
    labels = ["math", "geography", "small talk"]
    local = ReviewSession(data, labels=labels)
    suggester = LocalSuggester(str(tiny_model_dir))
    run_suggestions(local, suggester, batch_size=2)
    assert local.suggest_status["state"] == "done"
    got = [local.log.state(i).suggestion for i in local.ids]
    assert all(g["score"] in range(1, 6) and g["label"] in labels and g["by"] == str(tiny_model_dir) for g in got)
    tok = suggester.tokenizer
    digits = [tok.convert_tokens_to_ids(d) for d in "12345"]
    for conv, g in zip(local.convs, got):  # the score is the most likely digit right after "score: "
        text = tok.apply_chat_template(suggestion_prompt(conv, labels), add_generation_prompt=True, tokenize=False)
        ids = tok(text + "score: ", add_special_tokens=False)["input_ids"]
        assert tok(text + "score: 3", add_special_tokens=False)["input_ids"] == ids + [digits[2]]
        with torch.no_grad():
            logits = suggester.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert g["score"] == int(logits[digits].argmax()) + 1
        chances = torch.tensor([_likelihood(suggester, f"{text}score: {g['score']}\nlabel: ", x) for x in labels]).softmax(-1)
        assert g["label"] == labels[int(chances.argmax())]  # the most likely label, all its tokens counted
        assert abs(float(g["raw"].split("(p=")[-1].rstrip(")")) - float(chances.max())) < 0.006
    expected = generate_batch(suggester.model, suggester.tokenizer,
                              [suggestion_prompt(c, labels) for c in local.convs], max_new_tokens=24, progress=False)

    backend = load_backend(str(tiny_model_dir), "torch", max_batch_size=4, max_wait_ms=5)
    port = free_port()
    served = uvicorn.Server(uvicorn.Config(create_app(backend, "tiny", api_key="k"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=served.run, daemon=True).start()
    while not served.started:
        time.sleep(0.02)
    try:
        remote = ReviewSession(data, review_dir=tmp_path / "remote.review", labels=labels)
        run_suggestions(remote, EndpointSuggester(f"http://127.0.0.1:{port}/v1", "tiny", api_key="k"))
        assert remote.suggest_status["state"] == "done", remote.suggest_status
        assert [remote.log.state(i).suggestion["raw"].strip() for i in remote.ids] == [e[:300] for e in expected]
    finally:
        served.should_exit = True
        backend.close()


@pytest.mark.slow
def test_the_embedded_default_model_gives_every_example_a_score_and_a_label(tmp_path):
    """The embedded SmolLM2-135M (`--suggest default`): a usable suggestion for every example."""
    from sftlab.data.review.session import ReviewSession
    from sftlab.data.review.suggest import LocalSuggester, run_suggestions

    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]), encoding="utf-8")
    session = ReviewSession(data, labels=["math", "geography"])
    run_suggestions(session, LocalSuggester("default"))
    assert session.suggest_status["state"] == "done", session.suggest_status
    for item_id in session.ids:
        got = session.log.state(item_id).suggestion
        assert got["score"] in range(1, 6) and got["label"] in ("math", "geography") and got["by"] == "default", got
