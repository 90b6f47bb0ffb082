"""Security defaults, each proved: model code runs only when the config says so; pickle weights
load only on an explicit opt-in; chat templates render in a sandbox (no way to Python's
internals); user-given names stay inside their folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab.errors import SftlabError

SRC = str(Path(__file__).resolve().parents[2] / "src")


# ---------------------------------------------------------------- pickle weights


class _Payload:
    """Unpickling this creates the file it names: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only_folder(tiny_model_dir: Path, tmp_path: Path, payload: Path | None = None) -> Path:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if payload is None:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(payload)))
    return folder


def test_pickle_weights_need_the_opt_in(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from sftlab.config import ModelConfig
    from sftlab.models import load_model

    monkeypatch.delenv("SFTLAB_ALLOW_PICKLE", raising=False)
    assert ModelConfig().allow_pickle is False
    marker = tmp_path / "pickle-ran"
    evil = _pickle_only_folder(tiny_model_dir, tmp_path / "evil", payload=marker)
    with pytest.raises(SftlabError, match=r"only pickle weights \(pytorch_model\.bin\).*model\.allow_pickle: true"
                                          r".*SFTLAB_ALLOW_PICKLE=1"):
        load_model(str(evil))
    assert not marker.exists()

    folder = _pickle_only_folder(tiny_model_dir, tmp_path)
    with pytest.raises(SftlabError, match="SFTLAB_ALLOW_PICKLE"):
        load_model(str(folder))
    reference = load_model(str(tiny_model_dir))
    for loaded in (load_model(str(folder), allow_pickle=True),
                   (monkeypatch.setenv("SFTLAB_ALLOW_PICKLE", "1"), load_model(str(folder)))[1]):
        assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))


def test_pickled_adapter_of_a_run_needs_the_opt_in(tiny_model_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from sftlab.models import load_model

    monkeypatch.delenv("SFTLAB_ALLOW_PICKLE", raising=False)
    run = tmp_path / "run"
    peft_model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(run / "adapter", safe_serialization=False)
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    assert (run / "adapter" / "adapter_model.bin").exists()
    with pytest.raises(SftlabError, match=r"adapter holds only pickle weights \(adapter_model\.bin\)"):
        load_model(str(run))
    assert hasattr(load_model(str(run), allow_pickle=True), "peft_config")


# ---------------------------------------------------------------- remote code

EVIL_MODULE = """
import os, pathlib
pathlib.Path(os.environ["SFTLAB_TEST_MARKER"]).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

class EvilConfig(LlamaConfig):
    model_type = "evil"

class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig

class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_remote_code_runs_only_when_the_config_says_so(tiny_model_dir, tmp_path, monkeypatch):
    from sftlab.config import ModelConfig
    from sftlab.estimate import load_model_config
    from sftlab.models import load_model, load_tokenizer

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "evil.py").write_text(EVIL_MODULE)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SFTLAB_TEST_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))

    assert ModelConfig().trust_remote_code is False
    for load in (load_model, load_tokenizer):
        with pytest.raises(SftlabError, match=r"needs its own Python code.*model\.trust_remote_code: true"):
            load(str(folder))
    with pytest.raises(SftlabError, match="could not read the config"):
        load_model_config(folder)  # `sftlab estimate` never trusts remote code
    assert not marker.exists()
    model = load_model(str(folder), trust_remote_code=True)
    assert marker.read_text() == "ran" and type(model).__name__ == "EvilModel"


# ---------------------------------------------------------------- sandboxed templates

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('true') }}",
    "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_templates_render_in_a_sandbox(tiny_model_dir, template):
    from transformers import AutoTokenizer

    from sftlab.data.conversation import Conversation
    from sftlab.data.render import render

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = template + "{% for m in messages %}{{ m.content }}{% endfor %}"
    conv = Conversation(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                        source="t.jsonl:1")
    with pytest.raises(SftlabError, match=r"chat template of '.*' failed: .*(unsafe|not safely callable)"):
        render(conv, tok)


def test_the_server_answers_a_sandbox_violation_with_400(tiny_model_dir):
    import httpx
    from transformers import AutoTokenizer

    from sftlab.serve.openai_api import create_app

    class Backend:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

        async def generate(self, **_):
            from sftlab.serve.backends import Completion

            return Completion("ok", "stop", 1, 1)

    Backend.tokenizer.chat_template = ESCAPES[0]

    async def post():
        transport = httpx.ASGITransport(app=create_app(Backend(), "t"))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})

    import asyncio

    r = asyncio.run(post())
    assert r.status_code == 400 and "unsafe" in r.json()["error"]["message"]


def test_cli_names_the_template_that_breaks_out(tmp_path, tiny_model_dir):
    (tmp_path / "evil.jinja").write_text(ESCAPES[1])
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "sftlab.cli", "data", "inspect", str(tmp_path / "d.jsonl"),
                          "--model", str(tiny_model_dir), "--chat-template", str(tmp_path / "evil.jinja")],
                         env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "unsafe" in out.stderr and "chat template" in out.stderr


# ---------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "a\\b", ""])
def test_user_given_names_stay_inside_their_folder(tmp_path, name):
    from sftlab.files import inside

    with pytest.raises(SftlabError, match="must be a plain file name"):
        inside(tmp_path, name)
    assert inside(tmp_path, "train.jsonl") == tmp_path / "train.jsonl"


def test_split_names_cannot_escape_the_output_folder(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                                              for i in range(10)))
    out = subprocess.run([sys.executable, "-m", "sftlab.cli", "data", "split", str(tmp_path / "d.jsonl"),
                          "--out-dir", str(tmp_path / "out"), "--names", "train,../../escaped", "--ratios", "0.5,0.5"],
                         env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "split name '../../escaped.jsonl' must be a plain file name" in out.stderr
    assert not list(tmp_path.rglob("escaped*"))


def test_triton_model_name_cannot_escape(tmp_path):
    from sftlab.export.triton import export_triton

    with pytest.raises(SftlabError, match="must be letters, digits"):
        export_triton("unused", tmp_path / "repo", name="../../x")
    assert not (tmp_path / "repo").exists()


def test_runs_does_not_follow_links_out_of_its_folder(tmp_path):
    from sftlab.train.runs import find_runs

    for run in (tmp_path / "root" / "mine", tmp_path / "outside"):
        run.mkdir(parents=True)
        (run / "run.json").write_text("{}")
        (run / "config.yaml").write_text("{}")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    assert find_runs(tmp_path / "root") == [tmp_path / "root" / "mine"]


def test_review_ids_are_looked_up_never_opened(tmp_path):
    from starlette.testclient import TestClient

    from sftlab.data.review.app import create_app
    from sftlab.data.review.session import ReviewSession

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    (tmp_path / "secret.txt").write_text("secret")
    with TestClient(create_app(ReviewSession(data))) as client:
        for bad in ("..%2Fsecret.txt", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
            for r in (client.get(f"/api/items/{bad}"), client.get(f"/api/items/{bad}/tokens"),
                      client.post(f"/api/items/{bad}/actions", json={"action": "accept"})):
                assert r.status_code == 404 and "secret" not in r.text, (bad, r.status_code, r.text)
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"d.jsonl", "secret.txt", "d.jsonl.review"}, written
