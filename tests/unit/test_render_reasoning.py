"""An answer's reasoning trace (`reasoning_content`, `reasoning` or `thinking` on an assistant message, as
distilled sets and the vendors' APIs write it) reaches the chat template under the name each template
reads, and is trained with the answer: everything the template writes after the generation prompt is
what the model generates. A template that writes no reasoning is an error, not answers trained without it."""

from __future__ import annotations

import pytest

from sftlab.data.formats import to_conversation
from sftlab.data.render import IGNORE, render
from sftlab.errors import RecordError, SftlabError
from conftest import tokenizer_for

REASONING = "Two plus two: count on from two, three, four."
# template -> the name its own data would use for the reasoning
WRITES_REASONING = {"qwen3.jinja": "reasoning_content", "qwen3_5_think.jinja": "reasoning_content",
                    "glm4moe.jinja": "reasoning_content", "nemotron_3_nano.jinja": "reasoning_content",
                    "gptoss.jinja": "thinking", "lfm2_2_5_v2.jinja": "reasoning"}


def record(key: str = "reasoning_content", reasoning=REASONING) -> dict:
    return {"messages": [{"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "4", key: reasoning}]}


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


@pytest.mark.parametrize("name", sorted(WRITES_REASONING))
@pytest.mark.parametrize("key", ["own", "reasoning_content", "reasoning", "thinking"])
def test_reasoning_is_trained_with_the_answer_under_any_of_its_names(tokenizer, name, key):
    tok = tokenizer_for(tokenizer, name)
    conv = to_conversation(record(WRITES_REASONING[name] if key == "own" else key), "r.jsonl:1")
    assert conv.messages[1]["reasoning_content"] == REASONING
    example = render(conv, tok)
    prompt = tok.apply_chat_template(conv.messages[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([conv.messages[0], {"role": "assistant", "content": "4",
                                                       WRITES_REASONING[name]: REASONING}], tokenize=False)
    assert full.startswith(prompt) and REASONING in full
    ids = tok(full, add_special_tokens=False)["input_ids"]
    eos = example.input_ids[len(ids):]  # an EOS where the template writes no end of turn (GLM)
    assert example.input_ids[:len(ids)] == ids and eos in ([], [tok.eos_token_id])
    # exactly what the template writes after the generation prompt (its trailing newline aside) is trained
    generated = full[len(prompt):]
    assert trained_text(tok, example) == generated.rstrip("\n") + tok.decode(eos)


@pytest.mark.parametrize("name", ["chatml", "gemma4.jinja"])  # Gemma 4 writes reasoning only beside tool calls
def test_a_template_that_writes_no_reasoning_is_an_error_not_answers_without_it(tokenizer, name):
    tok = tokenizer_for(tokenizer, name)
    with pytest.raises(SftlabError, match="does not write the reasoning of an answer .* would not be trained"):
        render(to_conversation(record(), "r.jsonl:1"), tok)
    render(to_conversation({"messages": record()["messages"][:1] + [{"role": "assistant", "content": "4"}]},
                           "r.jsonl:2"), tok)  # without reasoning it renders


def test_reasoning_that_is_not_text_is_a_record_error():
    with pytest.raises(RecordError, match=r"r.jsonl:1: .*'thinking' must be text, got list"):
        to_conversation(record("thinking", ["a", "b"]), "r.jsonl:1")
    assert "reasoning_content" not in to_conversation(record("reasoning", "  "), "r.jsonl:1").messages[1]


def generated(tok, conv) -> str:
    """What training teaches for the conversation's last turn, decoded as a reply is (stops left out)."""
    from sftlab.serve.generation import IncrementalDecoder, stop_token_ids

    example, stops, decoder = render(conv, tok), set(stop_token_ids(tok)), IncrementalDecoder(tok)
    return "".join(decoder.add(t) for t, label in zip(example.input_ids, example.labels)
                   if label != IGNORE and t not in stops)


@pytest.mark.parametrize("name", sorted(WRITES_REASONING))
def test_a_reply_splits_into_the_reasoning_and_the_answer_in_the_template_s_layout(tokenizer, name):
    """What the model learns to write, with reasoning and without (Qwen 3's empty think block, gpt-oss's
    final channel), reads back as exactly the reasoning and the answer: evaluation scores the answer
    and the server sends it as the content."""
    from sftlab.serve.reasoning import answer_layout

    tok = tokenizer_for(tokenizer, name)
    layout = answer_layout(tok)
    with_reasoning = generated(tok, to_conversation(record(), "r.jsonl:1"))
    assert layout.split(with_reasoning) == (REASONING, "4")
    plain = to_conversation({"messages": record()["messages"][:1] + [
        {"role": "assistant", "content": "The answer is 4."}]}, "r.jsonl:2")
    prompt = tok.apply_chat_template(plain.messages[:1], tokenize=False, add_generation_prompt=True)
    # where training writes an answer without reasoning after the generation prompt (Nemotron 3's prompt ends
    # in <think>, its answers follow <think></think>)
    if tok.apply_chat_template(plain.messages, tokenize=False).startswith(prompt):
        assert layout.split(generated(tok, plain)) == (None, "The answer is 4.")
    # cut off inside its reasoning (at once where the prompt opens the block): no answer yet
    assert layout.split(with_reasoning[:with_reasoning.index(REASONING) + 9]) == (REASONING[:9].strip(), "")


@pytest.mark.parametrize("name", ["chatml", "llama3_1.jinja"])
def test_a_template_without_reasoning_leaves_a_reply_whole(tokenizer, name):
    from sftlab.serve.reasoning import answer_layout

    assert answer_layout(tokenizer_for(tokenizer, name)).split(" <think>x</think> 4 ") == (None, " <think>x</think> 4 ")
