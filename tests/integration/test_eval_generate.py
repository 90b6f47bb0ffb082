"""Batched generation: same greedy tokens as one prompt at a time; stop tokens from the template."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sftlab.evaluation.generate import generate_batch, generate_ids, stop_token_ids

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "templates"
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def varied_model(tokenizer):
    """A tiny random Llama with untied, larger weights, so greedy outputs vary by prompt
    (the tied default model repeats one token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


PROMPTS = [[{"role": "user", "content": "word " * n + "end"}] for n in (1, 7, 2, 15, 3, 40, 4, 9, 0)]
PROMPTS.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}])


def test_batched_greedy_equals_one_by_one(varied_model, tokenizer):
    batched = generate_ids(varied_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    single = [generate_ids(varied_model, tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert len({tuple(x) for x in batched}) > len(PROMPTS) // 2  # outputs really depend on the prompt


def test_matches_plain_hf_generate_and_restores_tokenizer(varied_model, tokenizer):
    side = tokenizer.padding_side
    answers = generate_batch(varied_model, tokenizer, PROMPTS[:3], max_new_tokens=8, batch_size=3, progress=False)
    assert tokenizer.padding_side == side
    for prompt, answer in zip(PROMPTS[:3], answers):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = varied_model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                    pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_generation_stops_at_end_of_turn(varied_model, tokenizer):
    """Plant a model that says <|im_end|> right after its first answer token: the answer is that token."""
    model = copy.deepcopy(varied_model)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = generate_ids(model, tokenizer, PROMPTS[:1], max_new_tokens=1, progress=False)[0][0]
    original_forward = model.forward

    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        after_first = kwargs["input_ids"][:, -1] == first
        out.logits[after_first, -1, eot] = 1e4
        return out

    model.forward = forward
    assert generate_ids(model, tokenizer, PROMPTS[:1], max_new_tokens=10, progress=False)[0] == [first]
    assert len(generate_ids(varied_model, tokenizer, PROMPTS[:1], max_new_tokens=10, progress=False)[0]) == 10


def _family(base, template, specials, eos):
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template,specials,end", [
    ((TEMPLATES / "llama3.jinja").read_text(),
     ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    ((TEMPLATES / "gemma.jinja").read_text(), ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    (PHI3, ["<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
])
def test_stop_tokens_come_from_the_template(tokenizer, template, specials, end):
    tok = _family(tokenizer, template, specials, "<|endoftext|>")
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(end), tok.convert_tokens_to_ids("<|endoftext|>")]


# Kimi K3's layout: reasoning closed by <|close|>, an answer by a row of markers with words glued between them
CLOSING_ROW = ("{%- for m in messages -%}{{ '<|open|>' + m.role + '<|sep|>' }}{%- if m.reasoning_content -%}"
               "{{ '<|open|>think<|sep|>' + m.reasoning_content + '<|close|>' }}{%- endif -%}"
               "{{ m.content + '<|close|>' + m.role + '<|sep|><|end_of_msg|>' }}{%- endfor -%}"
               "{%- if add_generation_prompt %}{{ '<|open|>assistant<|sep|>' }}{%- endif -%}")


def test_a_row_of_markers_that_closes_an_answer_stops_on_its_last(tokenizer):
    """A reply stopped on the row's first <|close|>, which also closes the reasoning: right after it."""
    tok = _family(tokenizer, CLOSING_ROW, ["<|open|>", "<|sep|>", "<|close|>", "<|end_of_msg|>"], "<|endoftext|>")
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|end_of_msg|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def test_chatml_stop_is_im_end(tokenizer):
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
