"""Regression checks for failures users reported in other SFT toolkits' trackers, reproduced on
the tiny model / SmolLM2 tokenizer / vendored templates. Each docstring names the report.
The last three reproduced variants sftlab had (prompt tokens inference never sends, a model's
generation_config in greedy evaluation, label smoothing ignored) until they were fixed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama, tokenizer_for
from sftlab.data.conversation import Conversation
from sftlab.data.pack import collate
from sftlab.data.render import IGNORE, render

QA = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
QA2 = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Four, since two and two make four."},
       {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]


def _prompt_is_prefix(tok, messages) -> bool:
    """What serving sends for each assistant turn (the prompt tokenized alone) is the token prefix
    training put before that answer."""
    from sftlab.evaluation.generate import prompt_ids
    from sftlab.serve.generation import encode

    ex = render(Conversation(messages, source="mem:1"), tok)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompts = [encode(tok, messages[:i]) for i in turns] + [prompt_ids(tok, messages[:i], "x") for i in turns]
    return all(ex.input_ids[:len(p)] == p for p in prompts)


def test_eos_is_trained_when_the_pad_token_is_the_eos_token(tokenizer):
    """trl#1623 "Learning to generate EOS tokens" (and alignment-handbook#127): with pad_token ==
    eos_token the collator masked every pad-id position, the real EOS included, and the tuned model
    never stopped. SmolLM2's tokenizer has pad == eos == <|im_end|>; padding a short row must leave
    each answer's own <|im_end|> trained and the padding untrained."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short, long = (render(Conversation(m, source="mem:1"), tokenizer) for m in (QA, QA2))
    batch = collate([[short], [long]])
    eos = tokenizer.eos_token_id
    labels, ids = batch["labels"], batch["input_ids"]
    assert int((ids[0] == eos).sum()) > int((labels[0] == eos).sum())  # padding really uses the EOS id
    for row, ex in enumerate((short, long)):
        trained = labels[row][labels[row] != IGNORE].tolist()
        assert trained.count(eos) == (2 if row else 1) and trained[-1] == eos
        assert (labels[row, len(ex):] == IGNORE).all()


@pytest.mark.parametrize("name,bos", [("llama3_1.jinja", "<|begin_of_text|>"), ("gemma.jinja", "<bos>")])
def test_a_template_that_writes_bos_gets_one_bos_in_training_serving_and_evaluation(tokenizer, name, bos):
    """trl#1400 "conversational data for SFTTrainer": the chat template's text was tokenized again with
    add_special_tokens=True, so Llama-style tokenizers gave `<s><s>...`. Here the tokenizer adds a BOS on
    its own too, and the template writes one: training ids, the served prompt and the evaluated prompt
    each hold exactly one."""
    from sftlab.evaluation.generate import prompt_ids
    from sftlab.serve.generation import encode

    tok = tokenizer_for(tokenizer, name)
    tok.add_special_tokens({"bos_token": bos})
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)  # Gemma's markers, as its tokenizer has them
    tok.add_bos_token = True
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # a plain tokenize() does add one
    ex = render(Conversation(QA, source="mem:1"), tok)
    for ids in (ex.input_ids, encode(tok, QA[:1]), prompt_ids(tok, QA[:1], "x")):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_a_template_s_default_system_prompt_is_the_same_in_training_and_at_inference(tokenizer):
    """QwenLM/Qwen3#1141 (LLaMA-Factory's qwen template vs the official default system prompt): Qwen2.5's
    template writes "You are Qwen, created by Alibaba Cloud..." when a conversation has no system
    message. Whatever it writes, training must see the very tokens inference sends: the default system
    prompt is in the trained example's context, untrained, and the served prompt is its prefix."""
    tok = tokenizer_for(tokenizer, "qwen2_5.jinja")
    ex = render(Conversation(QA, source="mem:1"), tok)
    context = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
    assert "You are Qwen, created by Alibaba Cloud" in context
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "Paris.<|im_end|>"
    assert _prompt_is_prefix(tok, QA) and _prompt_is_prefix(tok, QA2)


def test_a_lora_on_a_tied_lm_head_is_not_exported_as_a_silently_different_model(tokenizer, tmp_path):
    """peft#2018 "With tied embeddings adapter merged to tied layers" (unsloth#219, Gemma 2B merge
    broken): a LoRA on lm_head of a model with tie_word_embeddings merges into the shared matrix, so
    the merged model's input embeddings change too and its outputs differ from the adapter model's.
    sftlab's merge verification must catch it (the CLI then refuses the export)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftlab.export.merge import merge_run

    base = make_tiny_llama(tmp_path / "base", tokenizer, tied=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "run" / "adapter")
    tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"base_model": str(base), "method": "lora", "seed": 0}))
    result = merge_run(tmp_path / "run", tmp_path / "merged")
    assert not result.ok and result.max_abs_diff > 100 * result.tolerance


# --- variants sftlab had, fixed ---

def test_the_named_llama3_template_trains_after_the_tokens_inference_sends(tokenizer):
    """trl#598 / trl#622 (response template tokenized differently depending on its context): with the
    named `llama3` template on SmolLM2's tokenizer, `<|end_header_id|>\\n\\n` + answer tokenizes as
    '\\n', '\\n', 'Paris', but the served prompt ends with the single token '\\n\\n', which no trained
    answer ever follows."""
    from sftlab.models import use_chat_template

    tok = copy.deepcopy(tokenizer)
    use_chat_template(tok, "llama3")
    assert _prompt_is_prefix(tok, QA)


def test_greedy_evaluation_ignores_the_model_s_generation_config(tokenizer):
    """transformers#33427 / lighteval#559 (generation_config sampling defaults used in evaluation):
    Qwen2.5-Instruct ships do_sample, temperature .7, top_p .8, top_k 20 and repetition_penalty 1.05.
    sftlab's greedy evaluation must decode exactly what plain argmax decoding (and `sftlab serve`) gives."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from sftlab.evaluation.generate import generate_ids, prompt_ids, stop_token_ids

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts = [[{"role": "user", "content": "word " * n + "end"}] for n in (1, 7, 2, 15)]
    stops, expected = set(stop_token_ids(tokenizer)), []
    with torch.no_grad():
        for p in prompts:
            ids, out = prompt_ids(tokenizer, p, "x"), []
            while len(out) < 16 and (t := int(model(torch.tensor([ids + out]), logits_to_keep=1).logits[0, -1].argmax())
                                     ) not in stops:
                out.append(t)
            expected.append(out)
    assert generate_ids(model, tokenizer, prompts, max_new_tokens=16, progress=False) == expected
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                               repetition_penalty=1.05, eos_token_id=tokenizer.eos_token_id)
    assert generate_ids(model, tokenizer, prompts, max_new_tokens=16, progress=False) == expected


def test_label_smoothing_is_applied_to_the_trained_tokens_in_training_only(tiny_model_dir, tmp_path):
    """transformers' LabelSmoother with padding / ignore_index (e.g. transformers#5919 review): a loss
    option that is accepted must change the loss. training.label_smoothing_factor was accepted and
    ignored (sftlab's loss never read it); it now smooths the trained tokens' CE as F.cross_entropy's
    label_smoothing does, in training; eval_loss stays the plain CE."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from sftlab.data.conversation import Example
    from sftlab.train.trainer import SFTTrainer

    ids = torch.randint(100, 5000, (2, 40), generator=torch.Generator().manual_seed(0)).tolist()
    batch = collate([[Example(x, [IGNORE] * 10 + x[10:])] for x in ids])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    labels = batch["labels"][:, 1:]
    want = {factor: torch.nn.functional.cross_entropy(logits[:, :-1][labels != IGNORE], labels[labels != IGNORE],
                                                      label_smoothing=factor).item() for factor in (0.0, 0.5)}
    for factor in (0.0, 0.5):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", label_smoothing_factor=factor)
        trainer = SFTTrainer(model=model, args=args)
        with torch.no_grad():
            assert trainer.compute_loss(model.train(), batch).item() == pytest.approx(want[factor], rel=1e-5)
            assert trainer.compute_loss(model.eval(), batch).item() == pytest.approx(want[0.0], rel=1e-5)
    assert want[0.5] != pytest.approx(want[0.0], rel=1e-5)  # near-uniform random logits: smoothing moves them little
