"""`python -m bench NAME ARGS...`: run bench/NAME.py as `python -m bench.NAME ARGS...` would, with
n2n's one-line errors (the traceback with N2N_DEBUG=1). `n2n bench NAME` runs this in a child process.
"""
from __future__ import annotations

import runpy
import sys

from pipeline.commands.friendly_errors import debug_requested, error_line, exit_status


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench NAME [ARGS...]  (NAME: a benchmark in bench/, e.g. core)", file=sys.stderr)
        return 2
    name, *args = argv
    sys.argv = [sys.argv[0], *args]  # what the benchmark's own parser reads; runpy sets argv[0] to its file
    try:
        runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
    except KeyboardInterrupt:
        print("Aborted!", file=sys.stderr)
        return 130
    except Exception as error:  # SystemExit (the benchmark's own status, its usage errors) passes through
        if debug_requested():
            raise
        print(error_line(error), file=sys.stderr)
        return exit_status(error)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
