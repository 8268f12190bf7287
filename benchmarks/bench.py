#!/usr/bin/env python
"""Run cbn's benchmark suite: ``python benchmarks/bench.py [options]``.

A thin wrapper over :mod:`cbn.benchmark` (the same as ``python -m cbn bench``);
see ``benchmarks/README.md`` and ``--help``. ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` are removed from the environment before NumPy is
imported, by re-executing this script without them.
"""

import os
import sys

_CLEANED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_MARK = "_CBN_BENCH_REEXEC"


def main():
    """Clean the environment (re-exec if needed), then run ``cbn.benchmark.main``."""
    present = [v for v in _CLEANED if v in os.environ]
    if present and not os.environ.get(_MARK):
        env = {k: v for k, v in os.environ.items() if k not in _CLEANED}
        env[_MARK] = ",".join(f"{v}={os.environ[v]}" for v in present)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    from cbn import benchmark  # imports NumPy: only now

    return benchmark.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
