"""Batched text generation for serving: one engine interface over PyTorch and ONNX Runtime GenAI.

The same code serves inside Triton: `sftlab export --to triton` writes sftlab's source next to the
Python-backend `model.py`, which imports this module from there. What it imports must therefore need
no more than torch, transformers and numpy (the chat-template reading it shares with training does).

An engine takes a batch of requests (prompt token ids, max_new_tokens, sampling parameters) and
decodes them together step by step; a request may carry an `on_token` callback, which is
how streaming and batching share one loop. The torch engine also decodes step by step for a
scheduler (`prefill`, `step`, `join`): requests join a running batch and leave it at their
last token (continuous batching, `serve.backends`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from sftlab.data.render import answer_ending
from sftlab.data.tools import as_template_takes, per_tokenizer, probe_call

MARK = "SFTLAB_ANSWER_SENTINEL"  # plain word characters: templates that trim content keep it whole


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special tokens a model ends a turn on, read from what training teaches it (data/render.py): the
    last token of an answer that ends the conversation (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`, Cohere 2
    `<|END_OF_TURN_TOKEN|>` after `<|END_RESPONSE|>`), of one that a question follows (GigaChat 3.5's
    `<|message_sep|>`: its last message ends with EOS instead), and of a turn that calls a tool, which the
    tool's result follows (gpt-oss `<|call|>`, GLM `<|observation|>`, Gemma 4 `<|tool_response>`): there the
    model waits for the result. A template training refuses gives the last of the markers it writes after an
    answer (`answer_ending`)."""
    return list(_turn_ends(tokenizer)) if getattr(tokenizer, "chat_template", None) else []


@per_tokenizer
def _turn_ends(tokenizer) -> tuple[int, ...]:
    """A token training also teaches inside a turn is none (gpt-oss's `<|end|>` ends its reasoning before the
    answer, as it ends an earlier answer; Kimi K3's first `<|close|>` likewise)."""
    import warnings

    from sftlab.data.conversation import Conversation
    from sftlab.data.render import IGNORE, render
    from sftlab.errors import SftlabError

    tools, call = probe_call(MARK, {})
    hi = {"role": "user", "content": "Hi."}
    probes = [([hi, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again."},
                {"role": "assistant", "content": "Bye."}], {}),
              ([*call, {"role": "assistant", "content": "Done."}], {"tools": tools}),
              ([hi, {"role": "assistant", "content": "Hello.", "reasoning_content": "A greeting."}], {})]
    marked = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    ends: list[int] = []
    inside: set[int] = set()
    for messages, meta in probes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the probe's warnings are not the user's
                example = render(Conversation(messages, source="the stop-token probe", meta=meta), tokenizer)
        except SftlabError:  # no fast tokenizer, a template training refuses, one without tool calls or reasoning
            continue
        trained = [label != IGNORE for label in example.labels] + [False]
        last = []
        for k, token in enumerate(map(int, example.input_ids)):
            if trained[k]:
                (inside.add if trained[k + 1] else last.append)(token)
        for token in last[-1:] + last[:-1]:  # the conversation's end first
            if token in marked and token not in ends:
                ends.append(token)
    ends = [token for token in ends if token not in inside]
    if not ends and (ending := answer_ending(tokenizer)):
        ends = [tokenizer(ending[-1], add_special_tokens=False)["input_ids"][-1]]
    return tuple(ends)


def stop_token_ids(tokenizer, eos_token_id: int | list[int] | None = None) -> list[int]:
    """Every token that ends a reply: the template's end-of-turn (after an answer, and after a turn
    that calls a tool), the tokenizer's and the model's EOS (`eos_token_id`: the model's
    generation_config/config value). The one definition used by evaluation, serving, chat and
    every export."""
    ids = end_of_turn_ids(tokenizer)
    extra = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    for tok in [tokenizer.eos_token_id, *extra]:
        if tok is not None and tok not in ids:
            ids.append(int(tok))
    return ids


def parse_text_input(text: str) -> tuple[list[dict] | None, str | None, list[dict] | None]:
    """The Triton text input: a JSON list of chat messages, an object {"messages", "tools"} (a chat
    that may call tools), or else a raw prompt. Returns (messages, prompt, tools)."""
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return None, text, None
        tools = None
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            value, tools = value["messages"], value.get("tools")
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
            return value, None, tools
    return None, text, None


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt text of chat messages (and the functions they may call): the chat template with the
    generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send a prompt instead of messages")
    return tokenizer.apply_chat_template(as_template_takes(tokenizer, messages), tools=tools, add_generation_prompt=True,
                                         tokenize=False)


def encode(tokenizer, messages: list[dict] | None = None, prompt: str | None = None,
           tools: list[dict] | None = None, *, text: str | None = None) -> list[int]:
    """Prompt token ids: chat messages (and the functions they may call) through the chat template,
    with the generation prompt (`text`: that prompt, already `render`ed), or raw text."""
    if messages is not None:
        text = render(tokenizer, messages, tools) if text is None else text
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt or "", add_special_tokens=True)["input_ids"])


def string_quote(tokenizer) -> str:
    """The special token the chat template writes on both sides of a string argument of a tool call
    (Gemma 4's `<|"|>`), '' where it writes none: found by rendering a call whose argument is a marker, once
    per tokenizer and template (each request's decoder asks)."""
    return _string_quote(tokenizer) if getattr(tokenizer, "chat_template", None) else ""


@per_tokenizer
def _string_quote(tokenizer) -> str:
    tools, messages = probe_call("probe", {"text": MARK})
    try:
        text = tokenizer.apply_chat_template(messages[:2], tools=tools, tokenize=False)
    except Exception:  # a template without tool calling, or one that rejects this minimal call
        return ""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return next((t.content for t in decoder.values() if t.special and f"{t.content}{MARK}{t.content}" in text), "")


def kept_specials(tokenizer) -> frozenset[int]:
    """The special tokens a reply's text keeps: the template's `string_quote` (a reply's tool calls are
    unreadable without it) and its reasoning markers (serve/reasoning.py `reasoning_markers`: without them
    the reasoning is not told from the answer)."""
    return _kept_specials(tokenizer) if getattr(tokenizer, "chat_template", None) else frozenset()


@per_tokenizer
def _kept_specials(tokenizer) -> frozenset[int]:
    from sftlab.serve.reasoning import reasoning_markers

    quote = string_quote(tokenizer)
    quotes = {i for i, t in tokenizer.added_tokens_decoder.items() if quote and t.special and t.content == quote}
    return frozenset(quotes) | reasoning_markers(tokenizer)


class IncrementalDecoder:
    """Turns generated token ids into text deltas with `tokenizers.decoders.DecodeStream`, which
    keeps a small window instead of re-decoding the whole answer and holds back incomplete UTF-8.
    Special tokens are dropped, but for the template's `kept_specials`."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer
        kept = kept_specials(tokenizer)
        self.dropped = _special_but(tokenizer, kept) if kept else set()
        self.stream = DecodeStream(skip_special_tokens=not kept)

    def add(self, token: int) -> str:
        return "" if token in self.dropped else self.stream.step(self.backend, token) or ""


def decode_reply(tokenizer, ids: list[int]) -> str:
    """A whole reply's text as `IncrementalDecoder` writes it piece by piece (evaluation compares it so)."""
    kept = kept_specials(tokenizer)
    if not kept:
        return tokenizer.decode(ids, skip_special_tokens=True)
    dropped = _special_but(tokenizer, kept)
    return tokenizer.decode([i for i in ids if i not in dropped])


def _special_but(tokenizer, kept: frozenset[int]) -> set[int]:
    """The ids of the special tokens a reply's text leaves out where it keeps some (`kept`)."""
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i not in kept}


def trained_ids(tokenizer, messages: list[dict], source: str, meta: dict | None = None) -> list[int] | None:
    """The tokens training on `messages` teaches a model to generate (stop tokens dropped); None where the
    template cannot render the conversation. The probe's own warnings are not the user's and are silenced."""
    import warnings

    from sftlab.data.conversation import Conversation
    from sftlab.data.render import IGNORE, render
    from sftlab.errors import SftlabError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = render(Conversation(messages, source=source, meta=meta or {}), tokenizer)
    except SftlabError:  # DataError too: no template, or one that cannot write this turn
        return None
    stops = set(stop_token_ids(tokenizer))
    return [int(t) for t, label in zip(example.input_ids, example.labels) if label != IGNORE and t not in stops]


def trained_reply(tokenizer, messages: list[dict], source: str, meta: dict | None = None) -> str | None:
    """`trained_ids` decoded as a generated reply is: the probe the reasoning and tool-call layouts are read
    from."""
    ids = trained_ids(tokenizer, messages, source, meta)
    if ids is None:
        return None
    decoder = IncrementalDecoder(tokenizer)
    return "".join(decoder.add(t) for t in ids)


# what a request may set beyond temperature and top_p; each engine's `supports`
SAMPLING = ("logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p",
            "repetition_penalty", "json_schema", "json_after")


# JSON as Python's json.dumps writes it: one line, ", " and ": " between items, no other whitespace (a free one
# lets a model pad with whitespace to max_tokens); a schema's own "x-guidance" options take precedence
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=64)
def json_grammar(schema: str, lead: str = "") -> str:
    """The llguidance grammar of a JSON schema (its JSON text), the JSON after `lead` or not (the whitespace a
    template writes after a reasoning's closer); ValueError saying what is wrong with it (checked without a
    tokenizer: what the engine's matcher would find). Cached: the server checks a request's schema, then its
    engine compiles the same text."""
    from llguidance import LLMatcher

    if lead:  # around the JSON's own grammar (cached): its schema, with JSON_LAYOUT's options in
        inner = json.dumps(json.loads(json_grammar(schema))["grammars"][0]["json_schema"])
        grammar = LLMatcher.grammar_from_lark(f"start: {json.dumps(lead)}? answer\nanswer: %json {inner}")
    else:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(messages[0])
    return grammar


class Logprob(NamedTuple):
    """A generated token's log-probability and the `top` most likely tokens' (token, logprob), best first."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenRequest:
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    on_token: Callable[[int, Logprob | None], None] | None = None  # each token taken, with its logprobs where asked
    seed: int | None = None  # sampling draws from its own generator seeded with it: repeatable in any batch
    done: bool = False  # set from another thread (client gone, stop text seen): the engine drops it at its next token
    logprobs: int | None = None  # each token's logprob and this many most likely alternatives (None: not asked)
    presence_penalty: float = 0.0  # OpenAI's: minus presence * (count > 0) + frequency * count, counting
    frequency_penalty: float = 0.0  # the tokens generated so far
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    min_p: float = 0.0  # sample among tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # transformers': tokens of the prompt and the reply, positive logits divided
    json_schema: str | None = None  # a JSON schema (its text) the reply is constrained to, from its first token,
    json_after: str | None = None  # or after this text: the closer of a reasoning ("\n</think>\n\n") it writes freely

    def extras(self) -> list[str]:
        """The parameters of SAMPLING this request sets to other than their defaults."""
        defaults = {f.name: f.default for f in fields(self)}
        return [name for name in SAMPLING if getattr(self, name) not in (defaults[name], {})]

    @property
    def shifts_logits(self) -> bool:
        """Whether logits change before the token is picked (greedy included)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or
                    self.repetition_penalty != 1.0)


class StopText:
    """Generated text cut before the first of `stops` (OpenAI's `stop`), fed piece by piece:
    `feed` returns the text that can be sent now, holding back a tail that may be the start of
    a stop string, and sets `hit` once one appears; `flush` returns what is held back at the end."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.text, self.sent, self.hit = "", 0, False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        cut = min((i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0), default=-1)
        if cut >= 0:
            self.hit, self.text = True, self.text[:cut]
        hold = 0 if self.hit else max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                      default=0)
        out, self.sent = self.text[self.sent:len(self.text) - hold], len(self.text) - hold
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class GenResult:
    tokens: list[int] = field(default_factory=list)  # generated tokens, stop token excluded
    finish_reason: str = "length"  # "stop" when a stop token ended it
    logprobs: list[Logprob] = field(default_factory=list)  # one per token where the request asks for them


def take_token(result: GenResult, request, tok: int, stop_ids) -> bool:
    """Record one generated token for a request; False once the request is finished. Where the request
    asks for logprobs, the engine has put this token's in `result.logprobs` already."""
    if request.done or tok in stop_ids:
        del result.logprobs[len(result.tokens):]
        if not request.done:
            result.finish_reason = "stop"
        return False
    result.tokens.append(tok)
    if request.on_token:
        request.on_token(tok, result.logprobs[-1] if result.logprobs else None)
    return len(result.tokens) < request.max_new_tokens


@dataclass
class _Row:
    """One sequence of a `Decoding`: its request, result, sampling generator, and how many of its tokens the KV
    cache holds (the last `length` columns of its row; the next token's position)."""
    request: GenRequest
    result: GenResult
    generator: Any
    length: int
    live: bool = True
    matcher: Any = None  # the llguidance matcher of the request's json_schema, advanced by each token taken
    reasoning: _Reasoning | None = None  # the reasoning before the JSON, until it is closed: the matcher waits

    @property
    def constrained(self) -> bool:
        """Whether its grammar picks its next token."""
        return self.live and self.matcher is not None and self.reasoning is None


class _Reasoning:
    """A reply's reasoning before its JSON (`GenRequest.json_after`), decoded as the server decodes it until its
    closer is written, found as the server's reply layout finds it (whitespace-tolerant between its pieces)."""

    def __init__(self, tokenizer, closer: str):
        from sftlab.serve.reasoning import template_pattern

        self.decoder, self.closer, self.pattern, self.tail = IncrementalDecoder(tokenizer), closer, \
            template_pattern(closer), ""

    def closed(self, token: int) -> str | None:
        """None while the closer is not written; then the text its token decodes to after it (mostly '')."""
        from sftlab.serve.reasoning import closer_start

        self.tail += self.decoder.add(token)
        if match := self.pattern.search(self.tail):
            return self.tail[match.end():]
        self.tail = self.tail[closer_start(self.tail, self.closer, 0):]  # only what may still begin the closer
        return None


class Decoding:
    """Sequences decoding together, one row each, in one left-padded KV cache with its attention mask and each
    row's next input token. Where the cache is plain full attention (`joinable`), rows join between two steps
    (`TorchEngine.join`) and finished or cancelled rows leave at once: iteration-level (continuous) batching.
    Otherwise a finished row rides along unread until the whole batch is done (static batching)."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = self.mask = self.tokens = None
        self.joinable = False
        self.finished: list[tuple[GenRequest, GenResult]] = []  # taken out with `pop_finished`

    def __len__(self) -> int:
        return sum(row.live for row in self.rows)

    def pop_finished(self) -> list[tuple[GenRequest, GenResult]]:
        out, self.finished = self.finished, []
        return out


def _plain_layers(layers) -> bool:
    """Whether a KV cache's layers are all plain full-attention `DynamicLayer`s ([batch, heads, seq, dim] tensors):
    those rows can be selected, left-padded and concatenated. Sliding-window, linear-attention, quantized or
    shared layers cannot."""
    from transformers.cache_utils import DynamicLayer

    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class TorchEngine:
    """Batched decoding with a KV cache on a transformers causal LM (left padding).

    `generate` decodes a fixed batch (static batching: the Triton backend, evaluation); `prefill`, `step` and
    `join` let a scheduler add requests to a running batch between decode steps (`serve.backends`). A request
    with a `json_schema` picks each token among those its grammar (llguidance) allows, greedy or sampled, and
    ends where the grammar is complete; with `json_after` too, only once its reasoning is closed."""

    name = "torch"
    supports = frozenset(SAMPLING)

    def __init__(self, model, tokenizer, stop_ids: list[int]):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else stop_ids[0]
        self.device = next(model.parameters()).device
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.joinable = self._predict_joinable()  # requests can join a running batch (continuous batching)

    def _predict_joinable(self) -> bool:
        try:
            from transformers import DynamicCache

            return _plain_layers(DynamicCache(config=self.model.config).layers)
        except Exception:  # a model whose config the cache cannot read: decode statically
            return False

    @classmethod
    def from_pretrained(cls, path: str | Path):
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        from sftlab.models import auto_model_from

        tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
        # a merged vision-language model (Qwen2.5-VL, Mistral 3) loads as AutoModelForImageTextToText
        model = auto_model_from(path, dtype=dtype, use_safetensors=True)
        if torch.cuda.is_available():
            model = model.to("cuda")
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            eos = getattr(model.config.get_text_config(decoder=True), "eos_token_id", None)
        return cls(model, tokenizer, stop_token_ids(tokenizer, eos))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Decode `requests` together until each is finished (static batching)."""
        results: dict[int, GenResult] = {}
        decoding = self.prefill(requests)
        while True:
            results.update((id(req), res) for req, res in decoding.pop_finished())
            if not decoding:
                return [results[id(r)] for r in requests]
            self.step(decoding)

    def prefill(self, requests: list[GenRequest]) -> Decoding:
        """A `Decoding` of `requests`: their prompts run together (left padded) and each one's first token taken.
        A request that is finished at once (max_new_tokens 0, a stop token, cancelled) is in `finished`."""
        from transformers import DynamicCache

        torch = self.torch
        decoding = Decoding()
        rows = []
        for r in requests:
            row = _Row(r, GenResult(), None if r.seed is None else torch.Generator(self.device).manual_seed(r.seed),
                       len(r.ids))
            if r.json_schema:
                row.matcher = self._matcher(r.json_schema, r.json_after)
                row.reasoning = _Reasoning(self.tokenizer, r.json_after) if r.json_after else None
            if r.max_new_tokens > 0 and not r.done:
                rows.append(row)
            else:
                decoding.finished.append((r, row.result))
        if not rows:
            return decoding
        with torch.inference_mode():
            n, width = len(rows), max(row.length for row in rows)
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - row.length:] = torch.tensor(row.request.ids)
                mask[i, width - row.length:] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            decoding.rows, decoding.cache, decoding.mask = rows, out.cache, mask
            decoding.joinable = type(out.cache) is DynamicCache and _plain_layers(out.cache.layers)
            self._take(decoding, out.logits[:, -1, :])
        return decoding

    def step(self, decoding: Decoding) -> None:
        """One token for every live row; rows that finish move to `finished`."""
        torch = self.torch
        with torch.inference_mode():
            if decoding.joinable:  # cancelled or stopped (stop text) since the last token: out before the forward
                for row in decoding.rows:
                    if row.live and row.request.done:
                        row.live = False
                        decoding.finished.append((row.request, row.result))
                self._compact(decoding)
            if not decoding:
                return
            mask = torch.cat([decoding.mask, decoding.mask.new_ones((len(decoding.rows), 1))], dim=-1)
            positions = torch.tensor([[row.length] for row in decoding.rows], device=self.device)
            out = self.model(input_ids=decoding.tokens[:, None], attention_mask=mask, position_ids=positions,
                             cache=decoding.cache, use_cache=True)
            decoding.cache, decoding.mask = out.cache, mask
            for row in decoding.rows:
                row.length += 1
            self._take(decoding, out.logits[:, -1, :])

    def join(self, running: Decoding, new: Decoding) -> Decoding:
        """`running` with the rows of `new` (both joinable): each cache left-padded to the longer one, then
        concatenated along the batch, so every row keeps its own tokens, positions and mask."""
        torch, pad = self.torch, self.torch.nn.functional.pad
        if not new.rows or not running.rows:
            keep, other = (running, new) if running.rows else (new, running)
            keep.finished += other.pop_finished()
            return keep
        if not (running.joinable and new.joinable):
            raise RuntimeError("this model's KV cache cannot take requests into a running batch")
        with torch.inference_mode():
            a, b = running.mask.shape[1], new.mask.shape[1]
            width = max(a, b)
            for old, add in zip(running.cache.layers, new.cache.layers):
                old.keys = torch.cat([pad(old.keys, (0, 0, width - a, 0)), pad(add.keys, (0, 0, width - b, 0))])
                old.values = torch.cat([pad(old.values, (0, 0, width - a, 0)), pad(add.values, (0, 0, width - b, 0))])
            running.mask = torch.cat([pad(running.mask, (width - a, 0)), pad(new.mask, (width - b, 0))])
            running.tokens = torch.cat([running.tokens, new.tokens])
        running.rows += new.rows
        running.finished += new.pop_finished()
        return running

    def _take(self, decoding: Decoding, logits) -> None:
        """Pick each row's next token from `logits` (shifted, then masked by the row's grammar where it has one) and
        record it (with its logprobs where asked) for the live ones."""
        logits, requests = logits.float(), [row.request for row in decoding.rows]
        scores = self._shift(logits, decoding.rows) if any(r.shifts_logits for r in requests) else logits
        if any(row.constrained for row in decoding.rows):
            scores = self._constrain(scores, decoding.rows)
        decoding.tokens = self._pick(scores, requests, [row.generator for row in decoding.rows])
        tokens = decoding.tokens.tolist()
        if any(r.logprobs is not None for r in requests):
            self._logprobs(logits, decoding.rows, tokens)
        for row, tok in zip(decoding.rows, tokens):
            if not row.live:
                continue
            # the grammar takes the token (a stop token ends the row anyway); complete, it ends the row as one would
            complete = (row.constrained and tok not in self.stop_ids and row.matcher.consume_token(tok)
                        and row.matcher.is_stopped())
            if row.reasoning is not None and (after := row.reasoning.closed(tok)) is not None:
                row.reasoning = None  # the grammar from the next token, on what the closer's token wrote after it
                row.matcher.consume_tokens(self.tokenizer.encode(after, add_special_tokens=False))
            if not take_token(row.result, row.request, tok, self.stop_ids) or complete:
                if complete:
                    row.result.finish_reason = "stop"
                row.live = False
                decoding.finished.append((row.request, row.result))
        self._compact(decoding)

    def _compact(self, decoding: Decoding) -> None:
        """Drop rows that are done (all of them once none is live; else only from a joinable cache), and the
        cache columns that hold padding for every remaining row."""
        if all(row.live for row in decoding.rows):
            return
        if not decoding:
            decoding.rows, decoding.cache, decoding.mask, decoding.tokens = [], None, None, None
            return
        if not decoding.joinable:
            return
        keep = [i for i, row in enumerate(decoding.rows) if row.live]
        index = self.torch.tensor(keep, device=self.device)
        decoding.rows = [decoding.rows[i] for i in keep]
        decoding.tokens, decoding.mask = decoding.tokens[index], decoding.mask[index]
        trim = decoding.mask.shape[1] - max(row.length for row in decoding.rows)
        decoding.mask = decoding.mask[:, trim:]
        for layer in decoding.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, trim:], layer.values[index, :, trim:]

    @functools.cached_property
    def _grammar_tokenizer(self):
        """llguidance's view of the tokenizer (built once, ~0.3 s), with the engine's stop tokens as its EOS: what a
        complete grammar allows next."""
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, eos_token=sorted(self.stop_ids) or None)

    def _matcher(self, schema: str, after: str | None):
        """A request's grammar, at its prefill: the matcher of its JSON schema, after the whitespace a reasoning's
        closer (`after`) ends with where the JSON follows one."""
        from llguidance import LLMatcher

        lead = after[len(after.rstrip()):] if after else ""
        # without a lead, called as the server's check calls it (lru_cache keys on the arguments as given)
        return LLMatcher(self._grammar_tokenizer, json_grammar(schema, lead) if lead else json_grammar(schema))

    def _constrain(self, scores, rows: list[_Row]):
        """A copy of `scores` where each live row with a grammar has the tokens it does not allow next at -inf."""
        import numpy as np
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        torch = self.torch
        index = [i for i, row in enumerate(rows) if row.constrained]
        bitmask = allocate_token_bitmask(len(index), self._grammar_tokenizer.vocab_size)
        for k, i in enumerate(index):
            fill_next_token_bitmask(rows[i].matcher, bitmask, k)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # one per token
        width = scores.shape[1]  # a model's logits may be wider than its tokenizer (padded) or narrower
        allowed = torch.from_numpy(bits[:, :width]).to(scores.device, torch.bool)
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]))
        scores = scores.clone()
        scores[index] = scores[index].masked_fill(~allowed, float("-inf"))
        return scores

    def _shift(self, logits, rows: list[_Row]):
        """A copy of `logits` with each live row's logit_bias added, then its repetition penalty (over its prompt
        and generated tokens), frequency and presence penalties (over its generated tokens) applied, as vLLM."""
        from transformers import RepetitionPenaltyLogitsProcessor

        torch, logits = self.torch, logits.clone()
        for i, row in enumerate(rows):
            r = row.request
            if not (row.live and r.shifts_logits):
                continue
            if r.logit_bias:
                logits[i, list(r.logit_bias)] += torch.tensor(list(r.logit_bias.values()), device=logits.device)
            if r.repetition_penalty != 1.0:
                seen = torch.tensor([r.ids + row.result.tokens], device=logits.device)
                logits[i] = RepetitionPenaltyLogitsProcessor(r.repetition_penalty)(seen, logits[i:i + 1])[0]
            if (r.presence_penalty or r.frequency_penalty) and row.result.tokens:
                seen, counts = torch.tensor(row.result.tokens, device=logits.device).unique(return_counts=True)
                logits[i, seen] -= r.presence_penalty + r.frequency_penalty * counts
        return logits

    def _pick(self, logits, requests: list[GenRequest], generators):
        """Greedy, or a draw at the request's temperature among its top_k, min_p (as transformers' warpers), then
        top_p tokens."""
        torch = self.torch
        tokens = logits.argmax(-1)
        for i, r in enumerate(requests):
            if r.temperature > 0:
                scores = logits[i:i + 1] / r.temperature
                if r.top_k > 0:
                    from transformers import TopKLogitsWarper

                    scores = TopKLogitsWarper(r.top_k)(None, scores)
                if r.min_p > 0:
                    from transformers import MinPLogitsWarper

                    scores = MinPLogitsWarper(r.min_p)(None, scores)
                probs = torch.softmax(scores[0], -1)
                if r.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
        return tokens

    def _logprobs(self, logits, rows: list[_Row], tokens: list[int]) -> None:
        """Each live row that asks for them gets its token's logprob and its top alternatives: the log-softmax of the
        model's raw logits, before logit_bias, penalties, a grammar's mask, temperature and top_k/min_p/top_p, as OpenAI
        reports them."""
        asking = [i for i, row in enumerate(rows) if row.live and row.request.logprobs is not None]
        if not asking:
            return
        logp = self.torch.log_softmax(logits[asking], -1)
        top_values, top_ids = logp.topk(max(rows[i].request.logprobs for i in asking), -1)
        chosen = logp[list(range(len(asking))), [tokens[i] for i in asking]].tolist()
        for j, (i, values, ids) in enumerate(zip(asking, top_values.tolist(), top_ids.tolist())):
            n = rows[i].request.logprobs
            rows[i].result.logprobs.append(Logprob(tokens[i], chosen[j], list(zip(ids[:n], values[:n]))))


class OnnxEngine:
    """ONNX Runtime GenAI (KV-cache model from its model builder); one generator per request,
    stepped in lockstep so a batch shares the loop. Of SAMPLING, its search options have `top_k` and
    `repetition_penalty` (over the prompt and the reply, as transformers', after logit_bias as the torch
    engine's); `logprobs` and `logit_bias` are read and written on its logits."""

    name = "onnx"
    supports = frozenset({"logprobs", "logit_bias", "top_k", "repetition_penalty"})

    def __init__(self, model_dir: str | Path, tokenizer, stop_ids: list[int]):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.context_length = config["model"].get("context_length")

    @classmethod
    def from_pretrained(cls, path: str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        config = json.loads((Path(path) / "genai_config.json").read_text())
        return cls(path, tokenizer, stop_token_ids(tokenizer, config["model"].get("eos_token_id")))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        og = self.og
        gens: list[Any] = []
        for r in requests:
            if refused := [name for name in r.extras() if name not in self.supports]:
                raise ValueError(f"the onnx engine does not implement {', '.join(refused)}")
            params = og.GeneratorParams(self.model)
            opts: dict[str, Any] = {"max_length": len(r.ids) + max(r.max_new_tokens, 1), "do_sample": r.temperature > 0}
            if r.repetition_penalty != 1.0:
                opts.update(repetition_penalty=r.repetition_penalty)
            if r.temperature > 0:
                opts.update(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
                if r.seed is not None:
                    opts.update(random_seed=r.seed)
            params.set_search_options(**opts)
            gen = og.Generator(self.model, params)
            gen.append_tokens([r.ids])
            gens.append(gen)
        results = [GenResult() for _ in requests]
        active = [r.max_new_tokens > 0 for r in requests]
        while any(active):
            for i, (r, gen) in enumerate(zip(requests, gens)):
                if not active[i]:
                    continue
                if gen.is_done():
                    active[i] = False
                    continue
                logits = gen.get_logits() if r.logprobs is not None or r.logit_bias else None
                if r.logit_bias:
                    shifted = logits.copy()
                    shifted[..., list(r.logit_bias)] += list(r.logit_bias.values())
                    gen.set_logits(shifted)
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                if r.logprobs is not None:
                    results[i].logprobs.append(_numpy_logprob(logits.reshape(-1), tok, r.logprobs))
                active[i] = take_token(results[i], r, tok, self.stop_ids)
        return results


def _numpy_logprob(logits, tok: int, n: int) -> Logprob:
    """`tok`'s logprob and the `n` most likely tokens' from raw logits: their log-softmax (as TorchEngine's)."""
    import numpy as np

    logp = logits.astype(np.float64) - logits.max()
    logp -= np.log(np.exp(logp).sum())
    top = np.argpartition(-logp, n)[:n] if n else []
    top = sorted(top, key=lambda t: -logp[t])
    return Logprob(tok, float(logp[tok]), [(int(t), float(logp[t])) for t in top])
