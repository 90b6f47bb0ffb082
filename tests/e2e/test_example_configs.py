"""Every example config in configs/ runs as shipped, from the repository root of a clean clone:
its data files are tracked in git, and one training step runs on the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from sftlab.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def tracked_files() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return set(out.splitlines())


def _load(path, overrides=None):
    """The config as its command reads it: an AlignConfig for `sftlab align` configs."""
    from sftlab.config import AlignConfig, TrainConfig

    cls = AlignConfig if "align" in (yaml.safe_load(path.read_text()) or {}) else TrainConfig
    return load_config(path, overrides, cls=cls)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_data_ships_with_the_repository(path):
    data = _load(path).data
    files = tracked_files()
    for name in filter(None, (data.train, data.validation)):
        assert name in files, f"{path.name}: {name} is not in the repository (a clean clone lacks it)"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_trains_one_step(path, tiny_model_dir, tmp_path, monkeypatch):
    from sftlab.config import AlignConfig
    from sftlab.train.align import align
    from sftlab.train.trainer import train

    monkeypatch.chdir(ROOT)  # the configs' data paths are relative to the repository root
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    overrides = [f"model.name_or_path={tiny_model_dir}", "training.max_steps=1", f"output_dir={tmp_path / 'run'}"]
    if "align" in yaml.safe_load(path.read_text()):
        # TRL evaluates the held-out pairs before and after (most of a minute here); the
        # validation file's presence is checked above, alignment's evaluation in test_align_train.py
        overrides.append("data.validation=null")
    config = _load(path, overrides)
    info = (align if isinstance(config, AlignConfig) else train)(config, log=lambda *a: None)
    assert info["global_step"] == 1 and info["finished"]
    train_data = json.loads((tmp_path / "run" / "run.json").read_text())["train_data"]
    assert train_data["rows" if isinstance(config, AlignConfig) else "examples"] > 0
