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
