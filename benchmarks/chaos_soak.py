#!/usr/bin/env python3
"""A long soak of the chaos run: many seeds, every configuration, in turn.

    python benchmarks/chaos_soak.py --minutes 30 [--seconds 4] [--first-seed 1000]

Runs ``tests/chaos.py`` seed after seed until the time is up, cycling
through both backends, the inline mode and one and two I/O threads, and
the three framings (each seed's own draw decides the rest: thread or
signal variant, client mix, the moment of the stop). The seeds that ever failed and need a longer
run than CI gives (``LONG_SEEDS`` in ``tests/test_chaos.py``) run first.
Every failing seed is printed with its command line, so that it can be
replayed and kept as a regression case; the summary gives the counts.
Loopback only, one run at a time, each bounded by the harness's watchdog.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHAOS = os.path.join(HERE, "..", "tests", "chaos.py")
LONG_SEEDS = [(66, 10.0)]
CONFIGS = [
    (backend, threads, framing)
    for threads in (0, 1, 2)
    for backend in ("epoll", "portable")
    for framing in ("raw", "line", "length")
]


def run(seed: int, seconds: float, backend: str, threads: int, framing: str | None) -> dict:
    argv = [sys.executable, CHAOS, "--seconds", str(seconds), "--seed", str(seed)]
    argv += ["--backend", backend, "--io-threads", str(threads), "--json"]
    if framing:
        argv += ["--framing", framing]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 10 + 120)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"violations": [f"no report (exit {proc.returncode}): {proc.stderr[-500:]}"]}
    report["exit"] = proc.returncode
    report["argv"] = " ".join(argv[1:])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    runs, failed, connections, messages = 0, [], 0, 0
    jobs = [(seed, secs, config) for (seed, secs), config in zip(LONG_SEEDS, CONFIGS)]
    seeds = itertools.count(args.first_seed)
    configs = itertools.cycle(CONFIGS)
    while time.monotonic() < deadline:
        seed, seconds, (backend, threads, framing) = (
            jobs.pop(0) if jobs else (next(seeds), args.seconds, next(configs))
        )
        report = run(seed, seconds, backend, threads, framing)
        runs += 1
        connections += report.get("connections", 0)
        messages += report.get("messages_in", 0)
        if report["exit"] != 0:
            failed.append(report)
            print(f"FAILED: {report['argv']}\n  {report['violations'][:3]}", flush=True)
        elif runs % 20 == 0:
            print(f"{runs} runs, {len(failed)} failed", flush=True)
    print(
        f"soak: {runs} runs ({runs - len(failed)} clean, {len(failed)} failed), "
        f"{connections} connections, {messages} messages, {args.minutes:g} minutes"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
