"""Augment conversations: rule-based variants and model-based generation with a local model.

Rule-based (no model): `paraphrase` (instruction templates), `system` (a generic system prompt
added or varied; a conversation's own is kept), `noise` (casing / punctuation / typos, user turns only), `prefixes`
(a multi-turn conversation expanded into its shorter prefixes).
Model-based (`model` required): `model_paraphrase` (the model rewrites the instruction),
`self_instruct` (the model writes new examples from a few seed examples).

Every new record carries `meta["augmented_from"]` (the source, or the seed sources) and
`meta["augmentation"]` (the strategy); a source's `id` becomes `ID~STRATEGYk` in its variants,
so ids stay unique. New records then go through `curate` with the originals as reference:
exact duplicates of any source or earlier record and the quality filters (which judge
answers) always apply; near-duplicate removal applies to `self_instruct` (whose records must
be new examples), not to variants, which are close to their source by design. Before that,
a `model_paraphrase` rewrite must pass `rewrite_problem`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from sftlab.data.conversation import Conversation
from sftlab.data.curate import QUALITY_FILTERS, CurateOptions, curate, normalize
from sftlab.errors import SftlabError

INSTRUCTION_TEMPLATES = (
    "Please {lower}",
    "Task: {text}",
    "{text}\n\nAnswer directly.",
    "Here is a request for you.\n{text}",
    "Could you help me with this? {text}",
    "Instruction: {text}",
    "I need an answer to the following.\n\n{text}",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise, accurate assistant.",
    "You are an expert assistant. Answer precisely.",
    "You are a careful assistant that follows instructions exactly.",
)
PARAPHRASE_PROMPT = (
    "Rewrite the following instruction in different words. Keep its meaning, and keep any quoted text, "
    "names, numbers and data exactly as they are. Reply with the rewritten instruction only.\n\n"
    "Instruction:\n{text}"
)
SELF_INSTRUCT_PROMPT = (
    "Here are examples of a task, each an instruction with its answer.\n\n{examples}\n\n"
    "Write one new example of the same task, different from the ones above. "
    "Use exactly this format:\nInstruction: <the new instruction>\nAnswer: <its answer>"
)
_SELF_INSTRUCT_REPLY = re.compile(r"Instruction:\s*(?P<i>.+?)\s*\n\s*Answer:\s*(?P<a>.+)", re.DOTALL)
# A rewrite with fewer words than 0.3x the original's, or more than 3x (an original under 5 words
# counting as 5), is an answer, a summary or a ramble, not the same instruction reworded.
REWRITE_WORDS = (0.3, 3.0, 5)


class AugmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategies: list[str] = Field(default_factory=lambda: ["paraphrase"], description="Strategies to apply, in order.")
    copies: int = Field(1, ge=1, description="Variants per source conversation for each rule-based strategy.")
    seed: int = 0
    typo_rate: float = Field(0.05, ge=0, le=1, description="Share of words given a typo by `noise`.")
    model: str | None = Field(None, description="Local model for model-based strategies (folder, run, id, 'default').")
    chat_template: str | None = None
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding; > 0 samples.")
    top_p: float = Field(0.95, gt=0, le=1)
    self_instruct_count: int = Field(16, ge=1, description="New examples `self_instruct` asks for.")
    seeds_per_prompt: int = Field(3, ge=1, description="Seed examples shown per self_instruct prompt.")
    filter: CurateOptions = Field(default_factory=CurateOptions, description="Dedup/quality rules for new records; "
                                  "near_dedup applies to self_instruct only (variants are near-copies by design).")


@dataclass
class AugmentReport:
    sources: int = 0
    generated: Counter = field(default_factory=Counter)  # strategy -> records made
    unparseable: int = 0
    cut_off: int = 0  # self_instruct replies that stopped at max_new_tokens: their answers are cut short
    rewrites_dropped: Counter = field(default_factory=Counter)  # reason -> model_paraphrase rewrites dropped
    kept: Counter = field(default_factory=Counter)  # strategy -> records kept after filtering
    filtered: dict[str, Any] = field(default_factory=dict)  # strategy -> curate report JSON + near_dedup applied

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "generated": dict(self.generated), "unparseable": self.unparseable,
                "cut_off": self.cut_off,
                "rewrites_dropped": dict(self.rewrites_dropped.most_common()), "kept": dict(self.kept),
                "kept_total": sum(self.kept.values()), "filtered": self.filtered}


def _variant(conv: Conversation, messages: list[dict[str, str]], strategy: str, meta_extra: dict | None = None,
             k: int = 0) -> Conversation:
    meta = {**conv.meta, **(meta_extra or {}), "augmented_from": conv.source, "augmentation": strategy}
    if conv.meta.get("id") is not None:
        meta["id"] = f"{conv.meta['id']}~{strategy}{k}"
    variant = Conversation(messages=messages, source=f"{conv.source}#{strategy}{k}", meta=meta)
    rejected = conv.meta.get("rejected")
    if isinstance(rejected, list):  # a preference pair: its rejected answer follows the same, new prompt
        last = max((i for i, m in enumerate(rejected) if m.get("role") == "assistant"), default=len(rejected))
        meta["rejected"] = [*variant.prompt_messages(), *rejected[last:]]
    return variant


def _first_user(conv: Conversation) -> int | None:
    return next((i for i, m in enumerate(conv.messages) if m["role"] == "user"), None)


def _with_content(messages: list[dict[str, str]], i: int, content: str) -> list[dict[str, str]]:
    return [*messages[:i], {**messages[i], "content": content}, *messages[i + 1:]]


# ------------------------------------------------------------------ rule-based: (conv, opts, rng) -> new conversations

def paraphrase_templates(conv: Conversation, opts: AugmentOptions, rng: random.Random) -> list[Conversation]:
    i = _first_user(conv)
    if i is None:
        return []
    text = conv.messages[i]["content"]
    lower = text[:1].lower() + text[1:]
    templates = rng.sample(INSTRUCTION_TEMPLATES, min(opts.copies, len(INSTRUCTION_TEMPLATES)))
    return [_variant(conv, _with_content(conv.messages, i, t.format(text=text, lower=lower)), "paraphrase", k=k)
            for k, t in enumerate(templates)]


def system_variation(conv: Conversation, opts: AugmentOptions, rng: random.Random) -> list[Conversation]:
    """A generic system prompt added, or a generic one varied. A conversation's own system prompt stays:
    its answers may follow it ('Answer in French.'), and would not follow a replacement."""
    current = next((m["content"] for m in conv.messages if m["role"] == "system"), None)
    if not conv.is_chat or current not in (None, *SYSTEM_PROMPTS):
        return []
    body = [m for m in conv.messages if m["role"] != "system"]
    choices = [p for p in SYSTEM_PROMPTS if p != current]
    return [_variant(conv, [{"role": "system", "content": p}, *body], "system", k=k)
            for k, p in enumerate(rng.sample(choices, min(opts.copies, len(choices))))]


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    j = rng.randrange(1, len(word) - 2)
    return word[:j] + word[j + 1] + word[j] + word[j + 2:]  # swap two inner letters


def _noisy(text: str, opts: AugmentOptions, rng: random.Random) -> str:
    words = text.split(" ")
    n_typos = max(1, round(opts.typo_rate * len(words)))
    for j in rng.sample(range(len(words)), min(n_typos, len(words))):
        words[j] = _typo(words[j], rng)
    out = " ".join(words)
    out = out.rstrip(".?!") if out.rstrip()[-1:] in ".?!" else out + "."  # punctuation always changes
    return out.lower() if rng.random() < 0.5 else out


def user_noise(conv: Conversation, opts: AugmentOptions, rng: random.Random) -> list[Conversation]:
    if not conv.is_chat:
        return []
    out = []
    for k in range(opts.copies):
        messages = [{**m, "content": _noisy(m["content"], opts, rng)} if m["role"] == "user" else m
                    for m in conv.messages]
        out.append(_variant(conv, messages, "noise", k=k))
    return out


def turn_prefixes(conv: Conversation, opts: AugmentOptions, rng: random.Random) -> list[Conversation]:
    ends = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"][:-1]
    return [_variant(conv, conv.messages[: e + 1], "prefixes", k=k) for k, e in enumerate(ends)]


RULES: dict[str, Callable[[Conversation, AugmentOptions, random.Random], list[Conversation]]] = {
    "paraphrase": paraphrase_templates,
    "system": system_variation,
    "noise": user_noise,
    "prefixes": turn_prefixes,
}


# ------------------------------------------------------------------ model-based

class Reply(NamedTuple):
    text: str
    cut_off: bool  # generation stopped at max_new_tokens, not at an end of turn


class LocalGenerator:
    """A local model and its tokenizer, answering chat prompts in batches (left padding,
    greedy or sampled, with a progress bar) through `sftlab.evaluation.generate`."""

    def __init__(self, model: str, chat_template: str | None = None):
        from sftlab.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model, chat_template=chat_template)
        if not self.tokenizer.chat_template:
            raise SftlabError(f"model '{model}' has no chat template: pass --chat-template FILE.jinja")
        self.model = load_model(model)

    def generate(self, prompts: list[list[dict[str, str]]], opts: AugmentOptions) -> list[Reply]:
        import torch

        from sftlab.evaluation.generate import answers, cut_off, generate_ids

        torch.manual_seed(opts.seed)
        ids = generate_ids(self.model, self.tokenizer, prompts, max_new_tokens=opts.max_new_tokens,
                           batch_size=opts.batch_size, do_sample=opts.temperature > 0,
                           temperature=opts.temperature or 1.0, top_p=opts.top_p)
        texts = answers(self.tokenizer, ids, prompts)
        return [Reply(text, cut_off(x, opts.max_new_tokens)) for text, x in zip(texts, ids)]


def rewrite_problem(original: str, rewrite: Reply, rules: CurateOptions) -> str | None:
    """Why a model's rewrite of an instruction is unusable, or None. The quality filters judge answers
    only, so a rewrite that answers, translates, loops on or cuts off the instruction passes them.
    Repetition is the answers' rule (`rules.max_repeated_ngrams`), not held against a rewrite of an
    instruction that repeats itself too (data in it)."""
    if rewrite.cut_off:
        return "cut off at max_new_tokens"
    if not rewrite.text.strip():
        return "empty"
    if normalize(rewrite.text) == normalize(original):
        return "same as the original"
    _, repetitive = QUALITY_FILTERS["repetition"]
    if repetitive(None, rewrite.text, rules) and not repetitive(None, original, rules):
        return "repeats itself"
    low, high, floor = REWRITE_WORDS
    words, before = len(rewrite.text.split()), len(original.split())
    if words < low * before:
        return "much shorter than the original"
    if words > high * max(before, floor):
        return "much longer than the original"
    return None


def model_paraphrase(convs: list[Conversation], gen: LocalGenerator, opts: AugmentOptions, rng: random.Random,
                     report: AugmentReport) -> list[Conversation]:
    targets = [(c, i) for c in convs if (i := _first_user(c)) is not None]
    prompts = [[{"role": "user", "content": PARAPHRASE_PROMPT.format(text=c.messages[i]["content"])}]
               for c, i in targets for _ in range(opts.copies)]
    out = []
    for n, reply in enumerate(gen.generate(prompts, opts)):
        conv, i = targets[n // opts.copies]
        problem = rewrite_problem(conv.messages[i]["content"], reply, opts.filter)
        if problem:
            report.rewrites_dropped[problem] += 1
            continue
        out.append(_variant(conv, _with_content(conv.messages, i, reply.text), "model_paraphrase", k=n % opts.copies))
    return out


def self_instruct(convs: list[Conversation], gen: LocalGenerator, opts: AugmentOptions, rng: random.Random,
                  report: AugmentReport) -> list[Conversation]:
    pool = [c for c in convs if c.is_chat and len(c.prompt_messages()) >= 1 and c.reference()]
    if not pool:
        return []
    picks = [rng.sample(pool, min(opts.seeds_per_prompt, len(pool))) for _ in range(opts.self_instruct_count)]
    prompts = [[{"role": "user", "content": SELF_INSTRUCT_PROMPT.format(examples="\n\n".join(
        f"Instruction: {c.prompt_messages()[-1]['content']}\nAnswer: {c.reference()}" for c in seeds))}]
        for seeds in picks]
    out = []
    for k, (seeds, reply) in enumerate(zip(picks, gen.generate(prompts, opts))):
        if reply.cut_off:
            report.cut_off += 1
            continue
        m = _SELF_INSTRUCT_REPLY.search(reply.text)
        if not m or not m["i"].strip() or not m["a"].strip():
            report.unparseable += 1
            continue
        messages = [{"role": "user", "content": m["i"].strip()}, {"role": "assistant", "content": m["a"].strip()}]
        out.append(Conversation(messages=messages, source=f"self_instruct#{k}",
                                meta={"augmented_from": [s.source for s in seeds], "augmentation": "self_instruct"}))
    return out


MODEL_STRATEGIES: dict[str, Callable[..., list[Conversation]]] = {
    "model_paraphrase": model_paraphrase,
    "self_instruct": self_instruct,
}
# Strategies whose records must be new examples, so near-duplicates of anything are removed.
NEW_EXAMPLES = {"self_instruct"}


def augment(convs: list[Conversation], options: AugmentOptions | None = None, *,
            generator: LocalGenerator | None = None) -> tuple[list[Conversation], AugmentReport]:
    """New conversations (not the originals), filtered against the originals and each other."""
    opts = options or AugmentOptions()
    unknown = [s for s in opts.strategies if s not in RULES and s not in MODEL_STRATEGIES]
    if unknown:
        raise SftlabError(f"unknown augmentation strategy {unknown}; known: {', '.join([*RULES, *MODEL_STRATEGIES])}")
    if any(s in MODEL_STRATEGIES for s in opts.strategies) and generator is None:
        if not opts.model:
            raise SftlabError("model-based strategies need a model: pass --model")
        generator = LocalGenerator(opts.model, opts.chat_template)
    rng = random.Random(opts.seed)
    report = AugmentReport(sources=len(convs))
    kept: list[Conversation] = []
    for strategy in opts.strategies:
        if strategy in RULES:
            new = [v for c in convs if c.is_chat for v in RULES[strategy](c, opts, rng)]  # not raw text, segments
        else:
            new = MODEL_STRATEGIES[strategy](convs, generator, opts, rng, report)
        report.generated[strategy] = len(new)
        rules = opts.filter if strategy in NEW_EXAMPLES else opts.filter.model_copy(update={"near_dedup": False})
        survivors, filtered = curate(new, rules, reference=[*convs, *kept])
        report.kept[strategy] = len(survivors)
        report.filtered[strategy] = {**filtered.to_json(), "near_dedup": rules.near_dedup}
        kept += survivors
    return kept, report
