"""`sftlab sweep`: hyper-parameter search with Optuna, each trial a normal run directory.

Why not `Trainer.hyperparameter_search`: it re-creates one Trainer per trial inside a single
output folder and `model_init`, so trials would not be run directories (config.yaml, run.json,
metrics.jsonl, adapter) that `sftlab eval/compare/export/runs` understand, and the data
pipeline, model set-up and run.json live in `train()`, not in a Trainer. So Optuna is used
directly: each trial is `sftlab train` (that is, `train(config)`) on the trial's config, in a
child process writing SWEEP/trial-NNN.

Pruning without a hook in `train()`: the child writes metrics.jsonl as it trains; this process
reads each new `eval_loss` line, reports it to the Optuna trial and, when the pruner says so,
stops the child (SIGTERM). The child process also gives every trial a fresh memory space, and a
killed sweep leaves no half-initialised state behind.

Resuming: the study lives in SWEEP/sweep.db (Optuna RDB storage, SQLite). A sweep started
again loads it, counts finished trials toward --trials, marks trials left RUNNING by a kill
as failed and queues their parameters again.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from sftlab.config import SweepConfig, TrainConfig
from sftlab.errors import SftlabError
from sftlab.files import atomic_write

STUDY = "sweep"
LOWER_IS_BETTER = ("loss", "perplexity")
POLL_SECONDS = 0.5
EVAL_KEYS = {"choice": "choice_accuracy"}  # metrics.json keys of eval's model metrics, where not their name


def direction_of(sweep: SweepConfig) -> str:
    if sweep.direction:
        return sweep.direction
    return "minimize" if any(w in sweep.objective for w in LOWER_IS_BETTER) else "maximize"


def objective_key(objective: str) -> str:
    """The key of `sftlab eval`'s metrics.json that scores `objective` (an alias: f1 -> macro_f1).

    Called before any trial trains: an objective eval would refuse fails here, in one line, not
    after every trial's training."""
    from sftlab.evaluation import metrics as M

    if objective == "eval_loss" or objective in M.MODEL_METRICS:
        return EVAL_KEYS.get(objective, objective)
    try:
        names = [m.name for m in M.resolve([objective])]  # eval's own names, aliases and "did you mean"
    except SftlabError as e:
        if difflib.get_close_matches(objective, ["eval_loss"], n=1, cutoff=0.8):
            raise SftlabError(f"sweep.objective: unknown objective '{objective}'; did you mean 'eval_loss'?") from None
        raise SftlabError(f"sweep.objective: {e}, or eval_loss") from None
    if len(names) > 1:
        raise SftlabError(f"sweep.objective: '{objective}' is several metrics ({', '.join(names)}); choose one")
    return names[0]


def trial_config(config: TrainConfig, params: dict[str, Any], out: Path) -> TrainConfig:
    """The base config with `params` (dotted keys) set, no sweep section, writing to `out`."""
    from pydantic import ValidationError

    tree = _base_tree(config)
    tree["output_dir"] = str(out)
    for key, value in params.items():
        _set(tree, key, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise TrialError(f"{_fmt(params)}: {e.errors()[0]['msg']}") from None


def check_space(config: TrainConfig) -> None:
    """Every key of the space names a config field, and every choice or end of a range is valid there."""
    from pydantic import ValidationError

    for key, spec in config.sweep.space.items():
        if key.split(".")[0] in ("sweep", "output_dir"):
            raise SftlabError(f"sweep.space: '{key}' is not a config key to search (e.g. training.learning_rate, lora.r)")
        values = spec if isinstance(spec, list) else [int(v) if "int" in spec else v for v in next(iter(spec.values()))]
        for v in values:
            tree = _base_tree(config)
            _set(tree, key, v)
            try:
                TrainConfig.model_validate(tree)
            except ValidationError as e:
                raise SftlabError(f"sweep.space: '{key}' = {v!r} is not valid: {e.errors()[0]['msg']}") from None


def _base_tree(config: TrainConfig) -> dict:
    tree = config.model_dump(mode="json")
    tree["sweep"] = None
    return tree


def _set(tree: dict, key: str, value: Any) -> None:
    """Set an existing dotted key: a search over a misspelled key must fail, not add a field."""
    node = tree
    for k in key.split(".")[:-1]:
        if not isinstance(node.get(k), dict):
            raise SftlabError(f"sweep.space: '{key}' is not a config key ('{k}' is not a section)")
        node = node[k]
    if key.split(".")[-1] not in node:
        raise SftlabError(f"sweep.space: '{key}' is not a config key")
    node[key.split(".")[-1]] = value


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
            continue
        (kind, (low, high)), = spec.items()
        if kind == "int":
            params[key] = trial.suggest_int(key, int(low), int(high))
        else:
            params[key] = trial.suggest_float(key, low, high, log=kind == "log_uniform")
    return params


def _sampler(sweep: SweepConfig, trials_before: int):
    """Seeded with the config's seed plus the trials the study holds already: seeded alike, a resumed
    or extended sweep would draw the first trials' points again (TPE samples at random at first)."""
    import optuna

    seed = sweep.seed + trials_before
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in sweep.space.items()}, seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(sweep: SweepConfig):
    import optuna

    if sweep.pruner == "none" or sweep.objective != "eval_loss":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_after_trials, n_warmup_steps=0)


def open_study(sweep_dir: Path, sweep: SweepConfig):
    """Create or load the study; trials a killed sweep left RUNNING become FAIL and are queued again."""
    import optuna
    from optuna.trial import TrialState

    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{sweep_dir.resolve() / 'sweep.db'}", load_if_exists=True,
        direction=direction_of(sweep), pruner=_pruner(sweep),
    )
    if study.direction.name.lower() != direction_of(sweep):
        raise SftlabError(f"{sweep_dir / 'sweep.db'} holds a sweep that {study.direction.name.lower()}s; "
                          f"this config asks to {direction_of(sweep)}: use another output_dir")
    trials = study.get_trials(deepcopy=False)
    study.sampler = _sampler(sweep, len(trials))
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.RUNNING:  # its sweep was killed
            study.tell(t.number, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried):
            continue  # (interrupted: Ctrl-C, see run_trial)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return study


def finished(study) -> int:
    """Trials that count toward --trials: complete, pruned, or failed on their own (not killed)."""
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in all_trials}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried) for t in all_trials)


def eval_losses(metrics_path: Path, start: int = 0) -> tuple[list[tuple[int, float]], int]:
    """(step, eval_loss) pairs from complete lines after byte `start`, and the new offset."""
    if not metrics_path.exists():
        return [], start
    with open(metrics_path, "rb") as f:
        f.seek(start)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    pairs = []
    for line in chunk[:end].splitlines():
        event = json.loads(line)
        if isinstance(event.get("eval_loss"), (int, float)):
            pairs.append((int(event["step"]), float(event["eval_loss"])))
    return pairs, start + end


def _child(args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "sftlab.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_trial(trial, config: TrainConfig, sweep_dir: Path, log: Callable[[str], None] = print) -> float:
    """Train (and evaluate) one trial in a child process; report eval_loss as it is logged."""
    params = suggest(trial, config.sweep.space)
    out = sweep_dir / f"trial-{trial.number:03d}"
    log(f"trial {trial.number}: {_fmt(params)}")
    cfg = trial_config(config, params, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "trial.yaml", cfg.to_yaml())
    trial.set_user_attr("run_dir", str(out))
    log_path = out / "train.log"
    proc = _child(["train", str(out / "trial.yaml")], log_path)
    try:
        losses = _follow(trial, proc, out / "metrics.jsonl")
    except KeyboardInterrupt:  # Optuna records the trial as failed: mark it for a retry on resume
        _stop(proc)
        trial.set_user_attr("interrupted", True)
        raise
    code = proc.returncode
    if code != 0:
        raise TrialError(f"trial {trial.number}: `sftlab train` exited with {code}{_child_error(log_path)}; "
                         f"see {log_path}")
    objective = config.sweep.objective
    if objective == "eval_loss":
        if not losses:
            raise TrialError(f"trial {trial.number}: no eval_loss in {out / 'metrics.jsonl'} (set data.validation)")
        return kept_eval_loss(cfg, out, losses)
    args = ["eval", str(out), "--data", config.data.validation, "--metrics", objective, "--out", str(out / "eval"),
            *eval_data_args(config)]
    proc = _child(args, log_path)
    if proc.wait() != 0:
        raise TrialError(f"trial {trial.number}: `sftlab eval` exited with {proc.returncode}"
                         f"{_child_error(log_path)}; see {log_path}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    key = objective_key(objective)
    if key not in metrics:
        raise TrialError(f"trial {trial.number}: `sftlab eval` gave no '{key}' (got {', '.join(metrics)})")
    return float(metrics[key])


def kept_eval_loss(cfg: TrainConfig, run_dir: Path, losses: list[tuple[int, float]]) -> float:
    """The eval_loss of the model the run kept: its best checkpoint's when it loads the best model at
    the end (early stopping, load_best_model_at_end), else its last evaluation's."""
    best = json.loads((run_dir / "run.json").read_text()).get("best_checkpoint")
    if best and (cfg.training.early_stopping_patience or cfg.training.load_best_model_at_end):
        return dict(losses)[int(Path(best).name.rsplit("-", 1)[1])]
    return losses[-1][1]


def eval_data_args(config: TrainConfig) -> list[str]:
    """`sftlab eval` flags that read the validation data as training read it."""
    data, args = config.data, []
    for flag, value in (("--format", data.format), ("--columns", data.columns and data.columns.to_arg()),
                        ("--split", data.split), ("--limit", config.sweep.eval_limit)):
        if value:
            args += [flag, str(value)]
    return args


def _follow(trial, proc: subprocess.Popen, metrics_path: Path) -> list[tuple[int, float]]:
    """Report each eval_loss the child logs until it exits; stop it when the pruner says so."""
    import optuna

    offset, losses = 0, []
    while True:
        code = proc.poll()
        new, offset = eval_losses(metrics_path, offset)
        for step, loss in new:
            losses.append((step, loss))
            trial.report(loss, step)
            if trial.should_prune():
                _stop(proc)
                raise optuna.TrialPruned(f"eval_loss {loss:.4f} at step {step}")
        if code is not None:
            return losses
        time.sleep(POLL_SECONDS)


def _child_error(log_path: Path) -> str:
    """The last `error: ...` line a child command wrote to its log, as ' (reason)'."""
    errors = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return f" ({errors[-1].removeprefix('error: ')})" if errors else ""


class TrialError(Exception):
    """A trial failed on its own (bad hyper-parameters, out of memory): recorded as FAIL, the sweep goes on."""


def run_sweep(config: TrainConfig, trials: int, log: Callable[[str], None] = print) -> dict:
    """Run trials until `trials` have finished in SWEEP (= config.output_dir); write the report."""
    try:
        import optuna
    except ImportError:
        raise SftlabError("sftlab sweep needs Optuna: pip install 'sftlab[sweep]'") from None

    if config.sweep is None:
        raise SftlabError("the config has no 'sweep:' section (see configs/sweep.yaml)")
    if not config.data.validation:
        raise SftlabError("sweep: data.validation is needed to score trials")
    check_space(config)
    objective_key(config.sweep.objective)
    sweep_dir = Path(config.output_dir)
    study = open_study(sweep_dir, config.sweep)
    atomic_write(sweep_dir / "sweep.yaml", config.to_yaml())
    todo = trials - finished(study)
    log(f"sweep {sweep_dir}: {finished(study)} trial(s) done, {max(todo, 0)} to run "
        f"({direction_of(config.sweep)} {config.sweep.objective})")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is one line of ours, not a traceback

    def objective(trial):
        try:
            value = run_trial(trial, config, sweep_dir, log)
        except TrialError as e:
            log(f"trial {trial.number} failed: {e}")
            raise
        log(f"trial {trial.number}: {config.sweep.objective} = {value:.4f}")
        return value

    def on_done(study, frozen):
        if frozen.state.name != "COMPLETE":
            log(f"trial {frozen.number}: {frozen.state.name.lower()}")

    if todo > 0:
        if config.sweep.sampler == "grid":  # a grid runs out: stop there instead of repeating points
            size = math.prod(len(v) for v in config.sweep.space.values())
            todo = min(todo, max(size - finished(study), 0))
        study.optimize(objective, n_trials=todo, catch=(TrialError,), callbacks=[on_done])
    from sftlab.train.sweep_report import write_report

    summary = write_report(study, config, sweep_dir)
    if summary["best"] is None:
        raise SftlabError(f"sweep {sweep_dir}: no trial finished; see trial-*/train.log")
    log(f"best: trial {summary['best']['number']} {config.sweep.objective} = {summary['best']['value']:.4f} "
        f"({_fmt(summary['best']['params'])})")
    log(f"report: {sweep_dir / 'report.html'}  best config: {sweep_dir / 'best.yaml'}")
    return summary


def best_config(config: TrainConfig, params: dict[str, Any], sweep_dir: Path) -> str:
    """YAML for `sftlab train`: the base config with the best parameters, writing to SWEEP/best."""
    return yaml.safe_dump(trial_config(config, params, sweep_dir / "best").model_dump(mode="json", exclude={"sweep"}),
                          sort_keys=False)


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
