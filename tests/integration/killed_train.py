"""Run `sftlab train ...` (or `sftlab align ...`) in this process and kill it with SIGKILL at a
chosen point, as `kill -9` would: no exception, no `finally`, no flush. Used by test_train_crash.py.

    python killed_train.py step N -- TRAIN_ARGS   # at the N-th training micro-batch
    python killed_train.py save N -- TRAIN_ARGS   # at the N-th filesystem event of checkpointing
    python killed_train.py commit N -- TRAIN_ARGS # at the rename that would commit checkpoint-N
    python killed_train.py rotate N -- TRAIN_ARGS # as rotation starts deleting checkpoint-N
    python killed_train.py count 0 -- TRAIN_ARGS  # no kill: print the event counts at exit

Checkpointing events: a folder made, a file opened for writing or a tensor file saved under
checkpoints/.saving/, the rename that commits it, an old checkpoint deleted by rotation.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

STAGE = f"{os.sep}.saving{os.sep}"
counts = {"step": 0, "save": 0}


events: list[str] = []


def tick(kind: str, target: str, n: int, what: str = "") -> None:
    counts[kind] += 1
    if kind == "save":
        events.append(what)
    if kind == target and counts[kind] == n:
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    target, n = sys.argv[1], int(sys.argv[2])
    assert sys.argv[3] == "--", sys.argv
    import torch

    from transformers import Trainer

    from sftlab.cli import main as sftlab

    real_step, real_save = Trainer.training_step, torch.save

    def training_step(self, *a, **k):  # the train and align trainers all end up here
        tick("step", target, n)
        return real_step(self, *a, **k)

    def save(obj, f, *a, **k):
        if STAGE in str(f):
            tick("save", target, n, f"torch.save {f}")
        return real_save(obj, f, *a, **k)

    def audit(event: str, args: tuple) -> None:
        if (target == "commit" and event == "os.rename" and str(args[0]).endswith(f"{STAGE}checkpoint-{n}")) or \
                (target == "rotate" and event == "shutil.rmtree" and str(args[0]).endswith(f"{os.sep}checkpoint-{n}")):
            os.kill(os.getpid(), signal.SIGKILL)
        if event == "open" and STAGE in str(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                tick("save", target, n, f"open {args[0]}")
        elif event in ("os.mkdir", "os.rename") and STAGE in str(args[0]):
            tick("save", target, n, f"{event} {args[0]}")
        elif event == "shutil.rmtree" and f"{os.sep}checkpoint-" in str(args[0]):
            tick("save", target, n, f"{event} {args[0]}")

    Trainer.training_step = training_step
    torch.save = save
    sys.addaudithook(audit)
    if target == "count":
        atexit.register(lambda: print(f"KILL-POINTS {counts}", *events, sep="\n", file=sys.stderr, flush=True))
    return sftlab(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
