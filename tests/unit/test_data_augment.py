"""augment: provenance on every new record, user-side-only noise, and no duplicates added."""

from __future__ import annotations

import json

from sftlab.data.augment import AugmentOptions, LocalGenerator, Reply, augment, rewrite_problem
from sftlab.data.conversation import Conversation
from sftlab.data.curate import CurateOptions, exact_key


def chat(*turns, source="f:1", system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return Conversation(messages=msgs, source=source, meta={"label": "x"})


DATA = [chat("Classify the sentiment of this review: the kettle broke after a day.", "negative", source="f:1"),
        chat("Convert this date to ISO format: March 5, 2021", "2021-03-05", source="f:2", system="Be exact."),
        chat("Hi there, who are you?", "I am an assistant.", "What can you do?", "Answer questions.", source="f:3")]


def test_rule_strategies_keep_provenance_and_add_no_duplicates():
    new, report = augment(DATA, AugmentOptions(strategies=["paraphrase", "system", "noise", "prefixes"], copies=2, seed=1))
    assert new and all(c.meta["augmented_from"] in {"f:1", "f:2", "f:3"} for c in new)
    assert all(c.meta["label"] == "x" and c.meta["augmentation"] in {"paraphrase", "system", "noise", "prefixes"} for c in new)
    keys = [exact_key(c) for c in [*DATA, *new]]
    assert len(set(keys)) == len(keys)  # nothing duplicates a source or another new record
    assert report.kept == {s: sum(c.meta["augmentation"] == s for c in new) for s in ("paraphrase", "system", "noise", "prefixes")}
    assert report.to_json()["kept_total"] == len(new)


def test_noise_touches_user_turns_only():
    new, _ = augment(DATA, AugmentOptions(strategies=["noise"], seed=3))
    for c in new:
        src = next(d for d in DATA if d.source == c.meta["augmented_from"])
        for before, after in zip(src.messages, c.messages):
            assert before["role"] == after["role"]
            if before["role"] != "user":
                assert before == after
        assert any(b["content"] != a["content"] for b, a in zip(src.messages, c.messages))


def test_prefixes_and_system_variation_exact():
    new, _ = augment(DATA, AugmentOptions(strategies=["prefixes"]))
    assert [(c.meta["augmented_from"], c.messages) for c in new] == [("f:3", DATA[2].messages[:2])]
    new, _ = augment(DATA[:2], AugmentOptions(strategies=["system"], copies=10))
    assert len(new) == 4  # one per built-in system prompt; DATA[1] keeps its own ("Be exact.")
    assert all(c.messages[0]["role"] == "system" and c.messages[1:] == DATA[0].messages for c in new)


def test_paraphrase_templates_change_only_the_first_user_turn():
    new, _ = augment(DATA[:1], AugmentOptions(strategies=["paraphrase"], copies=3, seed=0))
    assert len(new) == 3
    for c in new:
        assert c.messages[1] == DATA[0].messages[1]
        assert "the kettle broke after a day" in c.messages[0]["content"]
        assert c.messages[0]["content"] != DATA[0].messages[0]["content"]


class CannedGenerator(LocalGenerator):
    """The generation interface with fixed replies (text: ended by the model, not cut off), to test
    parsing, provenance and filtering exactly."""

    def __init__(self, replies):
        self.replies = [r if isinstance(r, Reply) else Reply(r, False) for r in replies]

    def generate(self, prompts, opts):
        assert len(prompts) == len(self.replies)
        return self.replies


def test_self_instruct_parses_filters_and_records_seeds():
    replies = ["Instruction: Convert this date to ISO format: July 9, 1999\nAnswer: 1999-07-09",
               "Sorry, I do not know.",  # unparseable
               "Instruction: Convert this date to ISO format: March 5, 2021\nAnswer: 2021-03-05",  # copies a source
               "Instruction: Convert this date to ISO format: July 9, 1999\nAnswer: 1999-07-09",  # repeats the first
               Reply("Instruction: Convert this date to ISO format: May 1, 2000\nAnswer: 20", True)]  # cut off
    opts = AugmentOptions(strategies=["self_instruct"], self_instruct_count=5, seeds_per_prompt=2, seed=0)
    new, report = augment(DATA, opts, generator=CannedGenerator(replies))
    assert [c.messages for c in new] == [[{"role": "user", "content": "Convert this date to ISO format: July 9, 1999"},
                                          {"role": "assistant", "content": "1999-07-09"}]]
    assert len(new[0].meta["augmented_from"]) == 2 and set(new[0].meta["augmented_from"]) <= {"f:1", "f:2", "f:3"}
    assert report.unparseable == 1 and report.cut_off == 1 and report.generated["self_instruct"] == 3 and report.kept["self_instruct"] == 1
    # the copy of f:2 lacks its system prompt, so it is a near (not exact) duplicate of it
    assert report.filtered["self_instruct"]["removed"] == {"near duplicate": 1, "exact duplicate": 1}
    examples = report.filtered["self_instruct"]["examples"]
    assert examples["near duplicate"][0]["duplicate_of"] == "f:2"
    assert examples["exact duplicate"][0]["duplicate_of"] == "self_instruct#0"


def _greedy_reply(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """Reference: transformers' own greedy generate on one unpadded prompt, cut at the end of turn."""
    import torch

    from sftlab.data.augment import PARAPHRASE_PROMPT

    messages = [{"role": "user", "content": PARAPHRASE_PROMPT.format(text=text)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):].tolist()
    out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def talkative_tiny_model(tiny_model_dir, out):
    """The tiny random Llama with its own lm_head and larger random weights. As initialised,
    with tied embeddings, it repeats the prompt's last token (a newline), so every reply strips
    to nothing, and its replies hardly depend on the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    torch.manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("lm_head"):
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_model_paraphrase_with_a_real_tiny_model(tiny_model_dir, tmp_path):
    """The random model never ends its turn: every rewrite runs into max_new_tokens and is dropped,
    known from the token ids, not the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.data.augment import PARAPHRASE_PROMPT

    model_dir = talkative_tiny_model(tiny_model_dir, tmp_path / "model")
    opts = AugmentOptions(strategies=["model_paraphrase"], max_new_tokens=8, batch_size=2, model=str(model_dir))
    new, report = augment(DATA[:2], opts)
    assert new == [] and report.generated["model_paraphrase"] == 0 and report.unparseable == 0
    assert report.rewrites_dropped == {"cut off at max_new_tokens": 2}
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the replies of the model, one prompt at a time (the generator batches them with left padding)
    want = [_greedy_reply(model, tokenizer, d.messages[-2]["content"], 8) for d in DATA[:2]]
    assert all(want) and len(set(want)) == 2  # real, prompt-dependent text
    gen = LocalGenerator(str(model_dir))
    prompts = [[{"role": "user", "content": PARAPHRASE_PROMPT.format(text=d.messages[-2]["content"])}] for d in DATA[:2]]
    assert gen.generate(prompts, opts) == [Reply(w, True) for w in want]
    head = torch.nn.Linear(gen.model.config.hidden_size, gen.model.config.vocab_size)  # ends its turn at once
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1
    gen.model.lm_head = head
    assert gen.generate(prompts, opts) == [Reply("", False)] * 2


def test_a_preference_pair_keeps_one_prompt_on_both_sides():
    """Augmenting a pair changes its prompt on the rejected side too: the result is still a pair
    that `align` reads (the same prompt, different answers)."""
    from sftlab.data.formats import to_conversation

    pair = to_conversation({"prompt": "Classify the sentiment of this review: the kettle broke after a day.",
                            "chosen": "negative", "rejected": "positive"}, "p:1")
    new, _ = augment([pair], AugmentOptions(strategies=["paraphrase", "system", "noise"], copies=2, seed=1))
    assert new
    for conv in new:
        again = to_conversation(conv.to_json(), conv.source)  # raises on a prompt mismatch
        assert again.meta["rejected"][:-1] == conv.messages[:-1] != pair.messages[:-1]
        assert again.meta["rejected"][-1]["content"] == "positive"


ORIGINAL = "Classify the sentiment of this review: the kettle broke after a day."


def test_rewrite_problem_catches_what_the_answer_filters_miss():
    """The bad rewrites of a user trial (an answer, a translation, a loop, a cut-off), each with its reason."""
    rules = CurateOptions()
    cases = {
        "Tell me whether this review is positive or negative: the kettle broke after a day.": None,
        "Sentiment of: kettle broke.": None,  # 4 words: short, but not under 0.3x the original's 12
        "negative": "much shorter than the original",  # the answer, not a rewrite
        "このレビューの感情を分類してください。": "much shorter than the original",  # a translation
        "Kyounkai no kyaku,\n" * 12: "repeats itself",
        " " + ORIGINAL.upper() + " ": "same as the original",
        "  \n": "empty",
        "Sure. " + " ".join(str(i) for i in range(40)): "much longer than the original",  # a ramble
    }
    for rewrite, reason in cases.items():
        assert rewrite_problem(ORIGINAL, Reply(rewrite, False), rules) == reason, rewrite
    assert rewrite_problem(ORIGINAL, Reply("Tell me whether this review is posit", True), rules) == "cut off at max_new_tokens"
    # a short instruction may grow to 15 words; one that repeats itself may be rewritten repeating itself
    assert rewrite_problem("Summarise:", Reply("Please write a short summary of the following text.", False), rules) is None
    data = "Sum the numbers: " + "1, 2, 1, 2, " * 6
    assert rewrite_problem(data, Reply("Add up these numbers: " + "1, 2, 1, 2, " * 6, False), rules) is None


def test_model_paraphrase_drops_bad_rewrites_and_counts_them():
    replies = ["Tell me whether this review is positive or negative: the kettle broke after a day.",
               "negative",
               "Kyounkai no kyaku,\n" * 12,
               Reply("Tell me whether this review is posit", True),
               "Give this date in ISO 8601 form: March 5, 2021"]
    opts = AugmentOptions(strategies=["model_paraphrase"], copies=4, seed=0)
    new, report = augment([DATA[0]], opts, generator=CannedGenerator(replies[:4]))
    assert [c.messages[0]["content"] for c in new] == [replies[0]] and new[0].messages[1] == DATA[0].messages[1]
    assert report.rewrites_dropped == {"much shorter than the original": 1, "repeats itself": 1,
                                       "cut off at max_new_tokens": 1}
    assert report.generated["model_paraphrase"] == report.kept["model_paraphrase"] == 1
    assert report.to_json()["rewrites_dropped"] == dict(report.rewrites_dropped)


def test_variants_get_ids_of_their_own():
    """A source's id is not copied: ids stay unique, derived from the source's; no id, none made up."""
    with_id = [Conversation(messages=d.messages, source=d.source, meta={"id": f"sg-{k}"}) for k, d in enumerate(DATA)]
    new, _ = augment(with_id, AugmentOptions(strategies=["paraphrase", "noise"], copies=2, seed=1))
    ids = [c.meta["id"] for c in [*with_id, *new]]
    assert len(new) > 3 and len(set(ids)) == len(ids)
    for c in new:
        src = next(d for d in with_id if d.source == c.meta["augmented_from"])
        assert c.meta["id"] == f"{src.meta['id']}~{c.source.rsplit('#', 1)[1]}"  # e.g. sg-0~paraphrase1
    new, _ = augment(DATA, AugmentOptions(strategies=["paraphrase"]))
    assert new and all("id" not in c.meta for c in new)


def test_summary_says_where_near_dedup_applies():
    replies = ["Instruction: Convert this date to ISO format: July 9, 1999\nAnswer: 1999-07-09"]
    opts = AugmentOptions(strategies=["paraphrase", "self_instruct"], self_instruct_count=1, seed=0)
    _, report = augment(DATA, opts, generator=CannedGenerator(replies))
    filtered = report.to_json()["filtered"]
    assert filtered["paraphrase"]["near_dedup"] is False and filtered["self_instruct"]["near_dedup"] is True


def test_augment_command_reports_dropped_rewrites_and_writes_unique_ids(tmp_path, monkeypatch, capsys):
    import sftlab.data.augment as augment_module
    from sftlab.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"sg-{k}", "messages": d.messages}) + "\n" for k, d in enumerate(DATA[:2])))
    replies = ["Tell me whether this review is positive or negative: the kettle broke after a day.",
               "Kyounkai no kyaku,\n" * 12]
    monkeypatch.setattr(augment_module, "LocalGenerator", lambda model, template: CannedGenerator(replies))
    out = tmp_path / "out.jsonl"
    assert main(["data", "augment", str(src), "--out", str(out), "--strategy", "model_paraphrase", "--model", "stub"]) == 0
    assert "dropped rewrites: repeats itself 1" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["sg-0", "sg-1", "sg-0~model_paraphrase0"]
    summary = json.loads((tmp_path / "out.augment.json").read_text())
    assert summary["rewrites_dropped"] == {"repeats itself": 1} and summary["kept_total"] == 1
    assert summary["filtered"]["model_paraphrase"]["near_dedup"] is False
