"""A streamed chat reply sends its reasoning as `reasoning_content` deltas as it is generated, as vLLM does:
only a tail that may still become the template's opener or the reasoning's closer (`</th` of `</think>`) is
held back. Joined, the deltas are the reasoning and the content of the reply sent whole, in every layout the
templates write, fed a token at a time as the engine decodes it. Replies are planted; no model runs."""

from __future__ import annotations

import pytest

from conftest import ScriptedBackend, tokenizer_for

REASONING = "Is 2 < 3? Yes: I assist </b> here, so two plus two is four."  # `<`, `</`, `assist`: closers' starts
ANSWER = "The answer is 4."
ASK = [{"role": "user", "content": "What is 2+2?"}]
OPENED = f"{REASONING}\n</think>\n\n{ANSWER}"  # where the prompt opens the block
TEMPLATES = ["qwen3.jinja", "qwen3_5_think.jinja", "glm4moe.jinja", "nemotron_3_nano.jinja", "gptoss.jinja",
             "lfm2_2_5_v2.jinja", "deepseek_r1_distill.jinja", "chatml", "llama3_1.jinja"]


class TokenBackend(ScriptedBackend):
    """Sends its reply a token at a time, as the engine decodes it (`streams=False`: all at the end, as Triton)."""

    def __init__(self, tokenizer, reply: str, streams: bool = True):
        super().__init__(tokenizer, reply)
        self.streams = streams

    async def generate(self, *, ids, on_text=None, **kwargs):
        from sftlab.serve.backends import Completion

        for piece in token_pieces(self.tokenizer, self.reply) if self.streams and on_text else ():
            on_text(piece)
        return Completion(self.reply, "stop", len(ids), 30)


def token_pieces(tok, text: str) -> list[str]:
    from sftlab.serve.generation import IncrementalDecoder

    decoder = IncrementalDecoder(tok)
    pieces = [p for t in tok(text, add_special_tokens=False)["input_ids"] if (p := decoder.add(t))]
    assert "".join(pieces) == text
    return pieces


def client(tok, reply: str, streams: bool = True):
    import openai
    from fastapi.testclient import TestClient

    from sftlab.serve.openai_api import create_app

    http = TestClient(create_app(TokenBackend(tok, reply, streams), "tiny"))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)


def streamed(tok, reply: str, streams: bool = True, **request) -> list[tuple[str, str]]:
    """The (reasoning_content, content) of each chunk the server streams (chunks with neither left out)."""
    chunks = client(tok, reply, streams).chat.completions.create(model="tiny", messages=ASK, stream=True, **request)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return [pair for d in deltas if any(pair := (d.model_extra.get("reasoning_content") or "", d.content or ""))]


def replies(tok) -> dict[str, str]:
    """What training teaches the template's model to write, with reasoning and without, and cut off inside its
    reasoning and inside the closer."""
    from sftlab.serve.generation import trained_reply

    def reply(**reasoning) -> str | None:
        return trained_reply(tok, [*ASK, {"role": "assistant", "content": ANSWER, **reasoning}], "the test")

    thought = reply(reasoning_content=REASONING)
    thought = thought if thought and REASONING in thought else OPENED  # DeepSeek-R1 trains no reasoning; chatml none
    end = thought.index(REASONING) + len(REASONING)
    closer = end + len(thought[end:]) - len(thought[end:].lstrip())
    return {"reasoning": thought, "plain": reply() or ANSWER, "cut off": thought[:end - 20],
            "cut in closer": thought[:closer + 3]}


@pytest.mark.parametrize("name", TEMPLATES)
def test_streamed_reasoning_and_content_join_to_the_reply_sent_whole(tokenizer, name):
    tok = tokenizer_for(tokenizer, name)
    for kind, reply in replies(tok).items():
        message = client(tok, reply).chat.completions.create(model="tiny", messages=ASK).choices[0].message
        pairs = streamed(tok, reply)
        reasoning, content = ("".join(part) for part in zip(*pairs)) if pairs else ("", "")
        assert (reasoning, content) == (message.model_extra.get("reasoning_content") or "", message.content), kind
        told = [k for k, (r, _) in enumerate(pairs) if r]
        assert not reasoning or len(told) > 1, kind  # in deltas, not whole
        assert not told or not any(c for _, c in pairs[:told[-1] + 1]), kind  # all before the answer


def feed(layout, pieces: list[str]) -> list[tuple[str | None, str]]:
    from sftlab.serve.reasoning import ReasoningStream

    stream = ReasoningStream(layout)
    return [stream.feed(piece) for piece in pieces]


@pytest.mark.parametrize("name, pieces, said", [
    ("qwen3.jinja", ["<th", "ink>\n", "Two <", " three", "\n<", "/th", "ink", ">\n\n", "4"],
     [None, None, "Two", " < three", None, None, None, None, None]),
    ("deepseek_r1_distill.jinja", ["Two", " </", "b> three", "\n</", "think", ">", "\n\n4"],
     ["Two", None, " </b> three", None, None, None, None]),
    ("gptoss.jinja", ["anal", "ysis", "I assist", "ant", " you", "assist", "antfinal", "4"],
     [None, None, "I", None, " assistant you", None, None, None]),
])
def test_reasoning_is_sent_before_the_closer_arrives_and_a_split_closer_is_held_back(tokenizer, name, pieces, said):
    """Each piece's reasoning is sent as it comes, but for a tail that may still become the closer (or, before
    the reply's layout is settled, the opener): it goes out once more text shows it is not one."""
    from sftlab.serve.reasoning import answer_layout

    out = feed(answer_layout(tokenizer_for(tokenizer, name)), pieces)
    assert [thought for thought, _ in out] == said
    assert [answer for _, answer in out] == [""] * (len(pieces) - 1) + ["4"]


def test_a_backend_that_does_not_stream_sends_the_reasoning_whole_then_the_answer(tokenizer):
    tok = tokenizer_for(tokenizer, "qwen3.jinja")
    assert streamed(tok, f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", streams=False) == [(REASONING, ""),
                                                                                         ("", ANSWER)]


def test_calls_after_streamed_reasoning(tokenizer):
    tok = tokenizer_for(tokenizer, "qwen3.jinja")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = list(client(tok, f"<think>\n{REASONING}\n</think>\n\n{call}").chat.completions.create(
        model="tiny", messages=ASK, tools=tools, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == REASONING
    assert not any(d.content for d in deltas)
    (called,) = [c for d in deltas for c in d.tool_calls or ()]
    assert called.function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_long_reasoning_is_searched_for_its_closer_once_not_again_with_every_piece(monkeypatch):
    """The closer was looked for from the reasoning's start at every piece (a reasoning of 90k characters in
    8-character pieces: 0.8 ms a piece, 11 s a reply); now each search starts where the last one could not
    have missed it, and the deltas are the same."""
    from sftlab.serve import reasoning
    from sftlab.serve.reasoning import AnswerLayout, ReasoningStream

    scanned = []
    real = reasoning.template_pattern

    class Counted:
        def __init__(self, text):
            self.pattern = real(text)

        def search(self, text, pos=0):
            scanned.append(len(text) - pos)
            return self.pattern.search(text, pos)

        def match(self, text):
            return self.pattern.match(text)

    monkeypatch.setattr(reasoning, "template_pattern", Counted)
    thought = "".join(f"step {i}: carried over, and checked. " for i in range(300))
    pieces = [thought[i:i + 8] for i in range(0, len(thought), 8)] + ["\n</th", "ink>\n\n", ANSWER, " Done."]
    stream = ReasoningStream(AnswerLayout(opener="<think>", closer="</think>", opened=True))
    deltas = [stream.feed(p) for p in pieces]
    assert "".join(r or "" for r, _ in deltas) == thought.strip() and "".join(a for _, a in deltas) == f"{ANSWER} Done."
    assert sum(scanned) < 4 * len(thought)  # from the start each time: ~len(thought)**2 / 16
