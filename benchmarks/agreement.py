"""Do the suite's load tool and an independent one measure the same rate?

Usage::

    python benchmarks/agreement.py [--mode rr] [--rounds 3] [--connections 10,100]
                                   [--size 1024] [--warmup 1] [--duration 3] [--json PATH]

For every contender of the suite (rsepoll, asyncio, uvloop, native), every
connection count and every round, two runs, in alternating order: ``python -m
rsepoll.bench`` (the suite's load tool) and ``benchmarks/loadgen`` (a separate
Rust load generator, the one ``echo.py`` uses), one client thread each, the
same fixed warm-up and duration. Each run gets a fresh server on the first
usable CPU, which first echoes one request on a connection of its own (as in
the suite), and the load tool on the second. Prints each tool's median rate
(min-max) and their ratio, of the medians and round by round: req/s in rr
mode, MB/s echoed back in stream mode (where the two clients differ by
design: see benchmarks/README.md), with the CPU both sides used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import echo  # noqa: E402
import suite  # noqa: E402

TOOLS = ("bench", "loadgen")


def tool_argv(tool: str, port: int, connections: int, args: argparse.Namespace) -> list[str]:
    common = ["--mode", args.mode, "--connections", str(connections), "--size", str(args.size)]
    common += ["--warmup", str(args.warmup), "--duration", str(args.duration)]
    if tool == "loadgen":
        return [str(echo.LOADGEN), "--port", str(port), "--threads", "1", *common]
    bench = [sys.executable, "-m", "rsepoll.bench", f"127.0.0.1:{port}", "--threads", "1"]
    return [*bench, *common, "--json"]


def rates(tool: str, output: str) -> tuple[float, float]:
    """rr: (req/s, req/s); stream: (MB/s echoed back, MB/s sent)."""
    if tool == "loadgen":
        line = next(x for x in output.splitlines() if x.startswith("result "))
        result = json.loads(line[len("result ") :])
        if result["errors"] or result["stalled"]:
            raise RuntimeError(f"loadgen: {result['errors']} errors, {result['stalled']} stalled")
        if result.get("mode") == "stream":
            return float(result["mb_per_s_in"]), float(result["mb_per_s_out"])
        rps = float(result["requests"] / result["seconds"])
        return rps, rps
    report = json.loads(output)
    if report["errors"] or report["stalled"]:
        raise RuntimeError(f"rsepoll.bench: {report['errors'] + report['stalled']} errors")
    if report["mode"] == "stream":
        return float(report["mb_per_s_in"]), float(report["mb_per_s_out"])
    return float(report["requests_per_s"]), float(report["requests_per_s"])


def one(contender: str, tool: str, connections: int, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh server on the first CPU, its first connection, then the tool on
    the second CPU; the rate, the CPU each side and other processes used
    meanwhile (warm-up included), and the server's RSS growth."""
    server_cpu, client_cpu = suite.cpus_for("pinned") or (None, None)
    cell = suite.Cell(args.mode, args.size, connections)
    with suite.child(
        suite.server_argv(contender, cell), server_cpu, stdout=subprocess.PIPE, bufsize=0
    ) as server:
        assert server.stdout is not None
        line = echo.LineReader(server.stdout).readline(time.monotonic() + 15)
        if not line or not line.startswith("ready "):
            raise RuntimeError(f"{contender} did not start (said {line!r})")
        port = int(line.split()[1])
        echo.first_connection(port, args.size)
        rss = suite.rss_bytes(server.pid)
        argv = tool_argv(tool, port, connections, args)
        with suite.child(argv, client_cpu, stdout=subprocess.PIPE, bufsize=0) as client:
            before = echo.sample(server.pid, client.pid)
            assert client.stdout is not None
            output = client.stdout.read().decode()
            after = echo.sample(server.pid, client.pid)
            client.wait(30)
        rss = suite.rss_bytes(server.pid) - rss
    busy = (after.machine_busy - before.machine_busy) / echo.CLK_TCK
    server_s = after.server_user + after.server_sys - before.server_user - before.server_sys
    client_s = after.client_cpu - before.client_cpu
    wall = max(after.wall - before.wall, 1e-9)
    rate, sent = rates(tool, output)
    return {
        "contender": contender,
        "tool": tool,
        "connections": connections,
        "rate": rate,
        "sent": sent,
        "server_cpu": server_s / wall,
        "client_cpu": client_s / wall,
        "other": max(0.0, busy - server_s - client_s) / wall,
        "rss_growth": rss,
        "mode": args.mode,
    }


def describe(run: dict[str, Any]) -> str:
    unit = "req/s" if run["mode"] == "rr" else "MB/s back"
    sent = f", {run['sent']:,.0f} MB/s sent" if run["mode"] == "stream" else ""
    return (
        f"{run['rate']:,.0f} {unit}{sent} (server CPU {run['server_cpu']:.0%}, client "
        f"{run['client_cpu']:.0%}, other {run['other']:.0%}, server RSS "
        f"+{run['rss_growth'] / 2**20:.1f} MiB)"
    )


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def spread(xs: list[float]) -> str:
    low, high = (f"{x / 1e3:,.0f}k" if x >= 10_000 else f"{x:,.0f}" for x in (min(xs), max(xs)))
    return f"{statistics.median(xs):,.0f} ({low}-{high})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["rr", "stream"], default="rr")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="10,100", help="comma-separated (default 10,100)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--contenders", default=",".join(suite.CONTENDERS), help="default: all four"
    )
    parser.add_argument("--json", metavar="PATH", help="write every run")
    args = parser.parse_args(argv)
    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        parser.error("needs Linux and 2 usable CPUs (it pins the server and the client)")
    counts = [int(c) for c in args.connections.split(",") if c.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if "native" in contenders and (why := suite.ensure_native()):
        parser.error(why)
    echo.ensure_loadgen()
    unit = "MB/s" if args.mode == "stream" else "req/s"
    runs: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        order = TOOLS if round_ % 2 else TOOLS[::-1]
        for connections in counts:
            for contender in contenders:
                for tool in order:
                    run = one(contender, tool, connections, args)
                    run["round"] = round_
                    runs.append(run)
                    print(f"round {round_}, x{connections}, {contender}, {tool}: {describe(run)}")
    print()
    print(
        f"{'cell':<16} {'server':<8} {'rsepoll.bench':>22} {'loadgen':>22} {'ratio':>6} "
        f"{'by round':>17} {'server CPU':>10} {'client CPU':>10} {'other':>6}"
    )
    for connections in counts:
        for contender in contenders:
            mine = [
                r for r in runs if (r["contender"], r["connections"]) == (contender, connections)
            ]
            by = {t: [r for r in mine if r["tool"] == t] for t in TOOLS}
            rate = {t: [r["rate"] for r in by[t]] for t in TOOLS}
            paired = [b / g if g else float("inf") for b, g in zip(rate["bench"], rate["loadgen"])]

            cpu = {
                key: "/".join(f"{statistics.median(r[key] for r in by[t]):.0%}" for t in TOOLS)
                for key in ("server_cpu", "client_cpu")
            }
            print(
                f"{f'{args.mode} {args.size // 1024} KiB x{connections}':<16} {contender:<8} "
                f"{spread(rate['bench']):>22} {spread(rate['loadgen']):>22} "
                f"{ratio(*(statistics.median(rate[t]) for t in TOOLS)):>6.3f} "
                f"{statistics.median(paired):>5.3f} ({min(paired):.2f}-{max(paired):.2f}) "
                f"{cpu['server_cpu']:>10} {cpu['client_cpu']:>10} "
                f"{max(r['other'] for r in mine):>6.0%}"
            )
    print(
        f"\nrates in {unit}{' echoed back' if args.mode == 'stream' else ''}: median (min-max); "
        "ratio: rsepoll.bench / loadgen, of the medians; by round: the same per round, "
        "median (min-max); server CPU, client CPU: medians over the whole run, warm-up "
        "included, rsepoll.bench/loadgen, 100% = one core; other: the most CPU other "
        "processes used during a run"
    )
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": vars(args), "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
