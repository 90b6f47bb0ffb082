"""A new user's mistakes that show only once the data or the model is loaded: each is one line
naming the fix (no traceback), and nothing that was asked for is dropped without a word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.config import load_config
from sftlab.errors import SftlabError


def write_chats(path: Path, answers: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say {a}."}, {"role": "assistant", "content": a}]}
            for a in answers]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(model: Path, tmp_path: Path, *overrides):
    return load_config(None, [f"model.name_or_path={model}", f"data.train={write_chats(tmp_path / 't.jsonl', ['yes', 'no'])}",
                              "data.max_seq_length=96", "training.max_steps=1", "training.bf16=false",
                              f"output_dir={tmp_path / 'run'}", *overrides])


def test_target_modules_that_match_nothing_name_the_models_layers(tiny_model_dir, tmp_path):
    from sftlab.train.trainer import build_model

    for targets, extra in (("[query_key_value]", ""), ("q_proj,v_proj", "(a list is written [a,b]")):
        with pytest.raises(SftlabError) as e:  # was: PEFT's NoMatchingPeftModuleError, as a traceback
            build_model(config(tiny_model_dir, tmp_path, f"lora.target_modules={targets}"), use_bf16=False)
        message = str(e.value)
        assert message.startswith("lora.target_modules:") and "matches no layer of LlamaForCausalLM" in message
        assert "q_proj" in message and "e.g. lora.target_modules=[q_proj,v_proj]" in message and extra in message


def test_validation_data_with_no_usable_example_is_an_error(tiny_model_dir, tmp_path, monkeypatch):
    from sftlab.train.trainer import train

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    long = write_chats(tmp_path / "v.jsonl", ["word " * 200])  # every example over max_seq_length: all dropped
    cfg = config(tiny_model_dir, tmp_path, f"data.validation={long}", "training.early_stopping_patience=2")
    with pytest.raises(SftlabError, match="v.jsonl: no usable validation example"):  # was: trained on, no eval, no stopping
        train(cfg, log=lambda *a, **k: None)


def test_training_data_all_too_long_says_raise_max_seq_length(tiny_model_dir, tmp_path, monkeypatch):
    """Under truncation the prompt alone can fill max_seq_length: every record is dropped, and the
    error says why and what to change, not only 'see the counts above'."""
    from sftlab.train.trainer import train

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    cfg = config(tiny_model_dir, tmp_path, "data.truncation=truncate", "data.max_seq_length=8")
    with pytest.raises(SftlabError, match=r"t.jsonl: no usable training example .*; 2 too long, e.g. .*t.jsonl:1: "
                                          r"no trained token left after truncating to 8 tokens: raise data.max_seq_length"):
        train(cfg, log=lambda *a, **k: None)


def test_early_stopping_without_validation_data_says_it_does_not_apply(tiny_model_dir, tmp_path, monkeypatch):
    from sftlab.train.trainer import train

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    lines = []
    train(config(tiny_model_dir, tmp_path, "training.early_stopping_patience=2", "training.compile_norms=false"),
          log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("training.early_stopping_patience: no data.validation") for line in lines)
