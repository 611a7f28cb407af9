"""The suite with three spin variants of threaded rsepoll as extra contenders.

An experiment's harness, kept with its results: it needs a build with
``spin.patch`` applied (the spin budgets come from the environment), and is
run from the repository's root as ``python
benchmarks/results/inline-2026-12-07/experiments/suite_spin.py`` with the
suite's own arguments (see ``benchmarks/README.md``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import suite  # benchmarks/suite.py, on the path just above

#: The extra contenders, and the spin budgets (µs) their servers get.
SPINS = {
    "rsepoll-threaded-spinio": ["RSEPOLL_SPIN_IO_US=30"],
    "rsepoll-threaded-spinpy": ["RSEPOLL_SPIN_PY_US=30"],
    "rsepoll-threaded-spinboth": ["RSEPOLL_SPIN_IO_US=30", "RSEPOLL_SPIN_PY_US=30"],
}
plain_argv = suite.server_argv


def server_argv(contender: str, cell: suite.Cell) -> list[str]:
    """The threaded server's command line, under ``env`` with the budgets."""
    if contender in SPINS:
        return ["env", *SPINS[contender], *plain_argv("rsepoll-threaded", cell)]
    return plain_argv(contender, cell)


suite.server_argv = server_argv
suite.CONTENDERS = suite.CONTENDERS + tuple(SPINS)
sys.argv[0] = "suite.py"
sys.exit(suite.main())
