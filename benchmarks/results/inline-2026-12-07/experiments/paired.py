"""Paired, interleaved rounds of echo servers under ``benchmarks/loadgen``.

An experiment's harness, kept with its results. Every round runs each
variant once (in reverse order every other round), the server pinned to
CPU 0 and ``benchmarks/loadgen`` to CPU 1, and the summary gives each
variant's median rate, its server CPU per message (user + system, all
threads, over loadgen's measured window) and the median of its rate divided
by the first variant's in the same round.

Usage, from the repository's root, with ``rsepoll`` and ``uvloop``
importable by ``python``::

    python benchmarks/results/inline-2026-12-07/experiments/paired.py [--rate MB/s] \\
        MODE SIZE CONNECTIONS ROUNDS LABEL=KIND[@PYTHONPATH[@VAR=VALUE[@LOADGEN]]] ...

``MODE`` is ``rr`` or ``stream``; ``KIND`` is one of ``benchmarks/echo.py
--serve``'s servers; ``PYTHONPATH`` (e.g. an unzipped wheel) selects the
rsepoll build, ``VAR=VALUE`` (several joined by commas) goes into the
server's environment and ``LOADGEN`` replaces the load generator's binary.
``--rate`` paces stream mode (loadgen's ``--rate``): every variant then
gets the same offered load, and what differs is its CPU per message.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
LOADGEN = ROOT / "benchmarks/loadgen/target/release/echo-loadgen"


def server_cpu(pid: int) -> float:
    """User + system seconds of every thread of `pid`."""
    ticks = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_once(
    variant: tuple[str, ...], mode: str, size: int, conns: int, rate: str | None
) -> tuple[float, float]:
    """One round of `variant`: its rate and its server CPU µs per message."""
    _, kind, pythonpath, setting, loadgen = variant
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    for item in filter(None, setting.split(",")):
        name, value = item.split("=", 1)
        env[name] = value
    serve = [sys.executable, str(ROOT / "benchmarks/echo.py"), "--serve", kind]
    server = subprocess.Popen(["taskset", "-c", "0", *serve], stdout=subprocess.PIPE, env=env)
    assert server.stdout is not None
    port = int(server.stdout.readline().split()[1])
    argv = [loadgen, "--port", str(port), "--mode", mode, "--size", str(size)]
    argv += ["--connections", str(conns), "--warmup", "1.5", "--duration", "3"]
    if rate is not None:
        argv += ["--rate", rate]
    load = subprocess.Popen(["taskset", "-c", "1", *argv], stdout=subprocess.PIPE, text=True)
    assert load.stdout is not None
    before = after = 0.0
    result = None
    for line in load.stdout:
        if line.startswith("measure-start"):
            before = server_cpu(server.pid)
        elif line.startswith("measure-end"):
            after = server_cpu(server.pid)
        elif line.startswith("result "):
            result = json.loads(line.split(" ", 1)[1])
    status = load.wait()
    server.terminate()
    server.wait()
    if status != 0 or result is None:
        raise SystemExit(f"{variant[0]}: loadgen failed (status {status})")
    messages = result["requests"] if mode == "rr" else result["bytes_in"] / size
    rate = messages / result["seconds"]
    if mode == "stream":
        rate *= size / 1e6
    return rate, (after - before) / messages * 1e6


def main() -> None:
    args = sys.argv[1:]
    rate = None
    if args[0] == "--rate":
        rate, args = args[1], args[2:]
    mode, size, conns, rounds = args[0], int(args[1]), int(args[2]), int(args[3])
    variants = []
    for spec in args[4:]:
        label, rest = spec.split("=", 1)
        parts = [*rest.split("@"), "", "", ""][:4]
        variants.append((label, parts[0], parts[1], parts[2], parts[3] or str(LOADGEN)))
    runs: dict[str, list[tuple[float, float]]] = {v[0]: [] for v in variants}
    for round_ in range(rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            runs[variant[0]].append(run_once(variant, mode, size, conns, rate))
        line = "  ".join(f"{label} {runs[label][-1][0]:,.0f}" for label in runs)
        print(f"round {round_ + 1}: {line}", flush=True)
    unit = "MB/s" if mode == "stream" else "req/s"
    first = variants[0][0]
    for label, results in runs.items():
        rates = [rate for rate, _ in results]
        cpu = statistics.median(c for _, c in results)
        paired = [rate / base for rate, (base, _) in zip(rates, runs[first])]
        print(
            f"{label:12} median {statistics.median(rates):9,.0f} {unit} "
            f"(min {min(rates):,.0f} max {max(rates):,.0f})  CPU/msg median {cpu:5.1f} us  "
            f"paired vs {first}: median {statistics.median(paired):.2f} "
            f"(min {min(paired):.2f} max {max(paired):.2f})"
        )


if __name__ == "__main__":
    main()
