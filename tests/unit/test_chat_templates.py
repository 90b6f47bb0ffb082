"""Named chat templates for base models: exact masks, added special tokens, embedding fitting."""

from __future__ import annotations

import warnings

import pytest

from sftlab.data.conversation import Conversation
from sftlab.data.render import render
from sftlab.errors import SftlabError
from sftlab.models import NAMED_TEMPLATES, fit_embeddings, load_tokenizer, read_chat_template, use_chat_template

from tests.conftest import TOKENIZER_DIR

CONV = Conversation(messages=[
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Sure."},
])
# name -> (the trained spans, the text the model is prompted with before the first answer)
EXPECTED = {
    "chatml": (["Hello!<|im_end|>", "Sure.<|im_end|>"],
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": (["Hello!<|eot_id|>", "Sure.<|eot_id|>"],
               "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral": ([" Hello!<|im_end|>", " Sure.<|im_end|>"], "<|im_start|>[INST] Be brief.\n\nHi there [/INST]"),
    "gemma": (["Hello!<end_of_turn>", "Sure.<end_of_turn>"],
              "<|im_start|><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"),
    "alpaca": (["Hello!<|im_end|>", "Sure.<|im_end|>"],
               "<|im_start|>Be brief.\n\n### Instruction:\nHi there\n\n### Response:\n"),
}


def trained_spans(ex, tok) -> list[str]:
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def test_every_named_template_is_tested():
    assert set(EXPECTED) == set(NAMED_TEMPLATES)


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_template_masks_exactly_and_is_prefix_stable(name):
    tok = load_tokenizer(str(TOKENIZER_DIR), chat_template=name)
    spans, prompt = EXPECTED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a template that is not prefix-stable warns
        ex = render(CONV, tok)
    assert trained_spans(ex, tok) == spans
    first = CONV.messages[:2]
    assert tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True) == prompt
    for t in NAMED_TEMPLATES[name]:  # each special token the template writes is one token
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1


def test_a_space_the_template_writes_before_an_answer_is_trained_when_it_is_a_token_of_its_own():
    """Mistral's template writes "[/INST]" + " " + answer and prompts with "[/INST]": the model generates the
    space. Before a digit, SmolLM2's tokenizer keeps the space a token of its own ("Ġ", "2", "0", ...); an
    answer span starting at the stripped answer left it untrained, the first token the model must write."""
    tok = load_tokenizer(str(TOKENIZER_DIR), chat_template="mistral")
    conv = Conversation(messages=[{"role": "user", "content": "Date?"}, {"role": "assistant", "content": "2019-11-13"}])
    ex = render(conv, tok)
    first = next(k for k, lab in enumerate(ex.labels) if lab != -100)
    assert tok.convert_ids_to_tokens(ex.input_ids[first:first + 2]) == ["Ġ", "2"]
    assert trained_spans(ex, tok) == [" 2019-11-13<|im_end|>"]
    assert tok.decode(ex.input_ids[:first]) == tok.apply_chat_template(conv.messages[:1], tokenize=False,
                                                                       add_generation_prompt=True)


def test_tokens_are_added_only_when_missing(tokenizer):
    base = len(tokenizer)
    tok = load_tokenizer(str(TOKENIZER_DIR), chat_template="chatml")  # SmolLM2 already has <|im_start|>
    assert len(tok) == base and use_chat_template(tok, "chatml") == []
    tok = load_tokenizer(str(TOKENIZER_DIR), chat_template="llama3")
    assert len(tok) == base + 3
    assert tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]) == [base, base + 1, base + 2]


def test_unknown_template_names_are_one_line_errors():
    with pytest.raises(SftlabError, match="unknown chat template 'lama3'.*Did you mean 'llama3'"):
        read_chat_template("lama3")
    assert read_chat_template("{{ messages }}") == "{{ messages }}"  # inline Jinja still works


def _tiny(tokenizer, tied: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, False])
def test_fit_embeddings_grows_the_model_and_names_the_rows_to_train(tokenizer, tied):
    model = _tiny(tokenizer, tied)
    old = model.get_input_embeddings().weight.detach().clone()
    tok = load_tokenizer(str(TOKENIZER_DIR), chat_template="gemma")
    extra = fit_embeddings(model, tok)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tok) == len(tokenizer) + 2
    assert (weight[: len(old)] == old).all()
    rows = [len(tokenizer), len(tokenizer) + 1]
    # an untied head trains the same rows, not the whole matrix (an adapter as large as the head)
    assert extra == {"trainable_token_indices": {"embed_tokens": rows} | ({} if tied else {"lm_head": rows})}
    assert fit_embeddings(_tiny(tokenizer, tied), load_tokenizer(str(TOKENIZER_DIR), chat_template="chatml")) == {}


def test_the_run_model_card_loads_an_adapter_that_holds_added_token_rows(tokenizer, tmp_path):
    """A named template added tokens, so the adapter holds their rows (PEFT trainable tokens) for a base
    grown to the tokenizer: the model card's snippet on the plain base raised an IndexError."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sftlab.config import load_config
    from sftlab.train.run_dir import model_card

    base_dir, run = tmp_path / "base", tmp_path / "run"
    _tiny(tokenizer, tied=False).save_pretrained(base_dir)
    tok = load_tokenizer(str(TOKENIZER_DIR), chat_template="llama3")
    model = _tiny(tokenizer, tied=False)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], **fit_embeddings(model, tok)))
    peft.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "tokenizer")
    config = load_config(None, [f"model.name_or_path={base_dir}", "model.chat_template=llama3", "data.train=x.jsonl",
                                f"output_dir={run}"])
    card = model_card(config, {"base_model": str(base_dir)})
    code = card.split("```python\n")[1].split("```")[0].replace("BASE", repr(str(base_dir))).replace("'RUN/", f"'{run}/")
    scope = {}
    exec(code, scope)
    ids = torch.tensor([tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>"])])
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](input_ids=ids).logits, peft(input_ids=ids).logits)
