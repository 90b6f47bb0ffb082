"""`sftlab ARGS` in this process, with what its memory is made of sampled every 2 ms (a thread):
at the highest RSS seen and at tcmalloc's highest allocation, the kernel's split of the RSS
(anonymous, mapped files) and tcmalloc's own counters (bytes allocated, free bytes its page heap
keeps mapped). Written as JSON to OUT when the command ends ({"rss": ..., "allocated": ...}).
Run by estimate_vs_train.py --parts, with tcmalloc preloaded (so sftlab does not re-execute
itself, which would lose the thread):

    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/peak_parts_child.py OUT.json train CONFIG
"""

from __future__ import annotations

import atexit
import ctypes
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import status_bytes  # noqa: E402

FIELDS = ("RssAnon", "RssFile", "VmRSS")
TCMALLOC = ("generic.current_allocated_bytes", "generic.heap_size", "tcmalloc.pageheap_unmapped_bytes")


def tcmalloc_counters(lib) -> dict[str, int]:
    out = {}
    for name in TCMALLOC:
        value = ctypes.c_size_t()
        if lib.MallocExtension_GetNumericProperty(name.encode(), ctypes.byref(value)):
            out[name] = value.value
    return out


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    lib = ctypes.CDLL(None)  # the preloaded tcmalloc's C API is in the process's global namespace
    if not hasattr(lib, "MallocExtension_GetNumericProperty"):
        sys.exit("tcmalloc is not preloaded (LD_PRELOAD=libtcmalloc_minimal.so.4)")
    # each sample replaced whole, so the exit handler never reads a half-made one
    peak = {"rss": {"VmRSS": 0}, "allocated": {"generic.current_allocated_bytes": 0}}

    def sample():
        while True:
            now = {**status_bytes(fields=FIELDS), **tcmalloc_counters(lib)}
            if now["VmRSS"] > peak["rss"]["VmRSS"]:
                peak["rss"] = now
            if now["generic.current_allocated_bytes"] > peak["allocated"]["generic.current_allocated_bytes"]:
                peak["allocated"] = now
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(lambda: out.write_text(json.dumps(peak)))
    from sftlab.cli import main as sftlab

    sys.exit(sftlab(argv))


if __name__ == "__main__":
    main()
