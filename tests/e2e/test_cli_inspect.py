"""`sftlab data inspect`: JSON mode gives the exact mask; human mode highlights trained tokens."""

from __future__ import annotations

import json

from sftlab.cli import main
from sftlab.data.render import IGNORE


def test_inspect_json_shows_source_ids_and_labels(tmp_path, tiny_model_dir, tokenizer, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Capital of France?"},
                                             {"role": "assistant", "content": "Paris."}]}) + "\n")
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(rows) == 1 and rows[0]["source"] == f"{data}:1"
    trained = [t for t, lab in zip(rows[0]["input_ids"], rows[0]["labels"]) if lab != IGNORE]
    assert tokenizer.decode(trained) == "Paris.<|im_end|>"


def test_inspect_with_a_template_override_and_human_output(tmp_path, tiny_model_dir, capsys):
    from pathlib import Path

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    template = Path(__file__).parents[1] / "fixtures" / "templates" / "plain_no_eos.jinja"
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--chat-template", str(template)]) == 0
    out = capsys.readouterr().out
    assert "User: Say hi" in out and "2 trained" in out  # "hi" and the EOS the template lacks


def test_inspect_and_report_take_model_template_and_data_from_a_config(tmp_path, tiny_model_dir, tokenizer, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Q{i}?", "a": f"A{i}."}) + "\n" for i in range(4)))
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}, chat_template: llama3}}\n"
                      f"data: {{train: {data}, columns: {{prompt: q, response: a}}}}\n")
    assert main(["data", "inspect", "--config", str(config), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and rows[0]["source"] == f"{data}:1"
    eot = len(tokenizer) + 2  # llama3 added <|start_header_id|>, <|end_header_id|>, <|eot_id|>
    assert [t for t, lab in zip(rows[3]["input_ids"], rows[3]["labels"]) if lab != IGNORE][-1] == eot
    assert main(["data", "report", "--config", str(config), "--out-dir", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["dataset"] == str(data) and summary["chat"] == 4 and summary["length_unit"] == "tokens"
    assert main(["data", "inspect", "--json"]) == 1
    assert "give a dataset FILE, or --config" in capsys.readouterr().err


def test_inspect_shows_both_sides_of_a_pair_and_what_a_kto_label_means(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A pair's rejected side, rendered as alignment scores it (its last answer), on screen and in JSON;
    an answer labelled false is marked as one sftlab train leaves out."""
    monkeypatch.chdir(tmp_path)  # short sources: the rule above an example is one screen line
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."}) + "\n"
                    + json.dumps({"prompt": "2+2?", "completion": "5", "label": False}) + "\n")
    assert main(["data", "inspect", "prefs.jsonl", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "prefs.jsonl:1 (chosen)" in out and "prefs.jsonl:1 (rejected: its last answer is scored)" in out
    assert "prefs.jsonl:2 (label: false: not trained by sftlab train)" in out
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--json"]) == 0
    pair = json.loads(capsys.readouterr().out.splitlines()[0])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    side = pair["rejected"]
    assert tok.decode([t for t, lab in zip(side["input_ids"], side["labels"]) if lab != -100]) == "Quito.<|im_end|>"


def test_inspect_header_of_a_saved_dataset_dict_shows_its_split(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The source `ds[train]:row 1` is printed as text: rich must not read `[train]` as markup."""
    from datasets import Dataset, DatasetDict

    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk("ds")
    assert main(["data", "inspect", "ds", "--model", str(tiny_model_dir)]) == 0
    assert "ds[train]:row 1" in capsys.readouterr().out
    assert main(["data", "inspect", "ds", "--model", str(tiny_model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["source"] == "ds[train]:row 1"
