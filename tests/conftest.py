"""Shared fixtures: a real tokenizer (SmolLM2's, shipped in tests/fixtures) and a tiny
random Llama (hidden 64, 2 layers) built from it, so tests are offline and fast."""

from __future__ import annotations

import fcntl
import gc
import os
import re
import tempfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "smollm2-tokenizer"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each of the pytest-xdist workers gets one core's worth of threads (the processes
    # it starts inherit it): two workers at two threads each would oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _all_cores(item) -> bool:
    return item is not None and item.get_closest_marker("all_cores") is not None


def pytest_collection_modifyitems(items):
    """The `all_cores` tests first and in a row (a stable sort keeps each module's order): pytest-xdist's
    worksteal hands each worker a contiguous half, so one worker takes them all and keeps the exclusive lock
    from the first to the last, instead of waiting for the other worker's current test before each."""
    items.sort(key=lambda item: not _all_cores(item))


_kept_lock = None  # the exclusive lock held on from one all_cores test to the next


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a test marked `all_cores` (torchrun's two processes) runs alone: its
    ranks wait for each other at every collective, so a third busy process on two cores made
    a ZeRO-3 test 4x slower. Other tests share the lock: any number of them run together."""
    global _kept_lock
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
    if not run:
        return (yield)
    lock = _kept_lock or open(Path(tempfile.gettempdir()) / f"sftlab-tests-{run}.lock", "a")
    if _kept_lock is None:
        fcntl.flock(lock, fcntl.LOCK_EX if _all_cores(item) else fcntl.LOCK_SH)
    try:
        return (yield)
    finally:
        _kept_lock = lock if _all_cores(item) and _all_cores(nextitem) else None
        if _kept_lock is None:
            lock.close()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """What a test leaves alive (the libraries it imported, module-scoped fixtures) goes to the garbage
    collector's permanent generation once the test's own garbage is collected: transformers' Trainer and TRL
    call gc.collect() at the end of every run, which otherwise walks every object the session has built up
    (0.4 s and more per run; the documented-commands tests ran 15 % faster with this)."""
    gc.collect()
    gc.freeze()


# the tokens chat templates write, special in the models' own tokenizers (added to SmolLM2's by tokenizer_for)
_SPECIAL = re.compile(r"<\|[^<>\s|]+\|?>|<[^<>\s|]+\|>")


def tokenizer_for(base, name: str):
    """SmolLM2's tokenizer with a real chat template: sftlab's `chatml`, or a vendor's own as TRL
    installs them in trl/chat_templates (`qwen2_5.jinja`, `llama3_1.jinja`, ...), with its tokens added."""
    import copy
    from importlib.resources import files

    tok = copy.deepcopy(base)
    path = files("sftlab") / "templates" / "chatml.jinja" if name == "chatml" else files("trl") / "chat_templates" / name
    text = path.read_text(encoding="utf-8")
    tok.add_special_tokens({"additional_special_tokens": sorted(set(_SPECIAL.findall(text)))})
    tok.chat_template = text
    tok.name_or_path = name
    return tok


class ScriptedBackend:
    """A serving backend that replies `reply` (in three streamed pieces) and keeps each request it was given.
    It `supports` what the torch engine does (or those given); asked for logprobs, its reply's tokens get
    made-up ones: token k -0.5 (k + 1), its top alternatives the next token id at -0.1, then the token itself."""

    def __init__(self, tokenizer, reply: str, supports=None, name: str = "scripted"):
        from sftlab.serve.generation import SAMPLING

        self.tokenizer, self.reply, self.requests = tokenizer, reply, []
        self.supports, self.name = frozenset(SAMPLING if supports is None else supports), name

    async def generate(self, *, ids, on_text=None, **kwargs):
        from sftlab.serve.backends import Completion
        from sftlab.serve.generation import Logprob

        self.requests.append({"ids": ids, **kwargs})
        n, entries = kwargs.get("logprobs"), None
        if n is not None:
            tokens = self.tokenizer(self.reply, add_special_tokens=False)["input_ids"]
            entries = [Logprob(t, -0.5 * (k + 1), [(t + 1, -0.1), (t, -0.5 * (k + 1))][:n])
                       for k, t in enumerate(tokens)]
        if on_text and entries is not None:
            step = len(entries) // 3 + 1
            for k in range(0, len(entries), step):
                on_text(self.tokenizer.decode([e.token for e in entries[k:k + step]]), entries[k:k + step])
        elif on_text:
            step = len(self.reply) // 3 + 1
            for k in range(0, len(self.reply), step):
                on_text(self.reply[k:k + step])
        return Completion(self.reply, "stop", len(ids), 30, entries)


def client_for(tokenizer, reply: str, **backend):
    """An `openai` client of the server in front of a `ScriptedBackend` (no model runs; `backend`: its
    `supports` and `name`), and the backend."""
    import openai
    from fastapi.testclient import TestClient

    from sftlab.serve.openai_api import create_app

    backend = ScriptedBackend(tokenizer, reply, **backend)
    http = TestClient(create_app(backend, "tiny"))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0), backend


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def make_tiny_llama(path: Path, tokenizer, seed: int = 0, tied: bool = True) -> Path:
    """Save a random tiny LlamaForCausalLM + tokenizer as a normal HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (read-only: copy to modify)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def train_set_loss(model, path, tokenizer) -> float:
    """Mean loss per trained token over a whole data file: deterministic, unlike batch losses."""
    from sftlab.data.load import load_conversations
    from sftlab.data.pack import collate
    from sftlab.data.render import render_many
    from sftlab.train.loss import selective_loss_sum

    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in render_many(load_conversations(path), tokenizer):
            s, n = selective_loss_sum(model.eval(), collate([[ex]]))
            total, count = total + s.item(), count + n
    return total / count
