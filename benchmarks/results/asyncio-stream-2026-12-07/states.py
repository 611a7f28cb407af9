"""Why asyncio streams at two speeds: the allocator's state, counted.

An experiment's harness, kept with its results. For each round and each load
tool (``benchmarks/loadgen`` and ``python -m rsepoll.bench``, alternating
which goes first), a fresh asyncio echo server of ``echo.py`` on the first
CPU gets its first connection (as in the suite and ``agreement.py``), then
the tool streams 64 KiB x 10 from the second CPU. Over the tool's whole run
(warm-up included) ``perf stat`` counts the server's ``recvfrom``, ``mmap``,
``munmap``, ``mremap``, ``brk`` and ``madvise`` calls and its minor page
faults. Prints the tool's rate and the counts per ``recvfrom``.

Usage, from the repository's root (``perf`` on the PATH, ``rsepoll``
importable, loadgen built)::

    python benchmarks/results/asyncio-stream-2026-12-07/states.py [ROUNDS]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

import agreement  # noqa: E402
import echo  # noqa: E402
import suite  # noqa: E402

EVENTS = ["recvfrom", "mmap", "munmap", "mremap", "brk", "madvise"]


def one(tool: str, args: argparse.Namespace) -> str:
    server_cpu, client_cpu = suite.cpus_for("pinned") or (None, None)
    cell = suite.Cell("stream", 65536, 10)
    with suite.child(
        suite.server_argv("asyncio", cell), server_cpu, stdout=subprocess.PIPE, bufsize=0
    ) as server:
        assert server.stdout is not None
        line = echo.LineReader(server.stdout).readline(time.monotonic() + 15)
        port = int(line.split()[1])
        echo.first_connection(port, 65536)
        events = [f"syscalls:sys_enter_{name}" for name in EVENTS] + ["minor-faults"]
        perf = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", ",".join(events), "-p", str(server.pid)],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.2)
        argv = agreement.tool_argv(tool, port, 10, args)
        with suite.child(argv, client_cpu, stdout=subprocess.PIPE, bufsize=0) as client:
            assert client.stdout is not None
            output = client.stdout.read().decode()
            client.wait(30)
        perf.send_signal(2)
        _, err = perf.communicate(timeout=10)
    counts = {}
    for row in err.splitlines():
        fields = row.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
    rate, _ = agreement.rates(tool, output)
    recvs = max(counts.get("recvfrom", 0), 1)
    per = "  ".join(f"{name} {counts.get(name, 0) / recvs:.2f}" for name in EVENTS[1:])
    faults = counts.get("minor-faults", 0) / recvs
    return (
        f"{tool:8} {rate:7,.0f} MB/s  recvfrom {recvs:7,}  per recvfrom: {per}  faults {faults:.2f}"
    )


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    args = argparse.Namespace(mode="stream", size=65536, warmup=1.0, duration=3.0)
    for round_ in range(rounds):
        tools = agreement.TOOLS if round_ % 2 == 0 else agreement.TOOLS[::-1]
        for tool in tools:
            print(f"round {round_ + 1}: {one(tool, args)}", flush=True)


if __name__ == "__main__":
    main()
