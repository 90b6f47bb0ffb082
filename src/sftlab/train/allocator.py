"""Which memory allocator a CPU training process runs on, and switching to tcmalloc.

A training step on a CPU allocates and frees gigabytes of activations. With glibc's malloc
there are two bad choices: its default (freed blocks stay in a fragmenting heap: peak RSS ~25 %
higher) or a fixed 1 MiB mmap threshold (blocks handed back to the OS and faulted in again,
zeroed, at every step: ~1.6x slower steps). tcmalloc reuses freed blocks by size class: the
speed of the first at the memory of the second (bench/README.md, "Memory allocator"). This is
the allocator PyTorch's CPU performance guide recommends, loaded the same way (LD_PRELOAD, as
`torch.backends.xeon.run_cpu --enable-tcmalloc` does), which must happen before the process
starts: `sftlab` re-executes a training command once with it preloaded.

Not done: when no tcmalloc library is installed (Debian/Ubuntu: libtcmalloc-minimal4), on a
machine with an NVIDIA driver (GPU runs keep the allocator they were tested with), when the
process was started with another LD_PRELOAD, or with SFTLAB_CPU_ALLOCATOR=system.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ENV = "SFTLAB_CPU_ALLOCATOR"  # "system" keeps the C library's malloc
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' libtcmalloc_minimal.so.4, libtcmalloc.so.4
# tcmalloc reports every allocation above 1 GiB on stderr (a 7B model's embedding is one)
QUIET_LARGE_ALLOCS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def loaded() -> str:
    """'tcmalloc' or 'jemalloc' when this process runs on one of them, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "system")


def tcmalloc_library() -> str | None:
    """The soname of an installed tcmalloc (found as the dynamic linker finds it), or None."""
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _may_switch(environ: Mapping[str, str], current: str) -> bool:
    """Whether a process running on `current` may be moved to tcmalloc: on Linux, on the
    system allocator, not opted out, and with no LD_PRELOAD of someone else's to respect."""
    return (sys.platform.startswith("linux") and current == "system"
            and environ.get(ENV, "tcmalloc") != "system" and not environ.get("LD_PRELOAD"))


def preload_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute a training command with, or None to run as it is."""
    if NVIDIA_DRIVER.exists() or not _may_switch(environ, loaded()):
        return None
    library = tcmalloc_library()
    if library is None:
        return None
    return {**environ, **QUIET_LARGE_ALLOCS, "LD_PRELOAD": library}


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by `python -m sftlab.cli ARGV` with tcmalloc preloaded, where
    `preload_environment` says so; otherwise return. Call it before any thread starts."""
    env = preload_environment(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "sftlab.cli", *argv], env)


def advice(current: str) -> str | None:
    """One line for a CPU run on `current` (what `loaded()` said) when tcmalloc could be used."""
    if not _may_switch(os.environ, current):
        return None
    library = tcmalloc_library()
    how = (f"the sftlab command preloads it; in a process of your own: LD_PRELOAD={library}" if library
           else "install libtcmalloc-minimal4 and the sftlab command preloads it")
    return f"memory allocator: glibc malloc; CPU training steps are ~1.6x faster on tcmalloc ({how})"
