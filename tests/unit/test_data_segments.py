"""Template-free `segments` records (Axolotl's `input_output`): detection, conversion, errors, rendering
with exact label positions, the data commands' round trip, and a tiny `sftlab train`."""

from __future__ import annotations

import copy
import json
import random

import pytest

from sftlab.cli import main
from sftlab.data.conversation import Conversation
from sftlab.data.formats import FORMATS, detect_format, to_conversation
from sftlab.data.load import load_conversations
from sftlab.data.render import IGNORE, RenderOptions, TooLong, iter_rendered, render
from sftlab.errors import DataError, RecordError

PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
RECORD = {"segments": [{"label": False, "text": PROMPT}, {"label": True, "text": "4<|im_end|>"},
                       {"label": False, "text": "\n"}], "id": 7}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- detection and conversion

def test_segments_are_detected_and_kept_as_text_label_pairs():
    assert "segments" in FORMATS and detect_format(RECORD) == "segments"
    conv = to_conversation(RECORD, "d.jsonl:1")
    assert conv.segments == [(PROMPT, False), ("4<|im_end|>", True), ("\n", False)]
    assert conv.is_segments and not conv.is_raw_text and not conv.is_chat and conv.messages == []
    assert conv.written_text == PROMPT + "4<|im_end|>\n"
    assert conv.meta == {"id": 7}
    assert conv.to_json() == RECORD  # written back as segments, labels kept
    assert to_conversation(conv.to_json(), "x").segments == conv.segments
    assert to_conversation(RECORD, "x", "segments").segments == conv.segments  # by name too


@pytest.mark.parametrize("segments,reason", [
    ([], "'segments' is an empty list"),
    ("just text", "'segments' must be a list"),
    ([{"label": True}], "segment 1 has no 'text'"),
    ([{"label": False, "text": "a"}, {"label": True, "text": None}], "segment 2 has no 'text'"),
    ([{"label": True, "text": 5}], "segment 1's 'text' must be a string, got int"),
    ([{"text": "a"}], "segment 1 has no 'label'"),
    ([{"label": "true", "text": "a"}], "segment 1's 'label' must be true or false, got 'true'"),
    ([{"label": 1, "text": "a"}], "segment 1's 'label' must be true or false, got 1"),
    ([{"label": False, "text": "a"}, {"label": False, "text": "b"}], "no segment has label true"),
    ([{"label": False, "text": "a"}, {"label": True, "text": ""}], "every segment with label true has empty text"),
    (["a"], "segment 1 is str"),
    ([{"label": True, "text": "a", "weight": 0}], "segment 1 has 'weight'"),
])
def test_bad_segments_are_record_errors_naming_the_file_line(tmp_path, segments, reason):
    path = _write(tmp_path / "d.jsonl", [RECORD, {"segments": segments}])
    with pytest.raises(RecordError) as e:
        load_conversations(path)
    assert f"{path}:2" in str(e.value) and reason in str(e.value)


def test_a_file_of_segments_is_not_an_unknown_schema(tmp_path):
    path = _write(tmp_path / "d.jsonl", [RECORD, RECORD])
    assert [c.segments for c in load_conversations(path)] == [to_conversation(RECORD, "x").segments] * 2


# ---------------------------------------------------------------- rendering

def test_render_trains_exactly_the_label_true_segments(tokenizer):
    ex = render(to_conversation(RECORD, "d.jsonl:1"), tokenizer)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert len(ex) == 20
    assert ex.input_ids == _ids(tokenizer, PROMPT) + _ids(tokenizer, "4") + [im_end] + _ids(tokenizer, "\n")
    assert ex.input_ids[0] == im_start and ex.input_ids.count(im_start) == 2  # written, not added
    trained = [i for i, label in enumerate(ex.labels) if label != IGNORE]
    assert trained == [17, 18]
    assert [ex.input_ids[i] for i in trained] == [tokenizer.convert_tokens_to_ids("4"), im_end]
    assert ex.labels[17:19] == ex.input_ids[17:19]
    assert ex.input_ids[-1] == _ids(tokenizer, "\n")[0]  # no EOS appended: the text ends as written


def test_each_segment_is_tokenized_on_its_own(tokenizer):
    """'Hel' + 'lo' tokenized together are one token; apart, the trained tokens are 'lo''s alone."""
    assert len(_ids(tokenizer, "Hello")) == 1
    conv = Conversation(segments=[("Hel", False), ("lo", True)])
    ex = render(conv, tokenizer)
    assert ex.input_ids == _ids(tokenizer, "Hel") + _ids(tokenizer, "lo")
    assert ex.labels == [IGNORE] * len(_ids(tokenizer, "Hel")) + _ids(tokenizer, "lo")


def test_special_token_strings_become_special_tokens_even_where_the_tokenizer_splits_them(tokenizer):
    split = copy.deepcopy(tokenizer)
    split.split_special_tokens = True
    assert split("<|im_end|>", add_special_tokens=False)["input_ids"] != [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ex = render(to_conversation(RECORD, "x"), split)
    assert ex.input_ids == render(to_conversation(RECORD, "x"), tokenizer).input_ids
    assert ex.num_trained == 2


def test_no_bos_is_added_for_a_tokenizer_that_adds_one(tokenizer):
    bos = copy.deepcopy(tokenizer)
    bos.add_bos_token = True
    assert bos("a")["input_ids"][0] == bos.bos_token_id  # it would add one to a text
    ex = render(Conversation(segments=[("Q: a\nA:", False), (" b", True)]), bos)
    assert ex.input_ids == _ids(bos, "Q: a\nA:") + _ids(bos, " b")


def test_over_long_segments_follow_the_truncation_policy_not_blocks(tokenizer):
    conv = to_conversation(RECORD, "d.jsonl:1")
    with pytest.raises(TooLong):
        render(conv, tokenizer, RenderOptions(max_seq_length=10))
    with pytest.raises(TooLong, match="no trained token left"):  # the answer is past token 10
        render(conv, tokenizer, RenderOptions(max_seq_length=10, truncation="truncate"))
    cut = render(conv, tokenizer, RenderOptions(max_seq_length=18, truncation="truncate"))
    assert len(cut) == 18 and cut.truncated and cut.num_trained == 1
    # training renders raw text whole to split it into blocks; segments are dropped as chats are
    [(_, item)] = list(iter_rendered([conv], tokenizer, RenderOptions(max_seq_length=10, split_text=True)))
    assert isinstance(item, TooLong)


def test_training_data_keeps_segments_whole_and_counts_their_trained_tokens(tokenizer, tmp_path):
    from sftlab.config import DataConfig
    from sftlab.train.dataset import prepare_examples

    path = _write(tmp_path / "d.jsonl", [RECORD, {"segments": [{"label": False, "text": "x " * 40},
                                                                {"label": True, "text": "y"}]}])
    examples, stats = prepare_examples(str(path), tokenizer, DataConfig(train=str(path), max_seq_length=24),
                                       tmp_path / "cache")
    assert len(examples) == 1 and stats.too_long == 1 and stats.text_blocks == 0
    assert stats.trained_tokens == 2 and examples[0].labels[17:19] == examples[0].input_ids[17:19]


# ---------------------------------------------------------------- data commands

def test_curate_round_trips_segments_and_dedups_them_by_text_and_labels(tmp_path):
    relabelled = {"segments": [{**s, "label": not s["label"]} if s["text"] == "\n" else s for s in RECORD["segments"]]}
    other = {"segments": [{"label": False, "text": "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"},
                          {"label": True, "text": "Teal, a blue-green; ask teal@example.com.<|im_end|>"}]}
    path = _write(tmp_path / "d.jsonl", [RECORD, RECORD, relabelled, other])
    out = tmp_path / "c.jsonl"
    assert main(["data", "curate", str(path), "--out", str(out), "--set", "near_dedup=false",
                 "--set", "empty_answer=false", "--pii"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    scrubbed = copy.deepcopy(other)
    scrubbed["segments"][1]["text"] = "Teal, a blue-green; ask [EMAIL].<|im_end|>"
    assert rows == [RECORD, relabelled, scrubbed]  # the exact duplicate removed; labels kept; PII scrubbed
    assert [c.segments for c in load_conversations(out)] == [to_conversation(r, "x").segments for r in rows]


def test_curate_answer_pairs_join_runs_of_trained_segments():
    from sftlab.data.curate import answer_pairs

    conv = Conversation(segments=[("Q1 ", False), ("A1", True), ("</s>", True), ("Q2", False), ("A2", True)])
    assert answer_pairs(conv) == [("Q1 ", "A1</s>"), ("Q2", "A2")]


def test_inspect_shows_the_trained_tokens(tmp_path, capsys):
    from sftlab.data.inspect import inspect_file
    from tests.conftest import TOKENIZER_DIR

    path = _write(tmp_path / "d.jsonl", [RECORD])
    assert inspect_file(str(path), model=str(TOKENIZER_DIR), as_json=True) == 1
    row = json.loads(capsys.readouterr().out)
    assert [i for i, label in enumerate(row["labels"]) if label != IGNORE] == [17, 18]
    assert inspect_file(str(path), model=str(TOKENIZER_DIR)) == 1
    assert "20 tokens, 2 trained" in capsys.readouterr().out


def test_evaluation_refuses_segments():
    from sftlab.evaluation.evaluate import check_evaluable

    with pytest.raises(DataError, match="segments have no prompt/answer split"):
        check_evaluable(to_conversation(RECORD, "d.jsonl:1"))


def test_report_review_and_augment_read_segments():
    from sftlab.data.augment import AugmentOptions, augment, system_variation
    from sftlab.data.report import dataset_summary
    from sftlab.data.review.log import ItemState
    from sftlab.data.review.session import edited

    conv = to_conversation(RECORD, "d.jsonl:1")
    summary, _ = dataset_summary([conv])
    assert summary["segments"] == 1 and summary["chat"] == 0 and summary["segments_length"]["count"] == 1
    state = ItemState()
    state.edits[1] = "5<|im_end|>"
    assert edited(conv, state).segments == [(PROMPT, False), ("5<|im_end|>", True), ("\n", False)]
    kept, report = augment([conv], AugmentOptions(strategies=["system", "noise"]))
    assert sum(report.generated.values()) == 0
    assert system_variation(conv, AugmentOptions(), random.Random(0)) == []  # not a chat with only a system message


# ---------------------------------------------------------------- end to end

def test_train_on_segments_trains_the_label_true_tokens(tiny_model_dir, tmp_path, tokenizer):
    answers = ["4", "6", "8", "10"]
    records = [{"segments": [{"label": False, "text": f"<|im_start|>user\nWhat is {n} + {n}?<|im_end|>\n"
                                                      "<|im_start|>assistant\n"},
                             {"label": True, "text": f"{a}<|im_end|>"}, {"label": False, "text": "\n"}]}
               for n, a in zip(("2", "3", "4", "5"), answers)]
    path = _write(tmp_path / "d.jsonl", records)
    out = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={path}", "data.max_seq_length=64",
                 "training.num_train_epochs=1", "training.bf16=false", "lora.r=4", f"output_dir={out}"]) == 0
    info = json.loads((out / "run.json").read_text())
    expected = sum(len(_ids(tokenizer, f"{a}<|im_end|>")) for a in answers)
    assert info["train_data"]["trained_tokens"] == expected
    assert info["trained_tokens_seen"] == expected
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_segments_need_no_chat_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert render(to_conversation(RECORD, "x"), bare).num_trained == 2
