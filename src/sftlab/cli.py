"""`sftlab` entry point: a registry of commands, each in its own module, imported lazily.

`sftlab --help` must answer fast, so nothing heavy (torch, transformers, even typer) is
imported until a command is chosen. Each module in `sftlab.commands` exposes a typer
`app`; a user mistake raises `SftlabError` and is printed as one line, exit code 1.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# name -> (module, one-line help). Order is the order shown by `sftlab --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("sftlab.commands.quickstart", "The whole path on the embedded default model: data, LoRA, eval."),
    "data": ("sftlab.commands.data", "Datasets in, datasets out: inspect, validate, curate, augment, split, report."),
    "train": ("sftlab.commands.train", "Supervised fine-tuning from a YAML config (full / LoRA / DoRA / QLoRA)."),
    "sweep": ("sftlab.commands.sweep", "Hyper-parameter search with Optuna: each trial a run, HTML report, best config."),
    "runs": ("sftlab.commands.runs", "One line per run in a folder: method, data, steps, losses, time (table, CSV, Markdown)."),
    "align": ("sftlab.commands.align", "Preference tuning after SFT: DPO, ORPO or KTO on chosen/rejected data."),
    "eval": ("sftlab.commands.eval", "Evaluate a model or run on a dataset (EM, accuracy, F1, BLEU, ROUGE, perplexity)."),
    "compare": ("sftlab.commands.compare", "Base vs tuned: metrics, confidence intervals, plots, HTML report."),
    "estimate": ("sftlab.commands.estimate", "Memory estimate before training (weights, grads, optimizer, activations)."),
    "export": ("sftlab.commands.export", "Export a run or model: merged safetensors, GGUF, ONNX, or a Triton model repository."),
    "serve": ("sftlab.commands.serve", "OpenAI-compatible HTTP server for a model or run."),
    "chat": ("sftlab.commands.chat", "Chat with a model or run in the terminal."),
}


def _usage() -> str:
    from sftlab import __version__

    width = max(len(n) for n in COMMANDS)
    lines = [
        f"sftlab {__version__}: supervised fine-tuning of LLMs, end to end.",
        "",
        "Usage: sftlab COMMAND [ARGS]...   (sftlab COMMAND --help for a command's options)",
        "",
        "Commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _closest(name: str) -> str:
    import difflib

    match = difflib.get_close_matches(name, COMMANDS, n=1)
    return f" Did you mean '{match[0]}'?" if match else ""


def _quiet_third_party_logs() -> None:
    import logging
    import warnings

    # Deprecation notices about transformers' own internals: nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    # ... and about torch's collectives DeepSpeed calls by their old names: ZeRO-3 printed two per step per rank
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    # bitsandbytes (imported by peft) warns at import that an optional CPU 4-bit kernel
    # package is missing, on every run, LoRA ones included; its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # sftlab's own warnings are messages to the user: one line, not a file:line and source line. Set once:
    # wrapping whatever formatter is in place at each call nested one more level per `main()` in a process.
    if warnings.formatwarning is not _one_line:
        _PLAIN_FORMAT.append(warnings.formatwarning)
        warnings.formatwarning = _one_line


_OURS = str(Path(__file__).parent)
_PLAIN_FORMAT: list = []  # the formatter `_one_line` replaced, for other libraries' warnings


def _one_line(message, category, filename, lineno, line=None) -> str:
    if str(filename).startswith(_OURS):
        return f"warning: {message}\n"
    return _PLAIN_FORMAT[-1](message, category, filename, lineno, line)


# Commands that train: on a CPU they re-execute themselves once on tcmalloc (train/allocator.py).
TRAINING = frozenset({"train", "align", "sweep", "quickstart"})
# Commands that load (and may save) a model, which imports DeepSpeed wherever it is installed.
LOADING = TRAINING | {"eval", "compare", "export", "serve", "chat"}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in TRAINING:
        from sftlab.train.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc(sys.argv[1:])
    code = _run(list(sys.argv[1:] if argv is None else argv))
    if "torch.distributed" in sys.modules:
        from sftlab.train import distributed

        if distributed.world_size() > 1:  # a rank under torchrun (or another launcher)
            distributed.end_rank(code)
    return code


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from sftlab import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'.{_closest(name)} See 'sftlab --help'.", file=sys.stderr)
        return 2
    from sftlab.errors import SftlabError

    _quiet_third_party_logs()
    if name in LOADING:
        from sftlab.train.preflight import tell_deepspeed_the_device

        tell_deepspeed_the_device()
    module = importlib.import_module(COMMANDS[name][0])
    try:
        code = module.app(args=rest, prog_name=f"sftlab {name}", standalone_mode=False)
    except SftlabError as e:
        return _error(str(e))
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:  # a path the user gave
        paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return _error(f"{e.strerror}: {paths}")
    except KeyboardInterrupt:
        return _interrupted(name)
    except SystemExit as e:  # typer/click exit codes (e.g. --help)
        return int(e.code or 0)
    except Exception as e:  # usage errors carry their own exit code and message
        usage = _usage_error_code(e)
        if usage is None:
            raise
        return usage
    if code == 130:  # typer returns it for Ctrl-C when not standalone
        return _interrupted(name)
    return code if isinstance(code, int) else 0


def _error(message: str) -> int:
    """Say `error: MESSAGE` and return 1. A process torchrun started also leaves the message in its error
    file for the launcher, and only rank 0 prints it: N processes that meet the same mistake say it once,
    and `sftlab ... --nproc N` (train/torchrun.py) prints the message of another rank that failed first."""
    import os

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        from sftlab.errors import SftlabError

        ErrorHandler().record_exception(SftlabError(message))
        if os.environ.get("RANK", "0") != "0":
            return 1
    print(f"error: {message}", file=sys.stderr)
    return 1


def _interrupted(command: str) -> int:
    hint = f" (sftlab {command} CONFIG --resume continues from the last checkpoint)" if command in ("train", "align") \
        else ""
    print(f"interrupted{hint}", file=sys.stderr)
    return 130


def _usage_error_code(e: Exception) -> int | None:
    """Show a click/typer usage error (missing option, bad value) and return its exit code; None
    for any other exception. typer >= 0.20 carries its own copy of click, whose exceptions are not
    click's: both families are checked."""
    import click
    import typer

    if isinstance(e, click.exceptions.ClickException) or (isinstance(e, typer.TyperException) and hasattr(e, "show")):
        e.show()
        return e.exit_code
    if isinstance(e, (click.exceptions.Exit, typer.Exit)):
        return e.exit_code
    if isinstance(e, (click.exceptions.Abort, typer.Abort)):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
