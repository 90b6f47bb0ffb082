"""Templates whose generation prompt opens the reasoning block (DeepSeek-R1 distills' and Qwen 3.5's
`<think>\\n`) make the model begin its reply inside it, with no opening tag: the reasoning is what comes
before `</think>`, and a reply cut off before it is all reasoning with an empty answer, in evaluation's
predictions and in the server's replies, streamed or not. That is read off the end of each request's own
prompt, what the template adds for the reply: after a tool result DeepSeek's opens no block, and the reply is
all answer; a `<think>` a user writes is text. Replies are planted; no model runs."""

from __future__ import annotations

from importlib.resources import files

import pytest

from conftest import client_for, tokenizer_for
from sftlab.data.formats import to_conversation

REASONING, ANSWER = "Two plus two: count on from two, three, four.", "4"
REPLY = f"{REASONING}\n</think>\n\n{ANSWER}"
CUT_OFF = "Two plus two: count on from"
ASK = [{"role": "user", "content": "What is 2+2?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
SENT = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},  # as a client sends it
        {"role": "tool", "tool_call_id": "call_1", "content": "4"}]
TOLD = "The tool says 2+2 is 4."
AFTER_TOOL = to_conversation({"messages": [*SENT, {"role": "assistant", "content": TOLD}]}, "r:1").prompt_messages()
TEMPLATES = files("trl") / "chat_templates"
FAMILIES = ["deepseek_r1_distill", "deepseekv3", "nemotron_3_5_lightning", "nemotron_3_nano", "nemotron_3_super",
            "nemotron_3_ultra", "qwen3_5_think", "qwen3_6", "qwen3_8"]
OPENING = [f"{family}{kind}.jinja" for family in FAMILIES for kind in ("", "_training")]
REPORTED = ["deepseek_r1_distill.jinja", "qwen3_5_think.jinja"]
CLOSED = ["chatml", "qwen3.jinja", "qwen3_5_nothink.jinja", "glm4moe.jinja", "gptoss.jinja", "gemma4_v5.jinja"]


def test_the_vendor_templates_whose_prompt_opens_the_block(tokenizer):
    """Of every template that ships, those whose generation prompt ends inside `<think>`: the ones below."""
    opening = {p.name for p in TEMPLATES.iterdir() if p.name.endswith(".jinja") and
               tokenizer.apply_chat_template(ASK, chat_template=p.read_text(encoding="utf-8"), tokenize=False,
                                             add_generation_prompt=True).endswith("<think>\n")}
    assert opening == set(OPENING)


@pytest.mark.parametrize("name", OPENING + CLOSED)
def test_a_reply_to_a_prompt_that_opens_the_block_begins_in_the_reasoning(tokenizer, name):
    """Where the prompt opens the block the reply splits at `</think>` and one cut off is all reasoning;
    elsewhere such a reply is left whole, as before."""
    from sftlab.serve.reasoning import answer_layout

    layout = answer_layout(tokenizer_for(tokenizer, name))
    if name in OPENING:
        assert layout.split(REPLY) == (REASONING, ANSWER)
        assert layout.split(CUT_OFF) == (CUT_OFF, "")
    else:
        assert layout.split(REPLY) == (None, REPLY)
        assert layout.split(CUT_OFF) == (None, CUT_OFF)


@pytest.mark.parametrize("name", REPORTED)
def test_evaluation_scores_the_answer_alone(tokenizer, name):
    from sftlab.evaluation.generate import answers

    tok = tokenizer_for(tokenizer, name)
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in (REPLY, CUT_OFF)]
    assert answers(tok, ids, [ASK, ASK]) == [ANSWER, ""]


def serve(tok, reply: str, stream: bool, messages: list[dict] = ASK) -> tuple[str, str]:
    """(the reasoning_content, the content) the server sends for a planted reply to `messages` (streamed: the
    deltas of each joined)."""
    client, _ = client_for(tok, reply)
    return reasoning_and_content(client.chat.completions.create(model="tiny", messages=messages, stream=stream))


def reasoning_and_content(resp) -> tuple[str, str]:
    """(the reasoning_content, the content) of a chat completion, or of a stream of chunks (the deltas joined)."""
    if hasattr(resp, "choices"):
        message = resp.choices[0].message
        return message.model_extra.get("reasoning_content") or "", message.content
    deltas = [c.choices[0].delta for c in resp if c.choices]
    return ("".join(d.model_extra.get("reasoning_content") or "" for d in deltas),
            "".join(d.content or "" for d in deltas))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", REPORTED)
def test_the_server_sends_the_reasoning_as_reasoning_content(tokenizer, name, stream):
    tok = tokenizer_for(tokenizer, name)
    assert serve(tok, REPLY, stream) == (REASONING, ANSWER)
    assert serve(tok, CUT_OFF, stream) == (CUT_OFF, "")


def test_whether_a_prompt_opens_the_block_is_read_off_the_prompt(tokenizer):
    """DeepSeek-R1 distills open the block after a user turn, not after a tool result; Qwen 3.5's
    `enable_thinking=False` closes it in the prompt."""
    from sftlab.serve.reasoning import reply_layout

    deepseek, qwen = (tokenizer_for(tokenizer, name) for name in REPORTED)
    assert reply_layout(deepseek, ASK).opened and reply_layout(qwen, ASK).opened
    assert not reply_layout(deepseek, AFTER_TOOL).opened
    closed = qwen.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert not reply_layout(qwen, ASK, prompt=closed).opened


LITERAL = [{"role": "user", "content": "What does the <think> tag do? I never close it."}]


@pytest.mark.parametrize("name", ["qwen3.jinja", *REPORTED])
def test_a_user_s_own_think_tag_opens_no_block(tokenizer, name):
    """Only what the template adds for the reply opens the block: an unclosed `<think>` in a user message is
    text, where the prompt opens no block (Qwen 3; DeepSeek-R1 after a tool result) and where it opens one."""
    from sftlab.serve.reasoning import reply_layout

    tok = tokenizer_for(tokenizer, name)
    assert reply_layout(tok, LITERAL).opened == (name in REPORTED)
    after_tool = to_conversation({"messages": [*LITERAL, *SENT[1:], {"role": "assistant", "content": TOLD}]},
                                 "r:2").prompt_messages()
    assert reply_layout(tok, after_tool).opened == (name == "qwen3_5_think.jinja")  # it opens one after tools too


def test_a_template_may_open_the_block_after_a_tool_result_alone(tokenizer):
    import copy

    from sftlab.serve.reasoning import reply_layout

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% if messages[-1].role == 'tool' %}<think>\n{% endif %}{% endif %}")
    assert not reply_layout(tok, LITERAL).opened and reply_layout(tok, [*LITERAL, *SENT[1:]]).opened


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_to_a_user_s_own_think_tag_is_all_answer(tokenizer, stream):
    from sftlab.evaluation.generate import answers

    tok = tokenizer_for(tokenizer, "qwen3.jinja")
    assert serve(tok, TOLD, stream, LITERAL) == ("", TOLD)
    assert answers(tok, [tok(TOLD, add_special_tokens=False)["input_ids"]], [LITERAL]) == [TOLD]


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_to_a_prompt_that_opens_no_block_is_all_answer(tokenizer, stream):
    """After a tool result DeepSeek-R1 distills' prompt opens no `<think>`: a reply without `</think>` is the
    content, one that opens its own block splits at its end; after a user turn the reply splits at `</think>`."""
    tok = tokenizer_for(tokenizer, "deepseek_r1_distill.jinja")
    assert serve(tok, TOLD, stream, SENT) == ("", TOLD)
    assert serve(tok, f"<think>\n{REPLY}", stream, SENT) == (REASONING, ANSWER)
    assert serve(tok, REPLY, stream, ASK) == (REASONING, ANSWER)


def test_evaluation_reads_each_prompt(tokenizer):
    from sftlab.evaluation.generate import answers

    tok = tokenizer_for(tokenizer, "deepseek_r1_distill.jinja")
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in (TOLD, REPLY)]
    assert answers(tok, ids, [AFTER_TOOL, ASK]) == [TOLD, ANSWER]
