"""OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions (with SSE streaming),
/v1/completions, /v1/models, /health. Errors use OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}` so official clients raise the right exception.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from sftlab.errors import RecordError, SftlabError
from sftlab.serve.generation import GenRequest, Logprob, StopText, encode, json_grammar, render
from sftlab.serve.guard import (GuardLimits, add_request_guard, encodable, error_response, http_error_handler,
                                validation_error_handler, warn_if_exposed)
from sftlab.serve.reasoning import AnswerLayout, ReasoningStream, reply_layout
from sftlab.serve.tool_calls import CallParser, call_parser


@dataclass
class Limits(GuardLimits):
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None  # a list of text parts, as the OpenAI SDK and LangChain send
    tool_calls: list[dict] | None = None  # an assistant turn's calls, sent back in a conversation
    function_call: dict | None = None  # the older single call
    tool_call_id: str | None = None  # a tool result's call
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, value):
        return encodable("".join(p.text for p in value) if isinstance(value, list) else value)

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.function_call)):
            raise ValueError(f"content is required ({self.role} message without tool calls)")
        return self


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: dict

    @field_validator("function")
    @classmethod
    def _named(cls, value):
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise ValueError("a tool's function needs a name")
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchema(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict | bool = Field(alias="schema")
    strict: bool | None = None  # the reply follows the schema either way


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON that follows a schema (checked here: an
    invalid one is a 400 naming response_format)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _compiles(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema: {"name", "schema"}')
        if (schema := self.schema_text()) is not None:
            try:
                json_grammar(schema)
            except ValueError as e:
                raise ValueError(f"invalid JSON schema: {e}") from e
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the reply is constrained to, as JSON text; None for free text."""
        if self.type == "json_object":
            return '{"type": "object"}'
        return json.dumps(self.json_schema.schema_) if self.type == "json_schema" else None


# OpenAI's (and vLLM's) parameters this server does not implement, with the values that leave the answer
# as it would be without them: any other value is refused (400) rather than ignored, since it would change
# the answer. Other unknown fields (`user`, `metadata`, `store`, ...) are accepted and ignored.
UNSUPPORTED = {
    "parallel_tool_calls": (None, True),
    "function_call": (None, "auto", "none"),  # the older tool_choice
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept in model_extra, for check_supported
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the text ends before the first one")
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, description="token id (a string in JSON) to -100..100")
    top_k: int | None = Field(None, ge=-1, description="vLLM's: sample among the k most likely tokens (0, -1: all)")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    response_format: ResponseFormat | None = None

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """OpenAI takes `null` for these (some clients send it for "not set"): the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value):
        if value and not all(-100 <= bias <= 100 and tok >= 0 for tok, bias in value.items()):
            raise ValueError("logit_bias maps token ids to biases in -100..100")
        return value

    def check_supported(self) -> None:
        """Refuse (400) a parameter in UNSUPPORTED set to a value that would change the answer."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server: leave it out",
                               param=name, code="unsupported_value")

    def logprob_count(self) -> int | None:
        """How many alternatives each token's logprob comes with (None: no logprobs)."""
        return None

    def sampling(self) -> dict:
        """GenRequest's parameters of SAMPLING that this request sets to other than their defaults."""
        values = {name: getattr(self, name) for name in ("presence_penalty", "frequency_penalty", "logit_bias",
                                                         "min_p", "repetition_penalty")}
        values |= {"top_k": max(self.top_k or 0, 0), "logprobs": self.logprob_count(),  # vLLM's top_k -1: all
                   "json_schema": self.response_format and self.response_format.schema_text()}
        request = GenRequest([], 1, **{name: value for name, value in values.items() if value is not None})
        return {name: getattr(request, name) for name in request.extras()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return encodable(stops)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = Field(
        None, description="auto (the model decides) or none (no tools offered); forcing a call is not supported")
    functions: list | None = Field(None, description="the older form of tools: refused, so it is not ignored")

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value):
        if value:
            raise ValueError("the older 'functions' parameter is not supported: send them as 'tools'")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        """The messages as chat templates take them (a call's JSON-string arguments as an object)."""
        from sftlab.data.tools import tool_calls

        out = []
        for k, m in enumerate(self.messages):
            message = {"role": m.role, "content": m.content or ""}
            message |= {key: value for key in ("tool_call_id", "name") if (value := getattr(m, key))}
            if m.tool_calls or m.function_call:
                message["tool_calls"] = tool_calls(m.model_dump(), "the request", f"message {k + 1}")
            out.append(message)
        return out

    def offered_tools(self) -> list[dict] | None:
        return [t.model_dump() for t in self.tools] if self.tools and self.tool_choice != "none" else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    def logprob_count(self) -> int | None:
        return self.logprobs

    _check_prompt = field_validator("prompt")(encodable)


def create_app(backend, model_name: str, *, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="sftlab OpenAI-compatible server")
    tokenizer = backend.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)

    add_request_guard(app, prefix="/v1/", api_key=api_key, limits=limits)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "sftlab"}]}

    def _max_tokens(req: _Sampling) -> int:
        value = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if value > limits.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param} is {value}; this server allows at most {limits.max_tokens_limit}",
                           param=param, code="max_tokens_too_large")
        return value

    def _check_prompt(ids: list[int], max_tokens: int, param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty (this tokenizer adds no token of its own)", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server allows at most "
                                f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        context = getattr(backend, "context_length", None)
        if context and len(ids) + max_tokens > context:
            raise APIError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed the model's "
                                f"context of {context} tokens", param=param, code="context_length_exceeded")

    def _sampling(req: _Sampling) -> dict:
        """The backend's parameters; one it does not implement (its `supports`) is refused (400) naming it."""
        extras = req.sampling()
        for name in extras:
            if name not in getattr(backend, "supports", ()):
                param = "response_format" if name == "json_schema" else name
                value = json.dumps(req.model_dump(mode="json", by_alias=True, exclude_none=True)[param])
                raise APIError(400, f"{param}={value} is not supported by this server's "
                                    f"{getattr(backend, 'name', '')} backend: leave it out",
                               param=param, code="unsupported_value")
        if any(tok >= len(tokenizer) for tok in extras.get("logit_bias", ())):
            raise APIError(400, f"logit_bias names a token id beyond this model's {len(tokenizer)} tokens",
                           param="logit_bias")
        return dict(max_tokens=_max_tokens(req), temperature=req.temperature, top_p=req.top_p, stop=req.stop or [],
                    seed=req.seed, **extras)

    def _token(tok: int) -> tuple[str, list[int]]:
        text = tokenizer.decode([tok])
        return text, list(text.encode("utf-8"))

    def _chat_logprobs(entries: list[Logprob]) -> dict:
        """OpenAI's chat `logprobs`: each token's text (decoded alone), its UTF-8 bytes and logprob, and its top
        alternatives."""
        def one(tok: int, logprob: float) -> dict:
            text, raw = _token(tok)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def _completion_logprobs(entries: list[Logprob], offset: int) -> dict:
        """OpenAI's completions `logprobs`; `text_offset`s count from `offset` in the completion's text. Each
        token's `top_logprobs` holds the chosen token too (up to logprobs + 1 entries, as OpenAI's)."""
        tokens = [_token(e.token)[0] for e in entries]
        offsets = [offset + sum(map(len, tokens[:k])) for k in range(len(tokens))]
        top = [{_token(t)[0]: lp for t, lp in e.top} | {text: e.logprob} for text, e in zip(tokens, entries)]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}

    def _check_model(model_id: str | None) -> None:
        """A request for another model than the one served is a 404, as OpenAI and vLLM answer it: a client
        pointed at the wrong server finds out (`model` may be left out)."""
        if model_id is not None and model_id != model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        _check_model(model_id)
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "sftlab"}

    # probed at the first request with tools: whether the chat template writes a tools list, and the
    # layout it writes calls in (None: one the server cannot read, so replies stay text)
    tool_support: dict = {}

    def _check_tools(messages: list[dict], tools: list[dict]) -> None:
        """Tools are offered to a model whose template writes them, or writes calls in a layout the server reads
        though no tools list (DeepSeek V3's: training takes such calls without one, so its models call the tools
        they learned): the request's tools are then left out of the prompt, and the reply's calls still come back
        as tool_calls. Either finding is told once."""
        if "writes" not in tool_support:
            from sftlab.data.render import template_writes_tools

            tool_support["writes"] = template_writes_tools(tokenizer, messages, tools)
            tool_support["parser"] = call_parser(tokenizer)
            if tool_support["parser"] is None and tool_support["writes"]:
                print("warning: this model's chat template writes tool calls in a layout the server cannot read "
                      "(docs/deploy.md): replies to requests with tools come back as text, as generated",
                      file=sys.stderr)
            elif tool_support["parser"] is not None and not tool_support["writes"]:
                print("note: this model's chat template writes no tools list: the tools a request offers are not in "
                      "its prompt (the model calls those it was trained on); its calls come back as tool_calls",
                      file=sys.stderr)
        if not tool_support["writes"] and tool_support["parser"] is None:
            raise APIError(400, "this model's chat template does not write tools, so it cannot be offered any: "
                                "serve a model trained with a template that does (e.g. model.chat_template: chatml)",
                           param="tools")

    def _calls(text: str, tools) -> tuple[str | None, list[dict]]:
        parser: CallParser | None = tool_support.get("parser") if tools else None
        return parser.parse(text, tools) if parser else (text, [])

    def _reply(text: str, layout: AnswerLayout | None, tools) -> tuple[str | None, str | None, list[dict]]:
        """(reasoning, content, calls) of a finished reply: a chat reply's reasoning split off first."""
        reasoning, answer = layout.split(text) if layout else (None, text)
        return reasoning, *_calls(answer, tools)

    def _check_format(tools, layout: AnswerLayout) -> None:
        """response_format constrains a reply from its first token, so not one that may be tool calls; a reply that
        begins in the reasoning its prompt opens, from the reasoning's closer on (`json_after`), on a backend that
        can (a template that merely may write reasoning first writes none)."""
        if tools:
            raise APIError(400, "response_format cannot be combined with tools: the reply would have to be the "
                                "schema's JSON, never a call; leave out one of them", param="response_format")
        if layout.opened and "json_after" not in getattr(backend, "supports", ()):
            raise APIError(400, "response_format is not supported with this model's chat template by this server's "
                                f"{getattr(backend, 'name', '')} backend: the prompt opens a reasoning block, and only "
                                "the torch backend constrains the reply after it; leave out response_format",
                           param="response_format")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(req.model)
        req.check_supported()
        tools = req.offered_tools()
        try:
            messages = req.template_messages()
            if tools:
                _check_tools(messages, tools)
            text = render(tokenizer, messages, tools)
            ids = encode(tokenizer, messages=messages, tools=tools, text=text)
            layout = reply_layout(tokenizer, messages, tools, prompt=text)
        except RecordError as e:  # a call sent back whose arguments are not an object
            raise APIError(400, e.reason, param="messages") from e
        except SftlabError as e:  # the template raised while checking that it writes tools
            raise APIError(400, str(e), param="messages") from e
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        except TemplateError as e:  # raise_exception() in the template, or the sandbox's SecurityError
            raise APIError(400, f"the chat template failed: {e}", param="messages") from e
        kwargs = dict(ids=ids, messages=messages, tools=tools, **_sampling(req))
        if "json_schema" in kwargs:
            _check_format(tools, layout)
            if layout.opened:  # the JSON follows the reasoning the prompt opens
                kwargs["json_after"] = layout.closer
        _check_prompt(ids, kwargs["max_tokens"], "messages")
        return await _respond(req, request, kwargs, chat=True, layout=layout)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model)
        req.check_supported()
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send exactly one prompt per request", param="prompt")
        ids = encode(tokenizer, prompt=prompts[0])
        kwargs = dict(ids=ids, prompt=prompts[0], **_sampling(req))
        _check_prompt(ids, kwargs["max_tokens"], "prompt")
        return await _respond(req, request, kwargs, chat=False)

    def _usage(out) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    async def _respond(req: _Sampling, request: Request, kwargs: dict, *, chat: bool,
                       layout: AnswerLayout | None = None):
        """`layout`: where a chat reply's reasoning is, for its own prompt (None for a completion)."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(rid, created, kwargs, chat, usage, layout),
                                     media_type="text/event-stream")
        task = asyncio.ensure_future(backend.generate(**kwargs))
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():  # nobody will read the answer: stop computing it
                task.cancel()
                return Response(status_code=499)
        out = task.result()
        reasoning, content, calls = _reply(out.text, layout, kwargs.get("tools"))
        message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {}) | (
            {"reasoning_content": reasoning} if reasoning else {})
        logprobs = None if out.logprobs is None else (
            _chat_logprobs(out.logprobs) if chat else _completion_logprobs(out.logprobs, 0))
        choice = {"index": 0, "message": message} if chat else {"index": 0, "text": out.text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = "tool_calls" if calls else out.finish_reason
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": _usage(out)}

    async def _stream(rid: str, created: int, kwargs: dict, chat: bool, usage: bool, layout: AnswerLayout | None):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(backend.generate(
            **kwargs, on_text=lambda text, logprobs=(): loop.call_soon_threadsafe(pieces.put_nowait, (text, logprobs))))
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        told, offset = 0, 0  # logprobs: how many were sent, where the next one's text begins

        def fresh(entries: list[Logprob]) -> list[Logprob] | None:
            """The logprobs of `entries` not sent yet, to send now (None: none)."""
            nonlocal told
            new, told = entries[told:], max(told, len(entries))
            return new or None

        def chunk(text: str | None, finish: str | None = None, first: bool = False, calls: list | None = None,
                  reasoning: str | None = None, logprobs: list[Logprob] | None = None, **extra) -> str:
            nonlocal offset
            if "usage" in extra:
                choices = []
            elif chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {}) | (
                    {"reasoning_content": reasoning} if reasoning else {})
                if calls:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                choices = [{"index": 0, "delta": delta, "logprobs": logprobs and _chat_logprobs(logprobs),
                            "finish_reason": finish}]
            else:
                formatted = logprobs and _completion_logprobs(logprobs, offset)
                offset += sum(map(len, formatted["tokens"])) if formatted else 0
                choices = [{"index": 0, "text": text or "", "logprobs": formatted, "finish_reason": finish}]
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        # with tools, text from where calls begin (`<tool_call>`, ...) is held back: it becomes the calls at
        # the end; so is trailing whitespace, which the content before a call does not keep
        parser = tool_support.get("parser") if kwargs.get("tools") else None
        tools = kwargs.get("tools") if parser is not None else None
        content, held = StopText(parser.openers if tools else []), ""
        # a reasoning the model writes first (in its template's layout) is sent as it grows, before the answer
        thinking = ReasoningStream(layout) if layout else None
        try:
            if chat:
                yield chunk(None, first=True)
            streamed, got = "", []  # got: the logprobs that came with the pieces
            while (item := await pieces.get()) is not None:
                piece, entries = item
                got += entries
                if thinking:
                    thought, piece = thinking.feed(piece)
                    if thought:
                        yield chunk(None, reasoning=thought)
                visible = held + content.feed(piece)
                if tools:
                    visible, held = visible.rstrip(), visible[len(visible.rstrip()):]
                if visible:
                    streamed += visible
                    yield chunk(visible, logprobs=fresh(got))
            out = task.result()
            reasoning, text, calls = _reply(out.text, layout, tools)
            # what was held back (a cut-off reasoning's tail, trailing whitespace), or a backend that does not stream
            if rest := _unsent(reasoning or "", thinking.reasoning if thinking else ""):
                yield chunk(None, reasoning=rest)
            if rest := _unsent(text or "", streamed):
                yield chunk(rest, logprobs=fresh(out.logprobs or []))
            if calls:
                yield chunk(None, calls=calls)
            yield chunk(None, "tool_calls" if calls else out.finish_reason, logprobs=fresh(out.logprobs or []))
            if usage:
                yield chunk(None, usage=_usage(out))
        except Exception as e:  # headers are sent already: report in-band like OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        finally:
            task.cancel()  # a client gone mid-stream cancels its request in the engine too
        yield "data: [DONE]\n\n"

    return app


def _unsent(whole: str, sent: str) -> str:
    """The rest of `whole` after what was streamed of it ('' where that is not its start)."""
    return whole[len(sent):] if whole.startswith(sent) else ""


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, keep_alive_timeout: int = 5,
                  header_timeout: float = 10.0, max_connections: int = 512, log_level: str = "info"):
    """uvicorn settings against slow clients: a connection whose request headers are not in
    `header_timeout` s after it opens (or after its previous response) is closed (slowloris),
    idle keep-alive connections close after `keep_alive_timeout` s, request lines + headers are
    capped at 16 KiB (h11), requests on connections beyond `max_connections` get 503, and a
    stop waits at most 10 s for open streams."""
    import uvicorn

    from sftlab.serve.connection import protocol_with_header_deadline

    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=protocol_with_header_deadline(header_timeout),
                          timeout_keep_alive=keep_alive_timeout, h11_max_incomplete_event_size=16 * 1024,
                          limit_concurrency=max_connections, timeout_graceful_shutdown=10)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
               **config) -> None:
    """Serve `app` with `server_config(**config)`; `api_key` only decides the warning for a
    reachable address without one."""
    import uvicorn

    warn_if_exposed(host, api_key)
    uvicorn.Server(server_config(app, host, port, **config)).run()
