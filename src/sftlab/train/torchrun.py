"""torchrun for `sftlab ... --nproc N`: `torch.distributed.run` itself, whose failure report is one line.

When the ranks stop on a user mistake (a bad data line, say), rank 0 prints its `error: ...` line
and every rank records its message in its torchelastic error file (cli._error) and exits 1;
torchrun then raises ChildFailedError, a traceback plus a table of every rank's exit code. Here
that is caught: the message of the rank that failed first is printed where rank 0 did not print
it, then one line names that rank and its exit code, and the launcher exits with that code.
"""

from __future__ import annotations

import logging
import sys

# how torch's ErrorHandler records the CLI's SftlabError (cli._error) in a rank's error file
USER_MISTAKE = "SftlabError: "


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
        if (message := _mistake(failure)) and not _mistake(e.failures.get(0)):  # rank 0 printed its own
            print(f"error: {message}", file=sys.stderr)
        print(f"error: process {rank} of {args.nproc_per_node} failed first, exit code {failure.exitcode} (its "
              "message is above)", file=sys.stderr)
        return code
    return 0


def _mistake(failure) -> str | None:
    """The user mistake a failed rank recorded in its error file (cli._error); None for anything else."""
    message = getattr(failure, "message", None)
    message = message.get("message", "") if isinstance(message, dict) else message or ""
    return message.removeprefix(USER_MISTAKE) if message.startswith(USER_MISTAKE) else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
