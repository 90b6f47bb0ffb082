"""Model-assisted pre-labelling: a model scores (and, given categories, labels) each
example; the result goes to the review log as a suggestion the person confirms or not.

Two sources: a local model (a folder, run, .gguf or the embedded `default`), generating
through `sftlab.evaluation.generate`, or any OpenAI-compatible endpoint (`sftlab serve`
included). Suggestions run in a background thread while the page is in use, and an
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
    if conv.text is not None:
        transcript = conv.text
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
    """Greedy answers from a local model, in batches."""

    def __init__(self, model: str, chat_template: str | None = None):
        from sftlab.models import load_model, load_tokenizer

        self.name = model
        self.tokenizer = load_tokenizer(model, chat_template=chat_template)
        if not self.tokenizer.chat_template:
            raise SftlabError(f"model '{model}' has no chat template: pass --chat-template FILE.jinja")
        self.model = load_model(model)

    def __call__(self, prompts: list[list[dict[str, str]]]) -> list[str]:
        from sftlab.evaluation.generate import generate_batch

        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                              batch_size=BATCH, progress=False)


class EndpointSuggester:
    """Answers from an OpenAI-compatible `/chat/completions` endpoint (base URL ending in /v1)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120):
        import httpx

        self.url = url.rstrip("/") + "/chat/completions"
        self.name = model or url
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def __call__(self, prompts: list[list[dict[str, str]]]) -> list[str]:
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
            out.append(resp.json()["choices"][0]["message"]["content"] or "")
        return out


def run_suggestions(session, suggester: Callable[[list[list[dict[str, str]]]], list[str]], *,
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
            for item_id, reply in zip(batch, suggester(prompts)):
                session.suggest(item_id, {**parse_suggestion(reply, session.labels), "by": name})
            status["done"] += len(batch)
        status["state"] = "done"
    except Exception as e:  # shown on the page; the review itself goes on
        status.update(state="failed", message=str(e).splitlines()[0] if str(e) else type(e).__name__)


def start_suggestions(session, suggester) -> threading.Thread:
    thread = threading.Thread(target=run_suggestions, args=(session, suggester), daemon=True, name="review-suggest")
    thread.start()
    return thread
