"""A few seeds of the chaos run (tests/chaos.py), under this pass's backend.

The chaos run drives hundreds of randomized clients against a recording
server, stops it at a random moment, and checks a ledger of every byte and
every ending against docs/api.md (its module docstring explains how). Each
seed here runs it once, in a subprocess, for a few seconds, and the test
fails with the run's first violations when any count is not zero.

The seeds run under whatever ``.ci/run`` set for this pass: the child
inherits ``RSEPOLL_BACKEND`` and ``RSEPOLL_IO_THREADS``, which the server
reads as ``tests/conftest.py`` explains, so the four pytest passes cover
both backends with one and two I/O threads.

Seeds that fail because of a defect already filed are marked
``xfail(strict=True)`` naming the item of the issue: a fix makes them pass,
which fails the suite until the mark is removed, so each becomes a
regression test as its defect is fixed. A seed that ever failed for any
other reason belongs here too, once the reason is fixed.

Every check in the run rests on telling a reset from a clean end, which a
Windows program under Wine cannot (its ``recv`` reads a reset as EOF), so
the seeds do not run under Wine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import needs_visible_resets, subprocess_env

pytestmark = [pytest.mark.timeout(120), needs_visible_resets]

CHAOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chaos.py")
SECONDS = "2.5"


def chaos(seed: int, *args: str) -> dict:
    """Runs one seed and returns its report."""
    argv = [sys.executable, CHAOS, "--seconds", SECONDS, "--seed", str(seed), "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=100, env=subprocess_env())
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no report (status {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    counts = {k: report[k] for k in ("lost", "reordered", "corrupted", "unaccounted", "other")}
    counts["leaked_fds"] = report["leaked_fds"]
    summary = (
        f"seed {seed} ({report['framing']}, {report['variant']}, {report.get('stop')}), "
        f"{report.get('backend')} backend, {report.get('io_threads')} I/O thread(s): "
        f"{counts}; {report['violations']}"
    )
    assert proc.returncode == (0 if sum(counts.values()) == 0 else 1), summary
    assert sum(counts.values()) == 0, summary
    return report


#: Every seed that ever failed stays here as a regression case, with the
#: defect it found: 122 (item 1 of issue 13: a busy framed connection was read
#: during the stop), 107 and 106 (item 3: Ctrl-C dropped input already read),
#: 124 (item 2: a stop dropped what paused connections had read), 1008 (a
#: stop's deadline dropped what decoders held; found by the soak). Seed 66
#: (item 4: a paused connection's reset went unreported) needs a ten-second
#: run and is in LONG_SEEDS, which the soak runs (benchmarks/chaos_soak.py).
SEEDS = [
    pytest.param(101, (), id="raw-101"),
    pytest.param(116, (), id="length-116"),
    pytest.param(122, (), id="line-122"),
    pytest.param(107, (), id="raw-sigint-107"),
    pytest.param(106, (), id="length-sigint-106"),
    pytest.param(124, (), id="line-124"),
    pytest.param(1008, ("--framing", "length"), id="length-1008"),
]
#: Seeds that need a longer run than CI gives each: (seed, seconds).
LONG_SEEDS = [(66, 10.0)]


@pytest.mark.parametrize("seed,options", SEEDS)
def test_every_byte_and_every_ending_is_accounted_for_under_chaos(
    seed: int, options: tuple[str, ...]
) -> None:
    report = chaos(seed, *options)
    # The run did what it is for: hundreds of connections, traffic both ways.
    assert report["connections"] >= 200
    assert report["messages_in"] > 0 and report["messages_out"] > 0


def test_one_seed_draws_the_same_client_plan_every_time() -> None:
    # The client side of a seed is reproducible: the plan (every message,
    # chunk and ending) depends only on the seed and the options, never on
    # timing, so that a failing seed can be replayed.
    tests = os.path.dirname(CHAOS)
    probe = (
        f"import sys; sys.path.insert(0, {tests!r}); import argparse, chaos, hashlib; "
        "a = argparse.Namespace(seed=7, seconds=3.0, framing=None, variant='auto', "
        "connections=50, backend='auto', io_threads=None); p = chaos.RunPlan(a); "
        "cs = [chaos.Client(i, p, 0.0) for i in range(50)]; "
        "plan = (p.framing, p.stop_at, p.stop_timeout, [(c.kind, c.ending, c.sizes, "
        "c.start_at, c.reset_at, c.stop_windows, c.body(0) if c.sizes else b'') for c in cs]); "
        "print(hashlib.sha256(repr(plan).encode()).hexdigest())"
    )
    env = subprocess_env()
    runs = [
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
        for _ in range(2)
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
