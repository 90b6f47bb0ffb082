"""Evaluate a model on conversations: generate answers, score them, keep every prediction.

Which metrics, when none are asked for (the same rule for the whole set and for each group):
- always `exact_match`, and `perplexity` of the reference answers;
- `accuracy`, `precision`, `recall`, `macro_f1` when the answers come from a closed label set:
  every record has `meta["label"]` (a class, not a KTO record's true/false), or the references are at most 20 distinct one-line
  strings of at most 4 words that repeat (no more distinct values than half the examples);
- `choice` (log-likelihood multiple choice) when every record has `meta["choices"]`;
- `final_answer` (the last number or expression, by math-verify's equivalence) when every reference
  marks its final answer: GSM8K's `#### 72` or a `\\boxed{}` (MATH, NuminaMath, reasoning traces);
- the metrics that every record of the set names in `meta["metrics"]` (e.g. `["bleu", "rouge"]`
  on a rewriting task: its group gets them, a mixed whole set does not).
Asked-for metrics replace this rule, for the whole set and every group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.data.conversation import Conversation
from sftlab.errors import DataError, SftlabError
from sftlab.evaluation import metrics as M
from sftlab.files import atomic_write, write_json

OVERALL = "overall"
NO_GROUP = "(none)"
MAX_LABELS = 20
MAX_LABEL_WORDS = 4


@dataclass
class EvalResult:
    metrics: dict[str, float]
    by_group: dict[str, dict[str, float]]
    records: list[dict[str, Any]]
    selected: dict[str, list[str]] = field(default_factory=dict)  # "overall" / group -> metric names
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def cut_off(self) -> int:
        """How many answers reached max_new_tokens before a stop token (scored as they were cut)."""
        return sum(bool(r.get("cut_off")) for r in self.records)

    def summary(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "by_group": self.by_group, "n": len(self.records), "cut_off": self.cut_off,
                "selected": self.selected, "settings": self.settings}

    def save(self, out_dir: str | Path) -> Path:
        """Write `metrics.json` and `predictions.jsonl` (one record per example) into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", self.summary())
        atomic_write(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> EvalResult:
        out = Path(out_dir)
        summary = json.loads((out / "metrics.json").read_text())
        with open(out / "predictions.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return cls(summary["metrics"], summary["by_group"], records, summary.get("selected", {}),
                   summary.get("settings", {}))


def is_label_set(references: Sequence[str]) -> bool:
    distinct = set(references)
    return (
        len(references) >= 2
        and len(distinct) <= min(MAX_LABELS, len(references) / 2)
        and all("\n" not in r and len(r.split()) <= MAX_LABEL_WORDS for r in distinct)
    )


def default_metrics(conversations: Sequence[Conversation]) -> list[str]:
    """The metric names the module docstring's rule picks for these conversations."""
    names = ["exact_match", "perplexity"]
    if conversations and (
        all("label" in c.meta and not isinstance(c.meta["label"], bool) for c in conversations)  # KTO's flag is no class
        or is_label_set([c.reference() or "" for c in conversations])
    ):
        names += M.ALIASES["classification"]
    if conversations and all("choices" in c.meta for c in conversations):
        names.append("choice")
    if conversations and all(_marks_final_answer(c.reference() or "") for c in conversations):
        names.append("final_answer")
    asked = [M.expand([a] if isinstance(a, str) else list(a)) for a in (c.meta.get("metrics", []) for c in conversations)]
    if asked:
        names += [n for n in asked[0] if all(n in a for a in asked[1:])]
    return M.expand(names)


def _marks_final_answer(reference: str) -> bool:
    return M.GSM8K_MARKER in reference or "\\boxed{" in reference


def _text_metrics(names: Sequence[str]) -> list[M.Metric]:
    return M.resolve([n for n in names if n not in M.MODEL_METRICS])


def scores_of(records: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Corpus scores of `names` over saved records (mean metrics from their per-example scores)."""
    from sftlab.evaluation.perplexity import LogLikelihood, aggregate

    out: dict[str, float] = {}
    text = _text_metrics(names)
    if text:
        preds = [r["prediction"] for r in records]
        refs = [r.get("references") or [r["reference"]] for r in records]
        for m in text:
            if m.is_mean and all(m.name in r["scores"] for r in records):
                out[m.name] = sum(r["scores"][m.name] for r in records) / len(records) if records else 0.0
            else:
                out.update(m.score(preds, refs))
    if "perplexity" in names:
        ppl, loss, _ = aggregate([LogLikelihood(r["logprob"], r["tokens"]) for r in records])
        out.update(perplexity=ppl, loss=loss)
    if "choice" in names:
        out["choice_accuracy"] = sum(r["choice"]["correct"] for r in records) / len(records) if records else 0.0
    return out


def reference_texts(conversations: Sequence[Conversation], tokenizer) -> list[str]:
    """The expected answers: each last assistant turn's content or, for a turn that calls tools, what the
    model generates for it in the template's own syntax, cut and decoded as predictions are (those
    turns rendered together, as training renders them)."""
    calls = {k: c.messages[: len(c.prompt_messages()) + 1] for k, c in enumerate(conversations)
             if "tool_calls" in c.messages[len(c.prompt_messages())]}
    out = [c.reference() for c in conversations]
    if not calls:
        return out
    from sftlab.data.render import IGNORE, RenderOptions, render_many
    from sftlab.evaluation.generate import cut_at_stop
    from sftlab.serve.generation import decode_reply, stop_token_ids

    turns = [Conversation(messages, conversations[k].source, meta=conversations[k].meta) for k, messages in calls.items()]
    stops = set(stop_token_ids(tokenizer))
    for k, turn in zip(calls, render_many(turns, tokenizer, RenderOptions(train_on="last"))):
        if isinstance(turn, DataError):
            raise turn
        ids = [int(t) for t, label in zip(turn.ids, turn.label_ids) if label != IGNORE]
        out[k] = decode_reply(tokenizer, cut_at_stop(ids, stops)).strip()
    return out


def check_evaluable(c: Conversation) -> None:
    if c.is_segments:
        raise DataError(c.source, "template-free segments have no prompt/answer split to evaluate against "
                                  "(evaluate a chat file: messages, prompt/completion, ...)")
    if c.is_raw_text or c.reference() is None:
        raise DataError(c.source, "no assistant answer to evaluate against")
    if not c.prompt_messages():
        raise DataError(c.source, "no prompt before the assistant answer")


def check_chat_template(tokenizer, name: str | None = None) -> None:
    """Refuse, before any work, a model whose tokenizer has no chat template: no prompt can be written."""
    if not getattr(tokenizer, "chat_template", None):
        from sftlab.data.render import template_name
        from sftlab.models import NAMED_TEMPLATES

        raise SftlabError(f"'{name or template_name(tokenizer)}' has no chat template to write the prompts with: give "
                          f"--chat-template ({', '.join(NAMED_TEMPLATES)} or a .jinja file); in a comparison, the one the "
                          "tuned run was trained with")


def _check_conversations(conversations: Sequence[Conversation]) -> None:
    if not conversations:
        raise SftlabError("no conversations to evaluate")
    for c in conversations:
        check_evaluable(c)


def answerable(conversations: Sequence[Conversation], model, tokenizer, *, max_new_tokens: int,
               reject: Callable[[DataError, Any], None]) -> list[Conversation]:
    """The conversations the model can be asked (skip mode, before generating): each other one
    (no answer to compare with, no prompt, a prompt the chat template cannot render or that
    with `max_new_tokens` overflows the model's context) goes to `reject(error, record)`."""
    from sftlab.evaluation.generate import check_fits, prompt_ids

    kept = []
    for c in conversations:
        try:
            check_evaluable(c)
            check_fits(model, len(prompt_ids(tokenizer, c.prompt_messages(), c.source, c.tools)), c.source,
                       "the prompt", max_new_tokens)
        except DataError as e:
            reject(e, c.to_json())
        else:
            kept.append(c)
    return kept


def evaluate(
    model,
    tokenizer,
    conversations: list[Conversation],
    *,
    metrics: list[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    group_by: str | None = "task",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = True,
) -> EvalResult:
    """Answer every prompt, score the answers, and keep each prediction with its scores."""
    check_chat_template(tokenizer)
    _check_conversations(conversations)
    groups = [str(c.meta[group_by]) if group_by and group_by in c.meta else NO_GROUP for c in conversations]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if set(members) == {NO_GROUP}:
        members = {}
    if metrics:
        M.resolve([n for n in metrics if n not in M.MODEL_METRICS])  # fail on a bad name before any work
        selected = {OVERALL: M.expand(metrics), **{g: M.expand(metrics) for g in members}}
    else:
        selected = {OVERALL: default_metrics(conversations)}
        selected.update({g: default_metrics([conversations[i] for i in idx]) for g, idx in members.items()})
    wanted = M.expand([n for names in selected.values() for n in names])
    if "choice" in selected[OVERALL]:
        missing = next((c for c in conversations if "choices" not in c.meta), None)
        if missing is not None:
            raise DataError(missing.source, "metric 'choice' needs 'choices' on every record")

    records: list[dict[str, Any]] = []
    for c, g, reference in zip(conversations, groups, reference_texts(conversations, tokenizer)):
        rec: dict[str, Any] = {"source": c.source, "prompt": c.prompt_messages(), "reference": reference}
        if c.tools:
            rec["tools"] = c.tools
        if isinstance(c.meta.get("references"), list):  # other acceptable answers; the record's own is one
            rec["references"] = list(dict.fromkeys([reference, *map(str, c.meta["references"])]))
        if g != NO_GROUP:
            rec["group"] = g
        rec["prediction"], rec["scores"] = None, {}
        records.append(rec)

    if _text_metrics(wanted):
        from sftlab.evaluation.generate import answers, cut_off, generate_ids

        prompts, tools = [r["prompt"] for r in records], [r.get("tools") for r in records]
        ids = generate_ids(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
            temperature=temperature, top_p=top_p, progress=progress, sources=[r["source"] for r in records],
            tools=tools,
        )
        per_group = {g: _text_metrics(M.expand(selected[OVERALL] + selected.get(g, []))) for g in set(groups)}
        predictions = answers(tokenizer, ids, prompts, tools)
        for rec, pred, x, g in zip(records, predictions, ids, groups):
            rec["prediction"], rec["cut_off"] = pred, cut_off(x, max_new_tokens)
            refs = rec.get("references") or [rec["reference"]]
            for m in per_group[g]:
                if m.per_example is not None:
                    rec["scores"].update(m.per_example(pred, refs))
    if "perplexity" in wanted:
        from sftlab.evaluation.perplexity import perplexity

        result = perplexity(model, tokenizer, conversations, batch_size=batch_size, progress=progress)
        for rec, ll in zip(records, result.per_example):
            rec["logprob"], rec["tokens"] = ll.logprob, ll.tokens
            rec["scores"]["perplexity"] = math.exp(-ll.logprob / ll.tokens) if ll.tokens else float("nan")
    if "choice" in wanted:
        from sftlab.evaluation.choice import score_choices

        items = [i for i, c in enumerate(conversations) if "choices" in c.meta]
        chosen = score_choices(model, tokenizer, [conversations[i] for i in items], batch_size=batch_size,
                               progress=progress)
        for i, res in zip(items, chosen):
            records[i]["choice"] = {"scores": res.scores, "predicted": res.predicted, "answer": res.answer,
                                    "correct": res.correct}
            records[i]["scores"]["choice_accuracy"] = float(res.correct)

    overall = scores_of(records, selected[OVERALL])
    by_group = {g: scores_of([records[i] for i in idx], selected[g]) for g, idx in members.items()}
    settings = {"metrics": metrics, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "group_by": group_by, "do_sample": do_sample, "temperature": temperature, "top_p": top_p}
    return EvalResult(overall, by_group, records, selected, settings)


def resampler(records: Sequence[dict[str, Any]], names: Sequence[str]):
    """A function of per-example counts (a bootstrap resample: how often each record is drawn)
    that returns the corpus scores of `names` on that resample.

    Built-in metrics use summed per-example statistics (no library call per resample);
    a user metric without statistics is recomputed on the resampled predictions.
    """
    import numpy as np

    terms = []
    text = _text_metrics(names)
    preds = [r["prediction"] for r in records]
    refs = [r.get("references") or [r["reference"]] for r in records]
    for m in text:
        per = [r["scores"][m.name] for r in records] if m.is_mean and all(m.name in r["scores"] for r in records) else None
        stats = m.statistics(preds, refs, per)
        if stats is not None:
            terms.append(lambda c, m=m, stats=stats: m.score_from_stats(c @ stats))
        else:
            def recompute(c, m=m):
                idx = np.repeat(np.arange(len(records)), c)
                return m.score([preds[i] for i in idx], [refs[i] for i in idx])
            terms.append(recompute)
    if "perplexity" in names:
        nll = np.array([[-r["logprob"], r["tokens"]] for r in records], dtype=np.float64)

        def ppl(c):
            total, tokens = c @ nll
            loss = total / tokens if tokens else float("nan")
            return {"perplexity": math.exp(loss) if tokens else float("nan"), "loss": loss}
        terms.append(ppl)
    if "choice" in names:
        correct = np.array([float(r["choice"]["correct"]) for r in records])
        terms.append(lambda c: {"choice_accuracy": float(c @ correct / c.sum()) if c.sum() else 0.0})

    def scores(counts) -> dict[str, float]:
        out: dict[str, float] = {}
        for term in terms:
            out.update(term(counts))
        return out

    return scores
