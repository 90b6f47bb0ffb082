"""What a new user coming from TRL, Axolotl or the HF scripts writes in a training config: each
mistake is one line that names the fix, before anything loads, and what TrainingArguments
accepts is accepted under the same name."""

from __future__ import annotations

import pytest

from sftlab.config import load_config
from sftlab.errors import SftlabError


def error_for(*overrides, path=None) -> str:
    with pytest.raises(SftlabError) as e:
        load_config(path, ["data.train=x.jsonl", *overrides])
    return str(e.value)


@pytest.mark.parametrize("override, meant", [
    ("learning_rate=1e-4", "training.learning_rate"),  # a training key at the top level
    ("warmup_steps=3", "training.warmup_steps"),  # a TrainingArguments field at the top level
    ("target_modules=[q_proj]", "lora.target_modules"),
    ("deepspeed=zero3", "distributed.deepspeed"),
    ("micro_batch_size=2", "training.per_device_train_batch_size"),  # Axolotl
    ("sequence_len=512", "data.max_seq_length"),
    ("training.batch_size=2", "training.per_device_train_batch_size"),  # was: auto_find_batch_size
    ("training.lora_r=8", "lora.r"),  # was: local_rank
    ("training.max_seq_length=64", "data.max_seq_length"),  # TRL's SFTConfig
    ("training.packing=false", "data.packing"),
    ("training.epochs=2", "training.num_train_epochs"),
    ("data.path=y.jsonl", "data.train"),
    ("data.eval=y.jsonl", "data.validation"),
    ("peft=lora", "method"),
])
def test_a_key_in_the_wrong_place_or_by_another_tools_name_names_sftlabs_key(override, meant):
    assert f"did you mean '{meant}'?" in error_for(override)


def test_close_misspellings_keep_their_hint():
    assert "did you mean 'training.learning_rate'?" in error_for("training.learning_rat=1e-4")
    assert "did you mean 'lora.alpha'?" in error_for("lora.lora_alpha=16")
    assert "did you mean 'data.validation'?" in error_for("data.valid=y.jsonl")


@pytest.mark.parametrize("override, expected", [
    ("training.torch_compile=maybe", "bool"),  # was: a truthy string, so compiling turned on
    ("training.ddp_timeout=soon", "int"),  # was: accepted, to fail inside the run
    ("training.neftune_noise_alpha=abc", "float"),  # was: a traceback at the first step
])
def test_a_passed_through_training_argument_of_the_wrong_type_is_refused(override, expected):
    message = error_for(override)
    assert message.startswith("overrides: 'training.") and f"TrainingArguments takes {expected}" in message


def test_passed_through_training_arguments_of_the_right_type_still_pass():
    cfg = load_config(None, ["data.train=x.jsonl", "training.torch_compile=false", "training.ddp_timeout=3600",
                             "training.neftune_noise_alpha=5", "training.eval_strategy=no", "training.warmup_steps=0.1"])
    assert cfg.training.passthrough()["ddp_timeout"] == 3600


@pytest.mark.parametrize("value, expected", [("wandb", ["wandb"]), ("none", []), ("all", ["all"]),
                                             ("[tensorboard, mlflow]", ["tensorboard", "mlflow"])])
def test_report_to_takes_one_name_as_transformers_does(value, expected):
    assert load_config(None, ["data.train=x.jsonl", f"training.report_to={value}"]).training.report_to == expected


def test_a_relative_path_meant_from_the_config_folder_says_so(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{}\n")
    (folder / "cfg.yaml").write_text("data: {train: train.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    message = str(pytest.raises(SftlabError, load_config, "project/cfg.yaml").value)
    assert "data.train 'train.jsonl' is not in the current directory" in message
    assert "run it from project" in message and "project/train.jsonl" in message
    monkeypatch.chdir(folder)  # from the config's folder, as the docs say: fine
    assert load_config("cfg.yaml").data.train == "train.jsonl"
    monkeypatch.chdir(tmp_path)  # given on the command line, a path is the user's own, from here
    assert load_config("project/cfg.yaml", ["data.train=project/train.jsonl"]).data.train == "project/train.jsonl"


def args_error(*overrides, has_eval) -> str:
    from sftlab.train.trainer import training_args

    cfg = load_config(None, ["data.train=x.jsonl", *overrides])
    with pytest.raises(SftlabError) as e:
        training_args(cfg, __import__("pathlib").Path("unused"), has_eval=has_eval, use_bf16=False)
    return str(e.value)


def test_evaluation_asked_for_by_its_hf_name_without_validation_data_is_one_line():
    assert args_error("training.eval_strategy=steps", has_eval=False).startswith(
        "training.eval_strategy: evaluation needs validation data: set data.validation")
    assert args_error("training.eval_on_start=true", has_eval=False).startswith("training.eval_on_start: evaluation needs")


def test_early_stopping_with_another_eval_strategy_says_what_to_change():
    message = args_error("training.eval_strategy=epoch", "training.early_stopping_patience=2", has_eval=True)
    assert message.startswith("training.eval_strategy: epoch cannot keep the best checkpoint")
    assert "leave eval_strategy out" in message  # not transformers' "set save_strategy", which sftlab refuses


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="DeepSpeed on a CPU")
def test_deepspeed_on_a_cpu_trains_fp32_even_where_the_cpu_has_bf16(monkeypatch):
    from sftlab.train import preflight

    monkeypatch.setattr(preflight, "device_supports_bf16", lambda: True)
    cfg = load_config(None, ["data.train=x.jsonl", "distributed=zero3"])
    assert preflight.wants_bf16(cfg) is False  # auto: transformers refuses bf16 under DeepSpeed without a GPU
    assert preflight.wants_bf16(load_config(None, ["data.train=x.jsonl"])) is True
    explicit = load_config(None, ["data.train=x.jsonl", "distributed=zero3", "training.bf16=true"])
    with pytest.raises(SftlabError, match=r"^training.bf16: DeepSpeed on a CPU trains in fp32.*training.bf16=false"):
        preflight.preflight(explicit)


def test_a_tracker_that_fails_to_start_is_one_line_naming_it():
    from sftlab.train.trainer import tracker_errors

    usage_error = type("UsageError", (Exception,), {"__module__": "wandb.errors.errors"})
    with pytest.raises(SftlabError, match=r"^training.report_to: wandb failed: No API key configured\. .*WANDB_MODE=offline"):
        with tracker_errors(["wandb"]):  # was: wandb's UsageError as a traceback from the Trainer's callbacks
            raise usage_error("No API key configured.\nUse `wandb login` to log in.")
    with pytest.raises(RuntimeError):  # anything else is not the tracker's
        with tracker_errors(["wandb"]):
            raise RuntimeError("boom")


def test_no_target_message_lists_the_linear_layers_lora_can_target():
    """The message dropped the output head by its name, lm_head: BioGPT's, output_projection, was offered as a
    target. It now lists what the estimate counts (estimate.linear_layers)."""
    from transformers import BioGptConfig, BioGptForCausalLM

    from sftlab.train.trainer import no_target_message

    model = BioGptForCausalLM(BioGptConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64))
    assert "its linear layers are fc1, fc2, k_proj, out_proj, q_proj, v_proj:" in no_target_message(model, ["x"])
