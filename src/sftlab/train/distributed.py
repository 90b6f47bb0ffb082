"""Several processes through the existing engines: DDP, DeepSpeed ZeRO-2/3, FSDP2.

- `engine_arguments(config)`: the config's `distributed:` section (or `training.deepspeed` /
  `training.fsdp_config`) as TrainingArguments keywords (`deepspeed=` a ZeRO JSON, or
  `fsdp=True, fsdp_config=`), checked before anything starts (`engine_settings`); the Trainer
  and accelerate do the sharding, sftlab adds none of its own.
- `launch(nproc, argv)`: `sftlab train --nproc N` starts the same command under torchrun.
  Whatever the launcher (torchrun, accelerate launch, deepspeed, a scheduler), the processes
  find each other through the usual variables: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
- `on_main_process(fn, ...)`: the one place that decides who writes run files (rank 0).
- `save_final_model(trainer, path)`: ZeRO-3 / FSDP shards gathered into one safetensors model
  or PEFT adapter that loads in a single process.

CPU (tests, laptops): accelerate 1.16 sets up DeepSpeed and FSDP only on accelerator devices
(on CPU, `fsdp=` silently trains plain DDP and `deepspeed=` sees a world of one). There the
same engines are enabled through accelerate's public state: a pre-configured `PartialState`
on gloo for DeepSpeed (`use_configured_state`), and the FSDP plugin for the Trainer's
accelerator; the tests check that parameters really are sharded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from sftlab.errors import SftlabError

ENGINE_DIR = Path(__file__).with_name("engines")
DEEPSPEED_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def on_main_process(fn: Callable, *args, **kwargs):
    """Run `fn` on rank 0 only (the run's files: config, run.json, model card, model, logs)."""
    return fn(*args, **kwargs) if is_main_process() else None


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def end_rank(code: int) -> NoReturn:
    """Leave a process started by torchrun: process group torn down, output flushed, os._exit(code).

    Left to the interpreter's normal exit, a rank that finished its work sometimes aborts after
    the last Python frame ("terminate called without an active exception": a C++ thread object
    of torch's destroyed while still joinable), and torchrun then reports the whole run as failed.
    Skipping the static destructors avoids it; nothing of ours runs there."""
    import logging

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parameter_count(model, trainable_only: bool = False) -> int:
    """Parameters of the whole model, also after ZeRO-3 has partitioned them (`ds_numel`);
    FSDP2's DTensor parameters report their full size anyway."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def engine_name(dist_config, passthrough: dict) -> str:
    """ddp | deepspeed | fsdp: the section's engine, or what training.deepspeed / training.fsdp say."""
    if passthrough.get("deepspeed"):
        return "deepspeed"
    if passthrough.get("fsdp"):
        return "fsdp"
    return dist_config.engine


def _engine_file(value: str, names: tuple[str, ...], key: str, suffixes: tuple[str, ...]) -> Path:
    if value in names:
        return ENGINE_DIR / f"{value}{suffixes[0]}"
    path = Path(value).expanduser()
    if path.suffix not in suffixes:
        raise SftlabError(f"{key}: '{value}' is not one of {', '.join(names)} nor a {'/'.join(suffixes)} file")
    if not path.is_file():
        raise SftlabError(f"{key}: file not found: {path}")
    return path


def deepspeed_config(value: str, key: str = "distributed.deepspeed") -> dict:
    """A ZeRO config by name (configs/zero3.json, ...) or path, as a dict."""
    path = _engine_file(value, DEEPSPEED_CONFIGS, key, (".json",))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SftlabError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise SftlabError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def with_zero3_final_save(ds: dict, origin: str) -> dict:
    """A ZeRO-3 config that gathers the weights for the final save.

    accelerate gathers a ZeRO-3 model only with `stage3_gather_16bit_weights_on_model_save`;
    without it the final save fails after the whole training. Unset, it is turned on here
    (the weights gathered are the engine's working copy: 16-bit under bf16/fp16); set to
    anything but true, the run is refused before it starts."""
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        return ds
    flag = zero.get("stage3_gather_16bit_weights_on_model_save")
    if flag is None:
        return {**ds, "zero_optimization": {**zero, "stage3_gather_16bit_weights_on_model_save": True}}
    if flag is not True:
        raise SftlabError(f"{origin}: zero_optimization.stage3_gather_16bit_weights_on_model_save is {flag!r}: "
                          "set it to true (or leave it out); the final model is gathered from the shards with it")
    return ds


def fsdp_config(value: str, key: str = "distributed.fsdp") -> dict:
    """An fsdp_config by name ('fsdp' = configs/fsdp.json) or path (.json/.yaml), as a dict."""
    import yaml

    from sftlab.yamlio import safe_load

    path = _engine_file(value, ("fsdp",), key, (".json", ".yaml", ".yml"))
    try:
        data = safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SftlabError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SftlabError(f"{path}: an fsdp_config must be a mapping")
    if int(data.get("version", 2)) != 2:
        raise SftlabError(f"{path}: only FSDP2 (version: 2) is supported; FSDP1 is deprecated in transformers 5")
    return data


def _single_process_rendezvous() -> None:
    """DeepSpeed and FSDP need a process group even for one process: a local one of size 1."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def engine_settings(config) -> dict[str, Any]:
    """TrainingArguments keywords for the config's engine, checked, with nothing started yet
    (`sftlab train` calls it before launching processes): none for DDP (the Trainer wraps the
    model in DistributedDataParallel whenever WORLD_SIZE > 1); `deepspeed=` the ZeRO config as
    a dict and `fsdp_config=` the FSDP one, from the `distributed:` section or from
    `training.deepspeed` / `training.fsdp_config` (a dict, a file, or a shipped config's name)."""
    passthrough = config.training.passthrough()
    engine = engine_name(config.distributed, passthrough)
    if engine == "ddp":
        return {}
    if engine == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:  # found, not imported: the launcher does not train
            raise SftlabError("distributed: deepspeed needs DeepSpeed: pip install 'sftlab[scale]'")
        given = passthrough.get("deepspeed")
        if isinstance(given, dict):
            ds, origin = given, "training.deepspeed"
        elif given:
            ds, origin = deepspeed_config(str(given), "training.deepspeed"), f"training.deepspeed ({given})"
        else:
            ds, origin = deepspeed_config(config.distributed.deepspeed), f"distributed.deepspeed ({config.distributed.deepspeed})"
        ds = with_zero3_final_save(ds, origin)
        sharded = ds.get("zero_optimization", {}).get("stage") == 3
        kwargs: dict[str, Any] = {"deepspeed": ds}
    else:
        given = passthrough.get("fsdp_config")
        if isinstance(given, dict):
            fsdp = given
        else:
            fsdp = fsdp_config(str(given), "training.fsdp_config") if given else fsdp_config(config.distributed.fsdp)
        sharded = True
        kwargs = {"fsdp": passthrough.get("fsdp") or True, "fsdp_config": fsdp}
    if config.method == "qlora" and sharded:
        raise SftlabError(
            f"method qlora cannot run under {'ZeRO-3' if engine == 'deepspeed' else 'FSDP'} in sftlab: "
            "its 4-bit weights are not shardable here. Use method: lora, or QLoRA with distributed: zero2 or ddp"
        )
    return kwargs


def engine_arguments(config) -> dict[str, Any]:
    """`engine_settings`, with what the engine needs in this process set up: a process group
    of one for a single process, and accelerate's state for DeepSpeed on CPU."""
    import torch

    kwargs = engine_settings(config)
    if not kwargs:
        return kwargs
    _single_process_rendezvous()
    if "deepspeed" in kwargs and not torch.cuda.is_available():
        kwargs.update(_deepspeed_on_cpu())
    return kwargs


def _deepspeed_on_cpu() -> dict[str, Any]:
    """accelerate picks no backend for DeepSpeed without an accelerator device: give it gloo."""
    from accelerate.state import AcceleratorState, PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as `accelerate launch` sets it for DeepSpeed
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh state per run, as TrainingArguments does
    PartialState(backend="gloo")
    return {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}


def attach(trainer) -> None:
    """After the Trainer is built: on CPU, hand accelerate the FSDP plugin it would have used on a GPU."""
    import torch

    if trainer.is_fsdp_enabled or not trainer.args.fsdp or torch.cuda.is_available():
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def describe(trainer) -> str:
    """The engine and the process count, e.g. 'DeepSpeed ZeRO-3 x 2 processes'."""
    if trainer.is_deepspeed_enabled:
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        engine = f"DeepSpeed ZeRO-{stage}"
    elif trainer.is_fsdp_enabled:
        engine = "FSDP2"
    elif trainer.args.world_size == 1:
        return "one process"
    else:
        engine = "DDP"
    n = trainer.args.world_size
    return f"{engine} x {n} process{'es' if n > 1 else ''}"


def save_final_model(trainer, path: Path) -> None:
    """Save the trained model (or PEFT adapter) as plain safetensors on rank 0.

    Every process must call it: ZeRO-3 and FSDP gather the shards collectively first."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    state = None
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full tensors on rank 0 (accelerate's get_state_dict passes broadcast_from_rank0, which
        # leaves DTensors in place with torch 2.13)
        state = get_model_state_dict(trainer.model_wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if is_main_process():
        from peft import PeftModel

        from sftlab.models import save_adapter

        if isinstance(model, PeftModel):
            save_adapter(model, path, state_dict=state)
        else:
            model.save_pretrained(path, state_dict=state, safe_serialization=True)
    barrier()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun (train/torchrun.py) on this machine for `sftlab ARGV` with `nproc` processes."""
    return [sys.executable, "-m", "sftlab.train.torchrun", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "sftlab.cli", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `sftlab ARGV` in `nproc` processes under torchrun; returns its exit code."""
    import subprocess

    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # share the cores out, instead of torchrun's blanket 1
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.call(torchrun_command(nproc, argv), env=env)
