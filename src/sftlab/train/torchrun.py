"""torchrun for `sftlab ... --nproc N`: `torch.distributed.run` itself, whose failure report is one line.

When a rank stops on a user mistake (a bad data line, say) it prints its own `error: ...` line
and exits 1; torchrun then raises ChildFailedError, a traceback plus a table of every rank's
exit code. Here that is caught: one line names the rank that failed first and its exit code, and
the launcher exits with that code.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the agent logs each failed worker as an error; the line below says it once
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(f"error: process {rank} of {args.nproc_per_node} failed first, exit code {failure.exitcode} (its "
              "message is above)", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
