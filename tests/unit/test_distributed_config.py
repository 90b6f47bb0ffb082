"""The `distributed:` section, engine files by name or path, TrainingArguments pass-through,
and the per-process memory estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.train import distributed
from sftlab.train.trainer import training_args

REPO = Path(__file__).parents[2]


def cfg(*overrides):
    return load_config(None, ["data.train=x.jsonl", *overrides])


def test_any_training_arguments_field_passes_through_typed_fields_stay_checked(tmp_path):
    c = cfg("training.warmup_steps=10", "training.eval_strategy=no", "training.neftune_noise_alpha=5",
            "training.torch_compile=false", "training.logging_steps=3")
    assert c.training.passthrough() == {"warmup_steps": 10, "eval_strategy": "no", "neftune_noise_alpha": 5,
                                        "torch_compile": False}
    a = training_args(c, tmp_path, has_eval=False, use_bf16=False)
    assert (a.warmup_steps, a.neftune_noise_alpha, a.torch_compile, a.logging_steps) == (10, 5, False, 3)
    with pytest.raises(SftlabError, match="logging_steps"):
        cfg("training.logging_steps=zero")  # a typed field is still checked here


def test_unknown_training_key_names_the_closest_field():
    with pytest.raises(SftlabError, match=r"unknown key 'training.warmup_stepz'; did you mean 'training.warmup_steps'\?"):
        cfg("training.warmup_stepz=3")
    with pytest.raises(SftlabError, match=r"unknown key 'training.xyzzy' \(not a TrainingArguments field either\)"):
        cfg("training.xyzzy=1")


@pytest.mark.parametrize("key,value,instead", [
    ("output_dir", "elsewhere", "the top-level output_dir"),
    ("remove_unused_columns", "true", "sftlab's collator needs every column"),
    ("use_cpu", "true", "CUDA_VISIBLE_DEVICES"),
    ("data_seed", "3", "training.seed"),
    ("save_strategy", "epoch", "training.save_steps"),
])
def test_training_keys_sftlab_sets_itself_are_refused_with_where_instead(key, value, instead):
    with pytest.raises(SftlabError, match=rf"^overrides: 'training.{key}' is set by sftlab; use .*{instead}") as e:
        cfg(f"training.{key}={value}")
    assert "\n" not in str(e.value)


def test_a_value_training_arguments_refuses_is_one_line(tmp_path):
    with pytest.raises(SftlabError, match=r"^training: .*sometimes") as e:
        training_args(cfg("training.eval_strategy=sometimes"), tmp_path, has_eval=False, use_bf16=False)
    assert "\n" not in str(e.value)


def test_fp16_is_typed_and_exclusive_with_bf16():
    assert cfg("training.fp16=true").training.fp16 is True
    with pytest.raises(SftlabError, match="fp16 and bf16"):
        cfg("training.fp16=true", "training.bf16=true")


@pytest.mark.parametrize("value,engine,ds,fsdp", [
    ("ddp", "ddp", "zero3", "fsdp"),
    ("zero2_offload", "deepspeed", "zero2_offload", "fsdp"),
    ("my/ds.json", "deepspeed", "my/ds.json", "fsdp"),
    ("fsdp", "fsdp", "zero3", "fsdp"),
    ("my/fsdp.yaml", "fsdp", "zero3", "my/fsdp.yaml"),
])
def test_distributed_shorthand(value, engine, ds, fsdp):
    d = cfg(f"distributed={value}").distributed
    assert (d.engine, d.deepspeed, d.fsdp) == (engine, ds, fsdp)


def test_distributed_bad_values():
    with pytest.raises(SftlabError, match="'zero9' is not ddp, zero2"):
        cfg("distributed=zero9")
    with pytest.raises(SftlabError, match="distributed.engine"):
        cfg("distributed.engine=horovod")
    with pytest.raises(SftlabError, match="deepspeed: 'zero4' is not one of zero2, zero2_offload"):
        cfg("distributed.engine=deepspeed", "distributed.deepspeed=zero4")


def test_engine_files_by_name_match_configs_folder():
    for name in distributed.DEEPSPEED_CONFIGS:
        by_name = distributed.deepspeed_config(name)
        assert by_name == json.loads((REPO / "configs" / f"{name}.json").read_text())
        assert by_name["zero_optimization"]["stage"] == int(name[4])
        assert ("offload_optimizer" in by_name["zero_optimization"]) == name.endswith("_offload")
    assert distributed.deepspeed_config("zero3")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    fsdp = distributed.fsdp_config("fsdp")
    assert fsdp["version"] == 2 and fsdp["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp == distributed.fsdp_config(str(REPO / "configs" / "fsdp.json"))


def test_engine_file_errors(tmp_path):
    with pytest.raises(SftlabError, match="file not found"):
        distributed.deepspeed_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {\n    "stage": 3\n    "offload_param": {}\n  }\n}\n')  # no comma
    with pytest.raises(SftlabError, match=rf"{bad}:4: invalid JSON"):
        distributed.deepspeed_config(str(bad))
    v1 = tmp_path / "f.yaml"
    v1.write_text("version: 1\n")
    with pytest.raises(SftlabError, match="only FSDP2"):
        distributed.fsdp_config(str(v1))


ZERO3_FILE = str(REPO / "configs" / "zero3.json")


@pytest.mark.parametrize("engine", ["distributed=zero3", "distributed=zero3_offload", "distributed=fsdp",
                                    f"distributed={ZERO3_FILE}", "training.deepspeed=zero3",
                                    f"training.deepspeed={ZERO3_FILE}", "training.fsdp=full_shard"])
def test_qlora_under_sharding_engines_fails_at_start(engine):
    with pytest.raises(SftlabError, match="qlora cannot run under"):
        distributed.engine_settings(cfg("method=qlora", engine))
    distributed.engine_settings(cfg("method=lora", engine))


def test_qlora_under_zero3_is_refused_before_any_process_starts(monkeypatch, capsys):
    from sftlab.cli import main

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("torchrun was started"))
    assert main(["train", "-", "data.train=x.jsonl", "method=qlora", f"training.deepspeed={ZERO3_FILE}",
                 "--nproc", "2"]) == 1
    assert "error: method qlora cannot run under ZeRO-3" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["distributed", "training.deepspeed"])
def test_a_shipped_deepspeed_config_by_name_or_path_wherever_one_is_accepted(key):
    by_name = distributed.engine_settings(cfg(f"{key}=zero3"))
    assert by_name == {"deepspeed": distributed.deepspeed_config("zero3")}
    assert distributed.engine_settings(cfg(f"{key}={ZERO3_FILE}")) == by_name
    with pytest.raises(SftlabError, match=rf"^{key}(\.deepspeed)?: file not found: zero9.json"):
        distributed.engine_settings(cfg(f"{key}=zero9.json"))


def test_training_fsdp_config_by_name_is_the_shipped_one():
    got = distributed.engine_settings(cfg("training.fsdp=full_shard", "training.fsdp_config=fsdp"))
    assert got == {"fsdp": "full_shard", "fsdp_config": distributed.fsdp_config("fsdp")}


def test_zero3_without_the_gather_flag_gets_it_and_false_is_refused_at_start(tmp_path):
    ds = json.loads(Path(ZERO3_FILE).read_text())
    del ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    user = tmp_path / "my_zero3.json"
    user.write_text(json.dumps(ds))
    for engine in (f"distributed={user}", f"training.deepspeed={user}"):
        got = distributed.engine_settings(cfg(engine))["deepspeed"]["zero_optimization"]
        assert got["stage3_gather_16bit_weights_on_model_save"] is True
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    user.write_text(json.dumps(ds))
    with pytest.raises(SftlabError, match=r"my_zero3.json\): zero_optimization.stage3_gather_16bit_weights_on_model_save "
                                          r"is False: set it to true"):
        distributed.engine_settings(cfg(f"training.deepspeed={user}"))
    zero2 = distributed.engine_settings(cfg("distributed=zero2"))["deepspeed"]["zero_optimization"]
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2  # only ZeRO-3 gathers


def test_fp16_without_a_gpu_is_refused_at_start_not_trained_in_fp32():
    import torch

    from sftlab.train.preflight import preflight

    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a CUDA GPU")
    with pytest.raises(SftlabError, match=r"^training.fp16: fp16 mixed precision needs a CUDA GPU"):
        preflight(cfg("training.fp16=true"))
    preflight(cfg("training.fp16=false"))


def test_align_refuses_fp16_without_a_gpu_before_writing_anything(tmp_path):
    import torch

    from sftlab.config import AlignConfig
    from sftlab.train.align import align

    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a CUDA GPU")
    config = load_config(None, ["data.train=x.jsonl", "training.fp16=true", f"output_dir={tmp_path / 'run'}"],
                         cls=AlignConfig)
    with pytest.raises(SftlabError, match="fp16 mixed precision needs a CUDA GPU"):
        align(config)
    assert not (tmp_path / "run").exists()


def test_ddp_needs_no_arguments_and_launcher_command():
    assert distributed.engine_arguments(cfg("distributed=ddp")) == {}
    cmd = distributed.torchrun_command(2, ["train", "c.yaml", "a=1"])
    assert cmd[1:] == ["-m", "sftlab.train.torchrun", "--standalone", "--nproc_per_node=2", "-m", "sftlab.cli",
                       "train", "c.yaml", "a=1"]


def test_estimate_per_process(tiny_model_dir):
    from sftlab.estimate import estimate_memory, load_model_config, model_shape

    shape = model_shape(load_model_config(tiny_model_dir))
    kw = dict(shape=shape, dtype="fp32", seq_len=64, batch=1)
    one = estimate_memory(None, "full", **kw)
    ddp = estimate_memory(None, "full", nproc=2, **kw)
    z2, z3, z3o, fsdp = (estimate_memory(None, "full", nproc=2, distributed=e, **kw)
                         for e in ("zero2", "zero3", "zero3_offload", "fsdp"))
    assert ddp.engine == "ddp" and ddp.gradients == 2 * one.gradients  # + DDP's bucket copy
    assert z2.weights == one.weights and z2.gradients == -(-one.gradients // 2)
    assert z2.optimizer == -(-one.optimizer // 2) + -(-shape.n_params * 4 // 2)  # + fp32 master partition
    assert z3.weights == -(-one.weights // 2) and z3.gathered > 0
    assert fsdp.optimizer == -(-one.optimizer // 2)  # no master copy
    assert z3o.weights == z3o.optimizer == 0 and z3o.offloaded == z3.weights + z3.optimizer
    assert z3o.total < z3.total < ddp.total
    assert estimate_memory(None, "full", nproc=4, distributed="zero3", **kw).total < z3.total


def test_an_empty_key_or_training_file_is_a_clear_error():
    from sftlab.config import load_config

    with pytest.raises(SftlabError, match="override '=3' has an empty key"):
        load_config(None, ["data.train=x.jsonl", "=3"])
    with pytest.raises(SftlabError, match="override 'training..lr=3' has an empty key"):
        load_config(None, ["data.train=x.jsonl", "training..lr=3"])
    with pytest.raises(SftlabError, match="'data.train': String should have at least 1 character"):
        load_config(None, ["data.train="])


@pytest.mark.parametrize("failed", [[0, 1], [1]])
def test_the_launcher_says_a_user_mistake_once_whichever_rank_failed(failed, tmp_path, monkeypatch, capsys):
    """Each rank records its mistake in its torchelastic error file as the CLI does (cli._error) and only
    rank 0 prints it: the launcher prints another rank's only where rank 0 did not fail on one."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, ProcessFailure

    from sftlab.errors import SftlabError
    from sftlab.train import torchrun

    failures = {}
    for rank in failed:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error-{rank}.json"))
        ErrorHandler().record_exception(SftlabError("data.jsonl:2: malformed JSON"))
        failures[rank] = ProcessFailure(local_rank=rank, pid=1, exitcode=1, error_file=str(tmp_path / f"error-{rank}.json"))

    def run(args):
        raise ChildFailedError("sftlab", failures)

    monkeypatch.setattr(torch.distributed.run, "run", run)
    assert torchrun.main(["--standalone", "--nproc_per_node=2", "-m", "sftlab.cli", "train"]) == 1
    printed = capsys.readouterr().err
    assert printed.count("error: data.jsonl:2: malformed JSON") == (0 if 0 in failed else 1), printed
    assert printed.splitlines()[-1].startswith(f"error: process {min(failed)} of 2 failed first")


def test_deepspeed_not_installed_is_named_before_any_process_starts(monkeypatch):
    """The launcher finds DeepSpeed without importing it (a second of start-up the ranks pay again)."""
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else found(name, *a))
    with pytest.raises(SftlabError, match=r"^distributed: deepspeed needs DeepSpeed: pip install 'sftlab\[scale\]'"):
        distributed.engine_settings(cfg("distributed=zero2"))
    distributed.engine_settings(cfg("distributed=fsdp"))


def test_the_launcher_checks_a_config_without_importing_the_training_stack():
    """`sftlab train --nproc N` checks the config before it starts the ranks, which import transformers, peft,
    bitsandbytes and DeepSpeed themselves: the launcher importing them too cost 7 s more per start."""
    import subprocess
    import sys

    code = ("import sys\nfrom sftlab.config import load_config\nfrom sftlab.train.preflight import preflight\n"
            "preflight(load_config(None, ['data.train=x.jsonl', 'distributed=zero3']))\n"
            "print(sorted({'transformers', 'peft', 'bitsandbytes', 'deepspeed', 'trl'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
