"""train/allocator.py: when a training command re-executes itself on tcmalloc (that a real
`sftlab train` does: tests/e2e/test_cli_train.py)."""

from __future__ import annotations

import sys

import pytest

from sftlab.train import allocator


@pytest.fixture
def found(monkeypatch, tmp_path):
    """A Linux machine without an NVIDIA driver on which tcmalloc is installed."""
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "NVIDIA_DRIVER", tmp_path / "no-driver")
    monkeypatch.setattr(allocator, "loaded", lambda: "system")
    monkeypatch.setattr(sys, "platform", "linux")


def test_preloads_tcmalloc_and_keeps_the_rest_of_the_environment(found):
    env = allocator.preload_environment({"PATH": "/bin", "OMP_NUM_THREADS": "1"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


@pytest.mark.parametrize("environ", [{"SFTLAB_CPU_ALLOCATOR": "system"}, {"LD_PRELOAD": "libjemalloc.so.2"}])
def test_an_opt_out_or_another_preload_is_left_alone(found, environ):
    assert allocator.preload_environment(environ) is None


def test_no_library_or_a_gpu_driver_or_already_on_it_means_no_reexec(found, monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    assert allocator.preload_environment({}) is None
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    (tmp_path / "driver").write_text("NVRM version: 1\n")
    monkeypatch.setattr(allocator, "NVIDIA_DRIVER", tmp_path / "driver")
    assert allocator.preload_environment({}) is None
    monkeypatch.setattr(allocator, "NVIDIA_DRIVER", tmp_path / "no-driver")
    monkeypatch.setattr(allocator, "loaded", lambda: "tcmalloc")  # the re-executed process itself
    assert allocator.preload_environment({}) is None


def test_the_advice_says_how_to_get_tcmalloc(found, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in allocator.advice("system")
    assert allocator.advice("jemalloc") is None  # on another fast allocator already
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    assert "install libtcmalloc-minimal4" in allocator.advice("system")
    monkeypatch.setenv(allocator.ENV, "system")  # asked for glibc: nothing to say
    assert allocator.advice("system") is None
