"""A template's reasoning markers may be special tokens (Apertus' `<|inner_prefix|>` R `<|inner_suffix|>`, Seed-OSS's
`<seed:think>`, `<think>` where a tokenizer has it special): a reply's text keeps them, as it keeps Gemma 4's string
quote, so that its reasoning is split off as where they are text, in the server's replies streamed and not and in what
evaluation scores. They were dropped with the other special tokens, and the reasoning came back in the content (or,
where the prompt opens the block, the answer in the reasoning). Neither shows the markers, and a marker stays out of
the stop tokens and is trained as before. Replies are planted as token ids and decoded as the engine's are; no model
runs."""

from __future__ import annotations

import copy

import pytest

from conftest import tokenizer_for
from test_reasoning_split_open_prompt import reasoning_and_content

REASONING, ANSWER = "Two plus two: count on from two, three, four.", "The answer is 4."
ASK = [{"role": "user", "content": "What is 2+2?"}]
# Apertus' layout, written short: the reasoning between two special tokens, nothing else beside them
INNER = ("{% for m in messages %}<|{{ m.role }}_start|>"
         "{% if m.role == 'assistant' and m.reasoning_content %}<|inner_prefix|>{{ m.reasoning_content }}"
         "<|inner_suffix|>{% endif %}{{ m.content }}<|{{ m.role }}_end|>{% endfor %}"
         "{% if add_generation_prompt %}<|assistant_start|>{% endif %}")
TURNS = ["<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]
# template -> its reasoning markers, and the reply its model writes (with reasoning)
TEMPLATES = {"inner": (["<|inner_prefix|>", "<|inner_suffix|>"],
                       f"<|inner_prefix|>{REASONING}<|inner_suffix|>{ANSWER}"),
             "qwen3.jinja": (["<think>", "</think>"], f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"),
             # the prompt opens the block: the reply begins in the reasoning
             "deepseek_r1_distill.jinja": (["<think>", "</think>"], f"{REASONING}\n</think>\n\n{ANSWER}")}


def marked(base, name: str, special: bool):
    """SmolLM2's tokenizer with the template, its reasoning markers added as special tokens or as plain ones."""
    if name == "inner":
        tok = copy.deepcopy(base)
        tok.add_special_tokens({"additional_special_tokens": TURNS})
        tok.chat_template, tok.name_or_path = INNER, name
    else:
        tok = tokenizer_for(base, name)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(marker, special=special) for marker in TEMPLATES[name][0]], special_tokens=special)
    return tok


class PlantedEngine:
    """An engine whose every reply is the tokens of `reply` and a stop token, taken as the torch engine takes
    them: the server decodes them as it decodes a model's."""

    name, supports, joinable, context_length = "planted", frozenset(), False, None

    def __init__(self, tokenizer, reply: str):
        from sftlab.serve.generation import stop_token_ids

        self.tokenizer, self.stop_ids = tokenizer, set(stop_token_ids(tokenizer))
        self.tokens = [*tokenizer(reply, add_special_tokens=False)["input_ids"], min(self.stop_ids)]

    def generate(self, requests):
        from sftlab.serve.generation import GenResult, take_token

        results = [GenResult() for _ in requests]
        for request, result in zip(requests, results):
            for token in self.tokens:
                if not take_token(result, request, token, self.stop_ids):
                    break
        return results


def served(tok, reply: str, stream: bool) -> tuple[str, str]:
    """(reasoning_content, content) of the server's reply (streamed: its deltas joined)."""
    import openai
    from fastapi.testclient import TestClient

    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.openai_api import create_app

    backend = BatchingBackend(PlantedEngine(tok, reply))
    try:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0,
                               http_client=TestClient(create_app(backend, "tiny")))
        return reasoning_and_content(client.chat.completions.create(model="tiny", messages=ASK, stream=stream))
    finally:
        backend.close()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("special", [False, True], ids=["text", "special"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_reasoning_is_split_off_whether_its_markers_are_special_or_not(tokenizer, name, special, stream):
    tok = marked(tokenizer, name, special)
    assert served(tok, TEMPLATES[name][1], stream) == (REASONING, ANSWER)


@pytest.mark.parametrize("special", [False, True], ids=["text", "special"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_evaluation_scores_the_answer_alone(tokenizer, name, special):
    from sftlab.evaluation.generate import answers

    tok = marked(tokenizer, name, special)
    assert answers(tok, [tok(TEMPLATES[name][1], add_special_tokens=False)["input_ids"]], [ASK]) == [ANSWER]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_without_reasoning_is_the_content(tokenizer, stream):
    """Qwen 3 writes an empty block before an answer without reasoning: it is not sent."""
    tok = marked(tokenizer, "qwen3.jinja", True)
    assert served(tok, f"<think>\n\n</think>\n\n{ANSWER}", stream) == ("", ANSWER)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_layout_and_the_stop_tokens_are_those_of_the_markers_as_text(tokenizer, name):
    """The layout is read the same; the stop tokens are the same and none is a marker."""
    from sftlab.serve.generation import stop_token_ids
    from sftlab.serve.reasoning import answer_layout

    text, special = (marked(tokenizer, name, flag) for flag in (False, True))
    assert answer_layout(special) == answer_layout(text)
    assert answer_layout(special).closer.strip()
    stops = stop_token_ids(special)
    assert stops == stop_token_ids(text)
    assert not set(stops) & set(special.convert_tokens_to_ids(TEMPLATES[name][0]))


@pytest.mark.parametrize("name", ["inner", "qwen3.jinja"])  # DeepSeek-R1 distills train no reasoning
def test_training_is_the_same_whether_the_markers_are_special_or_not(tokenizer, name):
    """The same tokens, and the same ones trained (the markers with the reasoning), special or not."""
    from sftlab.data.conversation import Conversation
    from sftlab.data.render import IGNORE, render

    conv = Conversation([*ASK, {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}], source="t")
    text, special = (render(conv, marked(tokenizer, name, flag)) for flag in (False, True))
    assert (list(special.input_ids), list(special.labels)) == (list(text.input_ids), list(text.labels))
    markers = set(marked(tokenizer, name, True).convert_tokens_to_ids(TEMPLATES[name][0]))
    assert markers <= {t for t, label in zip(special.input_ids, special.labels) if label != IGNORE}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_gemma_4_s_channel_is_read_with_both_its_tokens(tokenizer, stream):
    """Gemma 4 writes `<|channel>thought` R `<channel|>` A, its tokens special: the closer is nothing else, so both
    are kept, and an answer that begins with the word `thought` is not taken for reasoning."""
    tok = tokenizer_for(tokenizer, "gemma4_v5.jinja")
    assert served(tok, f"<|channel>thought\n{REASONING}\n<channel|>{ANSWER}", stream) == (REASONING, ANSWER)
    assert served(tok, f"thought\n{ANSWER}", stream) == ("", f"thought\n{ANSWER}")
