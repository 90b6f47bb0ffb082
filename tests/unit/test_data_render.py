"""Exact masks, token by token, on chat templates of several families."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sftlab.data.conversation import Conversation
from sftlab.data.render import IGNORE, RenderOptions, TooLong, render, render_many
from sftlab.errors import SftlabError

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "templates"

# family -> (template file or None for the tokenizer's own ChatML, special tokens, bos, eos, end-of-turn, system?)
FAMILIES = {
    "chatml": (None, [], None, None, "<|im_end|>", True),
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", True),
    "mistral": ("mistral.jinja", ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", False),
    "gemma": ("gemma.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", True),
}


def family_tokenizer(base, family):
    template, specials, bos, eos, _, _ = FAMILIES[family]
    tok = copy.deepcopy(base)
    if template:
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.bos_token, tok.eos_token = bos, eos
        tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def conversation(system: bool):
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 equals 4."},
        {"role": "user", "content": "And times three?"},
        {"role": "assistant", "content": "That makes 12, since 4 x 3 = 12."},
    ]
    if system:
        msgs.insert(0, {"role": "system", "content": "You are terse."})
    return Conversation(msgs, source="mem:1")


def prompts_as_sent(tok, messages) -> list[int]:
    """The ids training should hold: the conversation's text cut where each assistant turn's generation
    prompt ends, each piece tokenized alone, so every answer follows the tokens inference sends before it
    (where the answer starts at a token boundary, as on these byte-level tokenizers). For the model's own
    templates that is the template's own tokenization; with `llama3` on SmolLM2's tokenizer, each prompt's
    trailing '\\n\\n' is one token, as inference sends it, where the whole text has '\\n', '\\n'."""
    text = tok.apply_chat_template(messages, tokenize=False)
    cuts = [len(tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False))
            for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [t for a, b in zip([0, *cuts], [*cuts, len(text)])
            for t in tok(text[a:b], add_special_tokens=False)["input_ids"]]


def trained_runs(example):
    """Contiguous runs of trained token ids."""
    runs, cur = [], []
    for tok, lab in zip(example.input_ids, example.labels):
        if lab != IGNORE:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize(
    "family,system", [(f, s) for f in sorted(FAMILIES) for s in (False, True) if FAMILIES[f][5] or not s]
)
def test_mask_is_exactly_assistant_content_plus_end_of_turn(tokenizer, family, system):
    tok = family_tokenizer(tokenizer, family)
    conv = conversation(system)
    ex = render(conv, tok)
    # The ids are exactly the template's own tokenization, each prompt ending as inference tokenizes it:
    # nothing added or dropped (and for all but llama3-on-SmolLM2 exactly apply_chat_template's ids).
    assert ex.input_ids == prompts_as_sent(tok, conv.messages)
    whole = tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
    assert (ex.input_ids == whole) is (family != "llama3") and tok.decode(ex.input_ids) == tok.decode(whole)
    eot = FAMILIES[family][4]
    answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    runs = trained_runs(ex)
    assert [tok.decode(r) for r in runs] == [a + eot for a in answers]
    # and the end-of-turn token is one trained token, not text
    assert all(r[-1] == tok.convert_tokens_to_ids(eot) for r in runs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_turn_only(tokenizer, family):
    tok = family_tokenizer(tokenizer, family)
    ex = render(conversation(False), tok, RenderOptions(train_on="last"))
    runs = trained_runs(ex)
    assert [tok.decode(r) for r in runs] == ["That makes 12, since 4 x 3 = 12." + FAMILIES[family][4]]


def test_template_without_end_marker_gets_trained_eos(tokenizer):
    """The classic silent bug: no EOS after the answer and the model never learns to stop."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TEMPLATES / "plain_no_eos.jinja").read_text()
    conv = conversation(False)
    ex = render(conv, tok)
    runs = trained_runs(ex)
    assert len(runs) == 2
    for run, answer in zip(runs, ["2+2 equals 4.", "That makes 12, since 4 x 3 = 12."]):
        assert run[-1] == tok.eos_token_id
        assert tok.decode(run[:-1]).strip() == answer
    # the EOS is inserted right after each answer, before the template's newline
    text = tok.decode(ex.input_ids)
    assert "2+2 equals 4.<|im_end|>\nUser:" in text
    assert text.endswith("= 12.<|im_end|>\n")


def test_template_not_prefix_stable_warns_and_still_locates_answers(tokenizer):
    tok = family_tokenizer(tokenizer, "mistral")
    tok.chat_template = (TEMPLATES / "mistral_v3_system_last.jinja").read_text()
    conv = conversation(True)
    with pytest.warns(UserWarning, match="not prefix-stable"):
        ex = render(conv, tok)
    runs = trained_runs(ex)
    # " That" is one token: a space the template puts before the answer merges into the
    # answer's first token, which must be trained (the model has to generate it).
    assert [tok.decode(r) for r in runs] == ["2+2 equals 4.</s>", " That makes 12, since 4 x 3 = 12.</s>"]


def test_template_that_rewrites_content_is_a_clear_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    tok.name_or_path = "my-odd-model"
    with pytest.raises(SftlabError, match="my-odd-model.*verbatim"):
        render(conversation(False), tok)


def test_answer_text_also_in_prompt_is_located_after_the_prompt(tokenizer):
    conv = Conversation([{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}])
    ex = render(conv, tokenizer)
    assert [tokenizer.decode(r) for r in trained_runs(ex)] == ["yes<|im_end|>"]


SHORT_ANSWERS = [
    {"role": "system", "content": "Answer T or F."},
    {"role": "user", "content": "Is 2+2=4?"},
    {"role": "assistant", "content": "T"},
    {"role": "user", "content": "Open a list."},
    {"role": "assistant", "content": "["},
]


def tokens_and_trained(tok, example):
    return [(t, lab != IGNORE) for t, lab in zip(tok.convert_ids_to_tokens(example.input_ids), example.labels)]


@pytest.mark.filterwarnings("ignore:.*not prefix-stable")
def test_short_answers_found_in_template_markup_are_anchored_mistral_v3(tokenizer):
    """"T" and "[" also occur in "[/INST]": the answers must be located where the template writes
    them, not inside its markup (which would train "[/INST]" and insert an EOS mid-sequence)."""
    tok = family_tokenizer(tokenizer, "mistral")
    tok.chat_template = (TEMPLATES / "mistral_v3_system_last.jinja").read_text()
    conv = Conversation(SHORT_ANSWERS, source="data.jsonl:7")
    ex = render(conv, tok)
    assert ex.input_ids == tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
    # (Mistral v3 writes the system prompt only into a final user turn: none here.)
    assert tokens_and_trained(tok, ex) == [
        ("<s>", False), ("[INST]", False), ("ĠIs", False), ("Ġ", False), ("2", False), ("+", False),
        ("2", False), ("=", False), ("4", False), ("?", False), ("[/INST]", False),
        ("ĠT", True), ("</s>", True),
        ("[INST]", False), ("ĠOpen", False), ("Ġa", False), ("Ġlist", False), (".", False), ("[/INST]", False),
        ("Ġ[", True), ("</s>", True),
    ]


# family -> (position, token) of every trained token for SHORT_ANSWERS, optionally with the
# answers' own whitespace (" T\n", "[ "): templates that trim it and templates that keep it.
SHORT_TRAINED = {
    ("chatml", False): [(27, "T"), (28, "<|im_end|>"), (43, "["), (44, "<|im_end|>")],
    ("chatml", True): [(27, "ĠT"), (28, "Ċ"), (29, "<|im_end|>"), (44, "["), (45, "Ġ"), (46, "<|im_end|>")],
    # (each generation prompt's "\\n\\n" is the one token inference sends, not two: see prompts_as_sent)
    ("llama3", False): [(31, "T"), (32, "<|eot_id|>"), (48, "["), (49, "<|eot_id|>")],
    ("llama3", True): [(31, "T"), (32, "<|eot_id|>"), (48, "["), (49, "<|eot_id|>")],
}


@pytest.mark.parametrize("family,spaced", sorted(SHORT_TRAINED))
def test_short_answers_exact_positions_chatml_llama3(tokenizer, family, spaced):
    tok = family_tokenizer(tokenizer, family)
    messages = copy.deepcopy(SHORT_ANSWERS)
    if spaced:
        messages[2]["content"], messages[4]["content"] = " T\n", "[ "
    conv = Conversation(messages, source="data.jsonl:7")
    ex = render(conv, tok)
    assert ex.input_ids == prompts_as_sent(tok, messages)
    if family != "llama3":
        assert ex.input_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    trained = [(k, t) for k, (t, on) in enumerate(tokens_and_trained(tok, ex)) if on]
    assert trained == SHORT_TRAINED[family, spaced]


def qwen3_tokenizer(base):
    tok = copy.deepcopy(base)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    tok.name_or_path = "qwen3"
    return tok


def test_markup_after_the_generation_prompt_is_trained_qwen3(tokenizer):
    """Qwen3 writes an empty "<think>" block after the generation prompt in the last turn: the model
    writes it at inference (the prompt ends at "assistant\n"), so it is trained with the answer, as
    TRL's Qwen3 training template marks it; an answer ">" is still not located inside "<think>"."""
    tok = qwen3_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "2 vs 3? Answer < or >."}, {"role": "assistant", "content": "<"},
                {"role": "user", "content": "5 vs 4?"}, {"role": "assistant", "content": ">"}]
    ex = render(Conversation(messages, source="data.jsonl:7"), tok)
    assert ex.input_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    tokens = tokens_and_trained(tok, ex)
    assert tokens[-9:] == [("Ċ", False), ("<think>", True), ("ĊĊ", True), ("</think>", True), ("Ċ", True),
                           ("Ċ", True), (">", True), ("<|im_end|>", True), ("Ċ", False)]
    assert [t for t, on in tokens if on] == ["<", "<|im_end|>", "<think>", "ĊĊ", "</think>", "Ċ", "Ċ", ">", "<|im_end|>"]


@pytest.mark.parametrize("turn,problem", [(1, "does not render"), (3, "writes other text around")])
def test_template_that_changes_with_the_content_is_a_clear_error(tokenizer, turn, problem):
    """Qwen3 drops the reasoning of earlier turns and moves the last turn's into its <think> block:
    the answer's tokens cannot be located, and the error names the record and the turn."""
    tok = qwen3_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    messages[turn]["content"] = "<think>Easy.</think>" + messages[turn]["content"]
    with pytest.raises(SftlabError, match=rf"^data\.jsonl:7: the chat template of 'qwen3' {problem} assistant turn {turn}\b"):
        render(Conversation(messages, source="data.jsonl:7"), tok)


def test_messages_with_other_fields_render_exactly_as_apply_chat_template(tokenizer):
    """Plain {role, content} messages go straight to the compiled template; any other message
    goes through apply_chat_template, which e.g. drops None-valued fields."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if m.name is defined %} ({{ m.name }}){% endif %}:\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    plain = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    named = Conversation([{"role": "user", "content": "Hi", "name": "ann"},
                          {"role": "assistant", "content": "Hello", "name": None}])
    for conv in (plain, named):
        ex = render(conv, tok)
        assert ex.input_ids == tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
        assert [tok.decode(r) for r in trained_runs(ex)] == ["Hello<|im_end|>"]


def test_raw_text_trains_every_token_and_ends_with_eos(tokenizer):
    ex = render(Conversation(text="Plain text for continued pretraining."), tokenizer)
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert ex.labels == ex.input_ids


def test_truncation_policies(tokenizer):
    conv = conversation(False)
    n = len(render(conv, tokenizer))
    with pytest.raises(TooLong, match="mem:1"):
        render(conv, tokenizer, RenderOptions(max_seq_length=n - 1))
    cut = render(conv, tokenizer, RenderOptions(max_seq_length=n - 1, truncation="truncate"))
    assert len(cut) == n - 1 and cut.truncated
    # render_many keeps order and returns rejects in place
    out = render_many([conv, Conversation(text="x"), conv], tokenizer, RenderOptions(max_seq_length=n - 1))
    assert isinstance(out[0], TooLong) and isinstance(out[2], TooLong) and out[1].input_ids


def test_chunks_are_pipelined_without_changing_results(tokenizer, monkeypatch):
    """Conversations are rendered and tokenized CHUNK at a time in a pipeline: the results, rejects
    included, must be those of rendering each conversation alone, in input order."""
    import sftlab.data.render as render_module

    convs = [conversation(i % 2 == 0) for i in range(5)] + [Conversation(text="Raw text.")]
    convs.insert(2, Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey " * 400}]))
    options = RenderOptions(max_seq_length=300)
    alone = [render_many([c], tokenizer, options)[0] for c in convs]
    monkeypatch.setattr(render_module, "CHUNK", 2)
    chunked = render_many(convs, tokenizer, options)
    assert [type(x) for x in chunked] == [type(x) for x in alone] and isinstance(chunked[2], TooLong)
    assert [(x.input_ids, x.labels) for x in chunked if not isinstance(x, TooLong)] == \
        [(x.input_ids, x.labels) for x in alone if not isinstance(x, TooLong)]


def test_missing_chat_template_is_a_clear_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(SftlabError, match="no chat template"):
        render(conversation(False), tok)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_compiled_template_fast_path_is_active(tokenizer, family):
    """Rendering takes the compiled template (transformers' private `_compile_jinja_template`) for
    plain messages. Should a transformers release rename it or change what it returns, rendering
    would silently fall back to apply_chat_template, several times slower: this fails instead."""
    from sftlab.data.render import _Template

    conv = conversation(FAMILIES[family][5])
    messages = conv.messages
    template = _Template(family_tokenizer(tokenizer, family), messages)
    assert template._compiled is not None, "the fast path is off: see _Template._compile"
    assert template.renderer(conv) == template._direct
    for prompt in (False, True):
        fast = template._direct(messages, add_generation_prompt=prompt)
        assert fast == template.slow(messages, add_generation_prompt=prompt)


def test_a_template_whose_end_marker_is_not_a_token_warns(tokenizer):
    """Llama 3's template on SmolLM2's tokenizer (no <|eot_id|> token): the model could not learn to
    stop on a marker it sees as plain pieces, so rendering says so; with the tokens added it does not."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TEMPLATES / "llama3.jinja").read_text()
    with pytest.warns(UserWarning, match=r"ends an answer with '<\|eot_id\|>', which is not a token of this tokenizer"):
        render(conversation(False), tok)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render(conversation(False), family_tokenizer(tokenizer, "llama3"))


def test_a_generation_prompt_the_tokenizer_joins_with_the_answer_warns(tokenizer):
    """trl #598 / #4201: "Assistant: " + "Hello" tokenizes as "Assistant", ":", " Hello" in the conversation,
    but the prompt alone ends with its own " " token, which no trained answer follows: the model is
    trained in one context and asked to answer in another. The ids stay the template's own; rendering
    says so once, naming the template and the tokens."""
    import warnings

    from sftlab.evaluation.generate import prompt_ids

    tok = copy.deepcopy(tokenizer)
    tok.name_or_path = "assistant-colon-space"
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
                         "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    conv = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.warns(UserWarning, match=r"'assistant-colon-space' ends its generation prompt.*' ' \+ 'Hello' are "
                                         r"one token, ' Hello'"):
        ex = render(conv, tok)
    assert ex.input_ids == tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
    prompt = prompt_ids(tok, conv.messages[:1], "mem")
    assert ex.input_ids[:len(prompt)] != prompt  # the mismatch the warning is about
    with warnings.catch_warnings():  # the tokenizer's own template: the prompt's tokens begin the conversation's
        warnings.simplefilter("error")
        ex = render(Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
                    tokenizer)
        prompt = prompt_ids(tokenizer, conv.messages[:1], "mem")
        assert ex.input_ids[:len(prompt)] == prompt


def test_a_generation_prompt_unlike_the_text_before_the_last_answer_says_where(tokenizer):
    """LLaMA-Factory #6987: DeepSeek-R1-Distill's template prompts with "<think>\\n" but writes every answer,
    the last included, without it, so each is trained after text inference does not give. The warning said
    only "earlier assistant turns"; it names the two texts and that the last answer is affected too."""
    from tests.conftest import tokenizer_for

    tok = tokenizer_for(tokenizer, "deepseek_r1_distill.jinja")
    tok.add_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"], special_tokens=True)
    tok.name_or_path = "r1-distill"
    conv = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    with pytest.warns(UserWarning, match=r"'r1-distill' is not prefix-stable \(the generation prompt has '<think>\\n' "
                                         r"where the conversation has 'Hello\.<｜end▁of▁sentence｜>'\): the answers, "
                                         r"the last one included, are trained"):
        ex = render(conv, tok)
    assert [tok.decode(r) for r in trained_runs(ex)] == ["Hello.<｜end▁of▁sentence｜>"]


@pytest.mark.filterwarnings("ignore:.*not prefix-stable")
def test_a_full_width_end_marker_that_is_not_a_token_warns(tokenizer):
    """DeepSeek's templates end an answer with <｜end▁of▁sentence｜> (full-width bars): on a tokenizer without
    that token the answer's last token swallowed "<" and an EOS was inserted inside the marker, silently."""
    from tests.conftest import tokenizer_for

    tok = tokenizer_for(tokenizer, "deepseekv3.jinja")
    tok.name_or_path = "deepseek-on-smollm2"
    conv = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    with pytest.warns(UserWarning, match="ends an answer with '<｜end▁of▁sentence｜>', which is not a token"):
        render(conv, tok)


def _trained_after_the_prompts_inference_sends(tok, messages, options=RenderOptions()):
    """Each trained answer follows the ids inference sends for it (`encode`, the served prompt tokenized
    alone): its whole prompt for the first trained turn (and for a last-turn-only example), and from the
    prompt's last added token on for a later one (its history holds the earlier answers as the whole
    text tokenizes them, inference's history as its prompt tokenized alone does: one sequence cannot be
    both); the labels are the answer's tokens and the end of turn, nothing else."""
    from sftlab.serve.generation import encode

    ex = render(Conversation(messages, source="mem:1"), tok, options)
    ids, labels = ex.input_ids, ex.labels
    added = set(tok.added_tokens_decoder)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if options.train_on == "last":
        turns = turns[-1:]
    starts = [k for k in range(len(ids)) if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]
    assert len(starts) == len(turns)
    for n, (i, start) in enumerate(zip(turns, starts)):
        sent = encode(tok, messages[:i])
        last_added = max(k for k, t in enumerate(sent) if t in added)
        assert ids[start - (len(sent) - last_added):start] == sent[last_added:]
        if n == 0:
            assert ids[:start] == sent
        stop = next((k for k in range(start, len(ids)) if labels[k] == IGNORE), len(ids))
        assert ids[start:stop] == tok(messages[i]["content"] + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        assert labels[start:stop] == ids[start:stop]
    return ex


def test_a_named_template_trains_each_answer_after_the_prompt_tokens_inference_sends(tokenizer, monkeypatch):
    """trl#598 / trl#622: the named `llama3` template on SmolLM2's GPT-2-style tokenizer. The whole text
    tokenizes `<|end_header_id|>\\n\\n` + "Four" as '\\n', '\\n', 'Four', the prompt alone (what `sftlab
    serve` and evaluation send) ends with the one token '\\n\\n': training must put that token, the one
    inference sends, before every trained answer."""
    from sftlab.data import render as render_module
    from sftlab.models import use_chat_template

    tok = copy.deepcopy(tokenizer)
    use_chat_template(tok, "llama3")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "Four, since two and two make four."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    double = tok.convert_tokens_to_ids("ĊĊ")
    ex = _trained_after_the_prompts_inference_sends(tok, messages)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)  # same text, nothing lost
    assert [ex.input_ids[k - 1] for k in range(1, len(ex)) if ex.labels[k] != IGNORE and ex.labels[k - 1] == IGNORE
            ] == [double, double]
    _trained_after_the_prompts_inference_sends(tok, messages, RenderOptions(train_on="last"))
    # planted fault: without the splice the answers follow '\\n', '\\n', which inference never sends
    monkeypatch.setattr(render_module, "_prompt_as_sent", lambda plan, encoding, ids, ranges, tails, name: (ids, ranges))
    with pytest.raises(AssertionError):
        _trained_after_the_prompts_inference_sends(tok, messages)


def test_openai_weight_0_leaves_an_assistant_turn_untrained(tokenizer, tmp_path):
    """OpenAI's fine-tuning format marks assistant messages not to train with "weight": 0; it was
    ignored and the turn trained."""
    import json
    import re

    from sftlab.data.formats import RecordError
    from sftlab.data.load import load_conversations

    msgs = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris", "weight": 0},
            {"role": "user", "content": "More sarcastic?"}, {"role": "assistant", "content": "Paris, obviously.",
                                                              "weight": 1}]
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    for train_on in ("all", "last"):
        ex = render(load_conversations(path)[0], tokenizer, RenderOptions(train_on=train_on))
        trained = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.label_ids) if label != IGNORE])
        assert trained == "Paris, obviously.<|im_end|>"
    unweighted = render(Conversation([{k: v for k, v in m.items() if k != "weight"} for m in msgs]), tokenizer)
    assert ex.input_ids == unweighted.input_ids  # the turn stays in the context, as written
    path.write_text(json.dumps({"messages": msgs[:2]}) + "\n")
    with pytest.raises(SftlabError, match="every assistant turn has weight 0"):
        render(load_conversations(path)[0], tokenizer)
    for bad, message in ((dict(msgs[1], weight=0.5), "'weight' is 0.5; it is 0 (not trained) or 1"),
                         (dict(msgs[0], weight=1), "user message with 'weight' 1: only assistant turns are trained")):
        path.write_text(json.dumps({"messages": [bad if m["role"] == bad["role"] else m for m in msgs[:2]]}) + "\n")
        with pytest.raises(RecordError, match=re.escape(message)) as err:
            load_conversations(path)
        assert err.value.source == f"{path}:1"


def test_sharegpt_weights_as_openhermes_and_axolotl_sets_write_them(tokenizer, tmp_path):
    """OpenHermes 2.5 writes "weight": null on every message, other ShareGPT sets 0 on the human turns and
    0 or 1 on the gpt ones: null is no weight, 0 on a human turn says what sftlab does anyway (such
    records were refused as a weight on a non-assistant message)."""
    import json

    from sftlab.data.load import load_conversations

    turns = [("system", "Be brief."), ("human", "Capital of France?"), ("gpt", "Paris"), ("human", "Of Peru?"),
             ("gpt", "Lima")]
    path = tmp_path / "s.jsonl"
    for weights, trained in (([None] * 5, "Paris<|im_end|>Lima<|im_end|>"),
                             ([0, 0.0, 0.0, 0, 1.0], "Lima<|im_end|>")):
        path.write_text(json.dumps({"conversations": [{"from": f, "value": v, "weight": w}
                                                      for (f, v), w in zip(turns, weights)]}) + "\n")
        ex = render(load_conversations(path)[0], tokenizer)
        assert tokenizer.decode([t for t, label in zip(ex.input_ids, ex.label_ids) if label != IGNORE]) == trained


def test_an_answer_whose_first_token_holds_the_prompt_s_end_follows_the_prompt_as_inference_sends_it(tokenizer):
    """Qwen 3.5's thinking template prompts "<think>\\n" and writes an answer without reasoning as "<think>\\n" +
    "\\n</think>\\n\\n" + content: in the whole text the prompt's last "\\n" and the answer's first are one token,
    '\\n\\n', which was trained, while inference sends the prompt's own '\\n' and the model never learned to go
    on from it. Now the answer is tokenized apart up to its next added token, and trained from its own '\\n'."""
    import warnings

    from sftlab.evaluation.generate import prompt_ids
    from tests.conftest import tokenizer_for

    tok = tokenizer_for(tokenizer, "qwen3_5_think.jinja")
    tok.add_tokens(["<think>", "</think>"])  # added tokens in Qwen's own vocabulary
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about now
        ex = render(Conversation(messages, source="mem:1"), tok)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)  # the same text
    start = next(k for k, label in enumerate(ex.labels) if label != IGNORE)
    assert ex.input_ids[:start] == prompt_ids(tok, messages[:1], "mem")
    answer = tok.convert_ids_to_tokens(ex.input_ids[start:start + 2])
    assert answer == ["Ċ", "</think>"] and ex.labels[start:start + 2] == ex.input_ids[start:start + 2]
