"""Model-assisted pre-labelling: a model scores (and, given categories, labels) each
example; the result goes to the review log as a suggestion the person confirms or not.

Two sources: a local model (a folder, run, .gguf or the embedded `default`), which picks
the score and label it finds most likely (so even a small model gives one), or any
OpenAI-compatible endpoint (`sftlab serve` included), whose greedy reply is parsed. Suggestions run in a background thread while the page is in use, and an
example that already has one is skipped, so a restarted session carries on.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable

from sftlab.data.conversation import Conversation
from sftlab.errors import SftlabError

MAX_TRANSCRIPT = 4000  # characters of the conversation shown to the model
MAX_NEW_TOKENS = 24
SCORES = ["1", "2", "3", "4", "5"]
BATCH = 8

PROMPT = """You review training examples for a chat assistant. Rate how good the assistant's \
answer is as a training example, from 1 (unusable) to 5 (excellent).{label_rule}
Reply with exactly these lines and nothing else:
score: <1-5>{label_line}

Example:
{transcript}"""

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*([1-5])\b", re.IGNORECASE)
_LABEL = re.compile(r"label\s*[:=]\s*\**\s*([^\n*]+)", re.IGNORECASE)


def suggestion_prompt(conv: Conversation, labels: list[str]) -> list[dict[str, str]]:
    if not conv.is_chat:  # raw text, or segments as written
        transcript = conv.written_text
    else:
        transcript = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in conv.messages)
    if len(transcript) > MAX_TRANSCRIPT:
        transcript = transcript[:MAX_TRANSCRIPT] + " [...]"
    rule = f" Also choose the one label that fits best, from: {', '.join(labels)}." if labels else ""
    line = f"\nlabel: <one of {', '.join(labels)}>" if labels else ""
    return [{"role": "user", "content": PROMPT.format(label_rule=rule, label_line=line, transcript=transcript)}]


def parse_suggestion(reply: str, labels: list[str]) -> dict[str, Any]:
    """Score (1-5) and label (one of `labels`, case-insensitive) found in a reply; None if absent."""
    score = _SCORE.search(reply)
    label = None
    if labels and (m := _LABEL.search(reply)):
        wanted = m.group(1).strip().strip(".\"'`").casefold()
        label = next((name for name in labels if name.casefold() == wanted), None)
    return {"score": int(score.group(1)) if score else None, "label": label, "raw": reply[:300]}


class LocalSuggester:
    """Scores from a local model's next-token probabilities, not from free text: after the
    prompt and the answer's start "score: ", the most likely of the tokens "1".."5" is the
    score, and after "score: N\nlabel: " the most likely of the configured labels is the
    label. So every example gets a score, even from a small model whose free-text replies
    would not follow the format (the embedded default mostly answers the example instead)."""

    def __init__(self, model: str, chat_template: str | None = None):
        from sftlab.models import load_model, load_tokenizer

        self.name = model
        self.tokenizer = load_tokenizer(model, chat_template=chat_template)
        if not self.tokenizer.chat_template:
            raise SftlabError(f"model '{model}' has no chat template: pass --suggest-chat-template FILE.jinja")
        self.model = load_model(model).eval()

    def __call__(self, prompts: list[list[dict[str, str]]], labels: list[str]) -> list[dict[str, Any]]:
        return [self._suggest(messages, labels) for messages in prompts]

    def _suggest(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, Any]:
        start = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "score: "
        k, p = self.choose(start, SCORES)
        out = {"score": int(SCORES[k]), "label": None, "raw": f"score: {SCORES[k]} (p={p:.2f})"}
        if labels:
            j, q = self.choose(f"{start}{SCORES[k]}\nlabel: ", labels)
            out.update(label=labels[j], raw=f"{out['raw']}\nlabel: {labels[j]} (p={q:.2f})")
        return out

    def choose(self, prefix: str, options: list[str]) -> tuple[int, float]:
        """The option the model most likely writes after `prefix` (summed log-probability of its
        tokens), and its probability relative to the other options. The shared prefix runs once;
        each option's few tokens run on a copy of its key/value cache."""
        import copy

        import torch

        from sftlab.evaluation.generate import check_fits

        base = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        seqs = [self.tokenizer(prefix + o, add_special_tokens=False)["input_ids"] for o in options]
        # where each option's own tokens start (a merge across the boundary moves it back)
        starts = [max(1, next((j for j, (a, b) in enumerate(zip(base, s)) if a != b), min(len(base), len(s))))
                  for s in seqs]
        m = min(starts)
        check_fits(self.model, max(map(len, seqs)), "a review suggestion", "the prompt")
        with torch.inference_mode():
            shared = self.model(input_ids=torch.tensor([base[:m]]), use_cache=True)
            totals = []
            for s, st in zip(seqs, starts):
                rows = shared.logits[0, -1:]  # predicts token m
                if len(s) > m + 1:  # the option's tokens after m predict the rest
                    tail = self.model(input_ids=torch.tensor([s[m:-1]]), use_cache=True,
                                      cache=copy.deepcopy(shared.cache))
                    rows = torch.cat([rows, tail.logits[0]])
                logp = rows.float().log_softmax(-1)
                totals.append(sum(logp[j - m, s[j]].item() for j in range(st, len(s))))
        probs = torch.tensor(totals).softmax(-1)
        best = int(probs.argmax())
        return best, float(probs[best])


class EndpointSuggester:
    """Answers from an OpenAI-compatible `/chat/completions` endpoint (base URL ending in /v1)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120):
        import httpx

        self.url = url.rstrip("/") + "/chat/completions"
        self.name = model or url
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def __call__(self, prompts: list[list[dict[str, str]]], labels: list[str]) -> list[dict[str, Any]]:
        """The score and label parsed from each greedy reply (None where the reply has none)."""
        import httpx

        out = []
        for messages in prompts:
            body = {"messages": messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
                    **({"model": self.model} if self.model else {})}
            try:
                resp = self.client.post(self.url, json=body)
            except httpx.HTTPError as e:
                raise SftlabError(f"suggestion endpoint {self.url}: {e}") from None
            if resp.status_code != 200:
                raise SftlabError(f"suggestion endpoint {self.url} answered {resp.status_code}: {resp.text[:200]}")
            out.append(parse_suggestion(resp.json()["choices"][0]["message"]["content"] or "", labels))
        return out


Suggester = Callable[[list[list[dict[str, str]]], list[str]], list[dict[str, Any]]]


def run_suggestions(session, suggester: Suggester, *,
                    batch_size: int = BATCH) -> None:
    """Suggest for every example that has no suggestion yet, `batch_size` at a time.
    Progress and failures go to `session.suggest_status` (shown on the page)."""
    name = getattr(suggester, "name", "model")
    todo = [item_id for item_id in session.ids if session.log.state(item_id).suggestion is None]
    status = session.suggest_status
    status.update(state="running", by=name, done=0, total=len(todo), message="")
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts = [suggestion_prompt(session.current(session.position(i)), session.labels) for i in batch]
            for item_id, suggestion in zip(batch, suggester(prompts, session.labels)):
                session.suggest(item_id, {**suggestion, "by": name})
            status["done"] += len(batch)
        status["state"] = "done"
    except Exception as e:  # shown on the page; the review itself goes on
        status.update(state="failed", message=str(e).splitlines()[0] if str(e) else type(e).__name__)


def start_suggestions(session, suggester) -> threading.Thread:
    thread = threading.Thread(target=run_suggestions, args=(session, suggester), daemon=True, name="review-suggest")
    thread.start()
    return thread
