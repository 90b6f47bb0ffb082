"""sftlab's trained tokens against the official assistant-tokens mask of TRL's training templates.

Beside many vendors' chat templates X.jinja, TRL ships X_training.jinja with `{% generation %}` tags, from which
transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` gives "the assistant tokens". For every
such pair the same plain conversations (one turn, several, a system prompt, reasoning and a tool call where the
template writes them) are rendered by sftlab with X installed and by X_training, both on SmolLM2's tokenizer with
the templates' tokens added, and the trained characters of the two renderings (the same text) are compared exactly.

What is right for SFT: each assistant turn is trained as the model generates it after the generation prompt, through
the end-of-turn token(s) it emits; never a user, system or tool token, nor what the generation prompt already writes,
nor the newline a template writes after the end-of-turn token (generation stops on the token). Where TRL's mask rightly
differs from that, the difference is a named convention of that template (`Convention`, in SPECS), and each one is
checked to occur: a mask that changes fails, and so does a convention that no longer applies.
"""

from __future__ import annotations

import bisect
import copy
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Literal

import pytest

from sftlab.data.formats import to_conversation
from sftlab.data.render import IGNORE, RenderOptions, render, render_many
from sftlab.errors import SftlabError
from conftest import _SPECIAL, tokenizer_for

# sftlab's warnings on the templates that are not prefix-stable (DeepSeek, Nemotron 3, Qwen 3.5's no-think prompt
# after an answer with reasoning) and on those whose prompt's last "\n" joins the answer's first (Qwen 3.5+'s open
# "<think>\n" + "\n</think>"): documented, expected here
pytestmark = [pytest.mark.filterwarnings("ignore:the chat template of .* is not prefix-stable:UserWarning"),
              pytest.mark.filterwarnings("ignore:the chat template of .* ends its generation prompt:UserWarning")]

TEMPLATES = files("trl") / "chat_templates"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATIONS = {
    "single": {"messages": [{"role": "user", "content": "What is the capital of France?"},
                            {"role": "assistant", "content": "The capital of France is Paris."}]},
    "multi": {"messages": [{"role": "user", "content": "Hi there."},
                           {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "Name a color."},
                           {"role": "assistant", "content": "Blue."}]},
    "system": {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                            {"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye!"}]},
    "reasoning": {"messages": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two make four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six.", "reasoning_content": "Three and three make six."}]},
    "tool": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Is it warm in Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "24 C, sunny"},
        {"role": "assistant", "content": "Yes, it is 24 C and sunny."}]},
}
BASIC = ("single", "multi", "system")
REASONING = [m.get("reasoning_content") for m in CONVERSATIONS["reasoning"]["messages"]]


@dataclass(frozen=True)
class Convention:
    """One documented way TRL's mask differs from sftlab's labels: `side` trains `text` at the `at` edge of a trained
    run (of TRL's) and the other side does not; `before` / `after` are the text just before / after `text`, to pin
    where. `in_prompt`: `text` is written by the generation prompt (checked), so the model is never asked for it."""

    name: str
    side: Literal["trl", "sftlab"]
    at: Literal["start", "end"]
    text: str
    before: str = ""
    after: str = ""
    in_prompt: bool = False
    splits_token: bool = False  # the moved edge falls inside one of TRL's tokens, which sftlab splits there

    def apply(self, full: str, run: tuple[int, int]) -> tuple[int, int] | None:
        """TRL's run moved to where sftlab's is, or None where the convention does not apply to it."""
        s, e = run
        n = len(self.text)
        edge = (s if self.side == "trl" else s - n) if self.at == "start" else (e - n if self.side == "trl" else e)
        if edge < 0 or not (full[:edge].endswith(self.before) and full.startswith(self.text + self.after, edge)):
            return None
        if self.side == "trl" and e - s <= n:
            return None
        sign = 1 if self.side == "trl" else -1
        return (s + sign * n, e) if self.at == "start" else (s, e - sign * n)


# TRL trains the newline a template writes after the end-of-turn token: generation stops on the token, so the
# model never writes it (it is the next turn's context).
EOT_NEWLINE = Convention("eot-newline", "trl", "end", "\n")


def prompt_tail(text: str, after: str = "", name: str = "") -> Convention:
    """TRL trains `text`, which the generation prompt already writes (the model is never asked to write it)."""
    return Convention(name or f"prompt-tail {text!r}", "trl", "start", text, after=after, in_prompt=True)


# Nemotron 3's generation prompt opens "<think>\n"; an answer without reasoning is written "<think></think>" + answer,
# so the prompt is not a prefix of the conversation (sftlab warns) and sftlab trains the answer from its content
# (`render._plan`): TRL trains the empty think block the template writes in its place.
EMPTY_THINK = Convention("unstable-empty-think", "trl", "start", "<think></think>")
EMPTY_THINK_NL = Convention("unstable-empty-think-newline", "trl", "start", "<think></think>\n")
# a tool-call turn is trained from where the generation prompt and the conversation part (`render._call_span`):
# after the "<think>" both write
CALL_AFTER_OPEN_THINK = prompt_tail("<think>", after="</think>\n<tool_call>", name="call-after-the-prompt-s-<think>")


@dataclass(frozen=True)
class Spec:
    kinds: tuple[str, ...]  # the conversations the template renders (the others sftlab must refuse)
    conventions: tuple[Convention, ...] = ()  # in order: the first that applies at each edge of a run is applied
    # kinds whose earlier turns the template writes otherwise than TRL's prefix-preserving training template (it drops
    # their reasoning / empty think block): each assistant turn is compared as the conversation's last
    rewrites_history: tuple[str, ...] = ()
    # the text TRL's training template writes after the last answer where the template writes no end of turn, so
    # sftlab appends the tokenizer's EOS (both trained)
    trl_final_end: str | None = None
    per_kind: dict[str, tuple[Convention, ...]] = field(default_factory=dict)  # tried before `conventions`


ALL = BASIC + ("reasoning", "tool")
QWEN3_THINK_PROMPT = prompt_tail("<think>\n")  # Qwen 3.5+'s thinking prompt opens the think block
# an answer without reasoning follows that prompt with "\n</think>": the prompt's last "\n" and the answer's first
# are one token in the whole text, which TRL trains; sftlab tokenizes the answer apart from the prompt, as inference
# sends the prompt (`render._prompt_as_sent`), and trains from the answer's own "\n"
QWEN3_JOINED_NEWLINE = Convention("prompt-tail '<think>\\n' joined with the answer's '\\n'", "trl", "start", "<think>\n",
                                  after="\n</think>", in_prompt=True, splits_token=True)
# template -> what it renders and how TRL's mask differs from what is right (no conventions: identical masks)
SPECS: dict[str, Spec] = {
    "cohere": Spec(BASIC),
    # the answer ends with <|END_RESPONSE|><|END_OF_TURN_TOKEN|>, both trained (sftlab trained only the first: fixed)
    "cohere2": Spec(BASIC),
    # the generation prompt writes <｜Assistant｜> (then "<think>\n", which the answer lacks: not prefix-stable)
    "deepseek_r1_distill": Spec(BASIC, (prompt_tail("<｜Assistant｜>"),)),
    "deepseekv3": Spec(BASIC, (prompt_tail("<｜Assistant｜>"),)),  # it writes no tools list
    "diffusion_gemma": Spec(ALL, (EOT_NEWLINE,), per_kind={"tool": (
        # a call turn ends with <|tool_response>, the token the model stops a call on (as in Gemma 4); TRL leaves it
        # to the tool's response
        Convention("call-ends-on-tool-response-token", "sftlab", "end", "<|tool_response>"),
        # after a tool response the generation prompt writes nothing (the model turn stays open) but the template
        # writes the answer in a new "<|turn>model\n": the model writes it after that prompt, so sftlab trains it
        Convention("answer-reopens-model-turn", "sftlab", "start", "<|turn>model\n", before="<tool_response|>"),
    )}),
    "gemma": Spec(("single", "multi"), (EOT_NEWLINE,)),  # no system role
    "gemma3": Spec(BASIC, (EOT_NEWLINE,)),
    # no end of turn after the last answer: sftlab appends the EOS, TRL's template writes <|user|> (both stop GLM)
    "glm4moe": Spec(ALL, trl_final_end="<|user|>"),
    "gptoss": Spec(ALL, (prompt_tail("<|start|>assistant"),)),
    "lfm2": Spec(BASIC, (EOT_NEWLINE,)),
    "lfm2_v2": Spec(BASIC + ("tool",), (EOT_NEWLINE,)),
    "llama3": Spec(BASIC),
    "muse_glimmer": Spec(ALL, (prompt_tail("<|start|>assistant"),)),
    "nemotron_3_5_lightning": Spec(ALL, (CALL_AFTER_OPEN_THINK, EMPTY_THINK, EOT_NEWLINE),
                                   per_kind={"reasoning": (prompt_tail("<think>\n"),)}),
    "nemotron_3_nano": Spec(ALL, (CALL_AFTER_OPEN_THINK, EMPTY_THINK, EOT_NEWLINE),
                            per_kind={"reasoning": (EMPTY_THINK_NL, prompt_tail("<think>\n"))}),
    "nemotron_3_super": Spec(ALL, (CALL_AFTER_OPEN_THINK, EMPTY_THINK, EOT_NEWLINE),
                             per_kind={"reasoning": (EMPTY_THINK_NL, prompt_tail("<think>\n"))}),
    "nemotron_3_ultra": Spec(ALL, (CALL_AFTER_OPEN_THINK, EMPTY_THINK, EOT_NEWLINE),
                             per_kind={"reasoning": (prompt_tail("<think>\n"),)}),
    # the conversation's final EOS (the tokenizer's, SmolLM2's <|im_end|>) the template writes after "<|end|>\n"
    "phi3": Spec(BASIC, (Convention("conversation-final-eos", "trl", "end", "\n<|im_end|>"), EOT_NEWLINE)),
    "phi3_5": Spec(BASIC, (Convention("conversation-final-eos", "trl", "end", "\n<|im_end|>"), EOT_NEWLINE)),
    # TRL trains the newline ending the prompt's "<|im_start|>assistant\n"
    "qwen2_5": Spec(BASIC + ("tool",), (prompt_tail("\n"), EOT_NEWLINE)),
    "qwen2_5_vl": Spec(BASIC, (EOT_NEWLINE,)),
    # Qwen 3 drops the think block of earlier turns (their reasoning too); TRL's training template keeps it
    "qwen3": Spec(ALL, (EOT_NEWLINE,), rewrites_history=("multi", "system", "reasoning", "tool")),
    "qwen3_5_nothink": Spec(
        ALL, (prompt_tail("<think>\n\n</think>\n\n"), EOT_NEWLINE), rewrites_history=("multi", "system", "reasoning"),
        # the no-think prompt writes an empty think block where the answer has reasoning: not prefix-stable (sftlab
        # warns), and only the answer is trained, after the reasoning; TRL trains the reasoning block
        per_kind={"reasoning": tuple(Convention(f"reasoning-after-a-no-think-prompt {k}", "trl", "start",
                                                f"<think>\n{r}\n</think>\n\n") for k, r in enumerate(REASONING) if r)}),
    # the thinking prompt writes "<think>\n"; earlier turns lose their think block (as in Qwen 3)
    "qwen3_5_think": Spec(ALL, (QWEN3_JOINED_NEWLINE, QWEN3_THINK_PROMPT, EOT_NEWLINE),
                   rewrites_history=("multi", "system", "reasoning")),
    "qwen3_6": Spec(ALL, (QWEN3_JOINED_NEWLINE, QWEN3_THINK_PROMPT, EOT_NEWLINE),
                   rewrites_history=("multi", "system", "reasoning")),
    "qwen3_8": Spec(ALL, (QWEN3_JOINED_NEWLINE, QWEN3_THINK_PROMPT, EOT_NEWLINE)),  # keeps earlier turns' think blocks
    "qwen3_instruct_2507": Spec(BASIC + ("tool",), (EOT_NEWLINE,)),
    "qwen3_vl": Spec(BASIC + ("tool",), (EOT_NEWLINE,)),
}

# VL templates that do not render plain text messages (they read `content` as a list of parts): sftlab refuses them
NOT_TEXT = {"idefics3": "iterates over content parts", "smolvlm": "iterates over content parts",
            "llava_next": "reads content[...]['text']"}


def pairs() -> list[str]:
    return sorted(p.name[: -len("_training.jinja")] for p in TEMPLATES.iterdir() if p.name.endswith("_training.jinja"))


def test_every_pair_trl_ships_is_covered():
    assert set(pairs()) == set(SPECS) | set(NOT_TEXT)


# the tokens of the models' own vocabularies that the templates write and conftest's pattern does not catch:
# Gemma's turn tokens, DeepSeek's full-width ones; and the think tags, added (not special) tokens of Qwen 3,
# DeepSeek-R1 and Nemotron, so a trained span never starts inside "<think>"
_MORE_SPECIAL = re.compile(r"<(?:start|end)_of_turn>|<｜[^<>｜]+｜>")
_THINK = ["<think>", "</think>"]


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    """name -> (SmolLM2's tokenizer with template `name` installed and the tokens of it and of its training variant,
    the training variant's text). Templates that add the same tokens share one tokenizer (shallow copies, each with
    its template): a deep copy of the tokenizer is most of this file's time."""
    from tokenizers import AddedToken

    made, bases = {}, {}

    def get(name: str):
        if name not in made:
            text = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
            training = (TEMPLATES / f"{name}_training.jinja").read_text(encoding="utf-8")
            key = (frozenset(_SPECIAL.findall(text)), frozenset(_MORE_SPECIAL.findall(text + training)))
            if key not in bases:
                base = tokenizer_for(tokenizer, f"{name}.jinja")
                if more := sorted(key[1] - set(base.all_special_tokens)):
                    base.add_special_tokens({"additional_special_tokens": more}, replace_extra_special_tokens=False)
                base.add_tokens([AddedToken(t, special=False, normalized=False) for t in _THINK])
                bases[key] = base
            tok = copy.copy(bases[key])
            tok.chat_template, tok.name_or_path = text, f"{name}.jinja"
            made[name] = tok, training
        return made[name]

    return get


def _pieces(tok, ids) -> list[str]:
    return [tok.decode([t], clean_up_tokenization_spaces=False) for t in ids]


def _runs(pieces: list[str], trained: list[bool]) -> tuple[str, list[tuple[int, int]], list[int]]:
    """The decoded text, the char spans [start, end) of its runs of trained tokens, and where its tokens start."""
    runs, pos, start, starts = [], 0, None, []
    for piece, t in zip(pieces, trained):
        if t and start is None:
            start = pos
        elif not t and start is not None:
            runs.append((start, pos))
            start = None
        starts.append(pos)
        pos += len(piece)
    if start is not None:
        runs.append((start, pos))
    return "".join(pieces), runs, starts + [pos]


def sftlab_runs(tok, convs, last_only: bool = False) -> list:
    """sftlab's rendering of each conversation (in one batch: one set-up of the template for all)."""
    out = []
    for ex in render_many(convs, tok, RenderOptions(train_on="last") if last_only else RenderOptions()):
        if isinstance(ex, Exception):
            raise ex
        out.append(_runs(_pieces(tok, ex.input_ids), [label != IGNORE for label in ex.labels]))
    return out


def trl_runs(tok, training: str, conv):
    out = tok.apply_chat_template(conv.messages, tools=conv.tools, chat_template=training, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    return _runs(_pieces(tok, out["input_ids"]), [bool(m) for m in out["assistant_masks"]])


def _show(text: str, runs) -> list[str]:
    return [text[s:e] for s, e in runs]


def _moved(full: str, runs, starts: list[int], conventions, used: set[str]):
    """TRL's runs with the template's conventions applied: at each edge of a run, the first that applies. A token
    the moved edge falls inside stays trained (snapped to TRL's token starts), but where the convention is that
    sftlab splits that token (`splits_token`)."""
    out = []
    for run in runs:
        for at in ("start", "end"):
            for c in conventions:
                if c.at == at and (moved := c.apply(full, run)) is not None:
                    s, e = moved
                    if at == "start":
                        run = (s if c.splits_token else starts[bisect.bisect_right(starts, s) - 1], e)
                    else:
                        run = (s, starts[bisect.bisect_left(starts, e)])
                    used.add(c.name)
                    break
        out.append(run)
    return out


def _compare_whole(tok, training, conv, ours, spec: Spec, conventions, used) -> list[str]:
    s_text, s_runs, _ = ours
    t_text, t_runs, t_starts = trl_runs(tok, training, conv)
    if spec.trl_final_end is not None:  # sftlab's EOS where TRL's template writes its own end after the last answer
        eos = tok.eos_token
        assert t_text.endswith(spec.trl_final_end) and s_text.endswith(eos), (t_text[-40:], s_text[-40:])
        assert s_runs[-1][1] == len(s_text) and t_runs[-1][1] == len(t_text), "the final end is trained on both"
        s_text, t_text = s_text[: -len(eos)], t_text[: -len(spec.trl_final_end)]
        s_runs = s_runs[:-1] + [(s_runs[-1][0], len(s_text))]
        t_runs = t_runs[:-1] + [(t_runs[-1][0], len(t_text))]
        t_starts = [x for x in t_starts if x < len(t_text)] + [len(t_text)]
        used.add("trl-final-end")
    assert s_text == t_text, f"the two renderings differ:\n{s_text!r}\n{t_text!r}"
    t_runs = _moved(t_text, t_runs, t_starts, conventions, used)
    if s_runs != t_runs:
        return [f"sftlab {_show(s_text, s_runs)}\n   TRL {_show(t_text, t_runs)} (after conventions)"]
    return []


def _as_last(conv) -> list:
    """The conversation up to each of its assistant turns."""
    subs = []
    for i, m in enumerate(conv.messages):
        if m["role"] == "assistant":
            subs.append(copy.copy(conv))
            subs[-1].messages = conv.messages[: i + 1]
    return subs


def _compare_each_turn_as_last(tok, training, conv, ours, subs, ours_last, conventions, used) -> list[str]:
    """The template writes earlier turns otherwise than TRL's training template: each assistant turn is compared as
    the last message, over the text the two renderings share at their end (which holds the turn and its prompt)."""
    assert ours[0] != trl_runs(tok, training, conv)[0], "the template now writes earlier turns as TRL's does"
    used.add("rewrites-history")
    problems = []
    for sub, (s_text, s_runs, _) in zip(subs, ours_last):
        i = len(sub.messages) - 1
        t_text, t_runs, t_starts = trl_runs(tok, training, sub)
        shared = len(os.path.commonprefix([s_text[::-1], t_text[::-1]]))
        assert sub.messages[i - 1]["content"] in s_text[len(s_text) - shared:], f"turn {i}: the renderings differ there"
        assert len(s_runs) == 1 and s_runs[0][0] >= len(s_text) - shared, f"turn {i}: sftlab {_show(s_text, s_runs)}"
        (s, e), = s_runs
        t_last = _moved(t_text, t_runs[-1:], t_starts, conventions, used)[0]
        if (s - len(s_text), e - len(s_text)) != (t_last[0] - len(t_text), t_last[1] - len(t_text)):
            problems.append(f"turn {i} as the last: sftlab {_show(s_text, s_runs)}\n   TRL "
                            f"{_show(t_text, [t_last])} (after conventions)")
    return problems


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sftlab_trains_what_trl_s_training_template_marks_up_to_named_conventions(tokenizers, name):
    tok, training = tokenizers(name)
    spec = SPECS[name]
    convs = [to_conversation(copy.deepcopy(CONVERSATIONS[kind]), f"{name}:{kind}") for kind in spec.kinds]
    ours = sftlab_runs(tok, convs)
    subs = {kind: _as_last(conv) for kind, conv in zip(spec.kinds, convs) if kind in spec.rewrites_history}
    flat = sftlab_runs(tok, [sub for kind in subs for sub in subs[kind]], last_only=True) if subs else []
    ours_last, k = {}, 0
    for kind in subs:
        ours_last[kind], k = flat[k:k + len(subs[kind])], k + len(subs[kind])
    used: set[str] = set()
    problems = []
    for kind, conv, mine in zip(spec.kinds, convs, ours):
        conventions = spec.per_kind.get(kind, ()) + spec.conventions
        if kind in subs:
            found = _compare_each_turn_as_last(tok, training, conv, mine, subs[kind], ours_last[kind], conventions, used)
        else:
            found = _compare_whole(tok, training, conv, mine, spec, conventions, used)
        problems += [f"[{kind}] {p}" for p in found]
    assert not problems, f"{name}:\n" + "\n".join(problems)
    declared = {c.name for c in spec.conventions} | {c.name for cs in spec.per_kind.values() for c in cs}
    declared |= {"rewrites-history"} if spec.rewrites_history else set()
    declared |= {"trl-final-end"} if spec.trl_final_end is not None else set()
    assert declared <= used, f"{name}: conventions that no longer apply: {sorted(declared - used)}"
    first = CONVERSATIONS["single"]["messages"][:1]
    prompt = tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    added = prompt[len(os.path.commonprefix([prompt, tok.apply_chat_template(first, tokenize=False)])):]
    for c in spec.conventions + tuple(c for cs in spec.per_kind.values() for c in cs):
        assert not c.in_prompt or c.text in added, f"{name}: {c.name}: the generation prompt adds {added!r}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_conversations_a_template_does_not_write_are_refused(tokenizers, name):
    """The kinds left out of a template's spec are those it cannot write (no system role, no reasoning, no tools):
    sftlab says so rather than training them otherwise."""
    tok, _ = tokenizers(name)
    for kind in sorted(set(CONVERSATIONS) - set(SPECS[name].kinds)):
        with pytest.raises(SftlabError):
            render(to_conversation(copy.deepcopy(CONVERSATIONS[kind]), f"{name}:{kind}"), tok)


@pytest.mark.parametrize("name", sorted(NOT_TEXT))
def test_vl_templates_that_need_content_parts_are_refused(tokenizers, name):
    tok, _ = tokenizers(name)
    with pytest.raises(SftlabError):
        render(to_conversation(copy.deepcopy(CONVERSATIONS["single"]), f"{name}:single"), tok)
