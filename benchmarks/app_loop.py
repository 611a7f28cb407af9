"""The application's side of the loop: how late timers and cross-thread calls
run, and what pending timers cost message dispatch.

Usage::

    python benchmarks/app_loop.py [--rounds 3] [--duration 3] [--pin]

It measures, on an rsepoll echo server (epoll backend) in a child process:

- **timer lateness**: ``call_later(d)`` with ``d`` from 1 to 10 ms, one after
  another, 300 times: how long after its ``when()`` each callback started;
- **wake latency**: a thread of the server's process calls
  ``call_soon_threadsafe`` 300 times, 2-5 ms apart: from the call to the start
  of the callback on the listening thread;

both on an idle server and under load (``python -m rsepoll.bench``, rr 1 KiB,
100 connections, running the whole time), as p50/p99/max; and

- **dispatch with pending timers**: requests/s and server CPU per request
  under the same load with 0 and with 100,000 pending timers (due in an
  hour), in interleaved rounds; the table gives medians, the spread, and the
  ratio of the medians.

``--pin`` puts the server on CPU 0 and the load generator on CPU 1. Loopback
only; every run is bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLES = 300


def serve(mode: str, pending: int, duration: float) -> None:
    """The child: an echo server that measures what ``mode`` asks and prints one
    JSON line (``latency``), or just serves (``dispatch``) until SIGTERM."""
    import rsepoll

    class Echo(rsepoll.Server):
        def on_message_received(self, conn, data):
            self.send_message(conn, data)

    server = Echo(backend="epoll")
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    result: dict[str, list[float]] = {"timer": [], "wake": []}
    for _ in range(pending):
        server.call_later(3600 + random.random(), print)

    def next_timer() -> None:
        if len(result["timer"]) >= SAMPLES:
            return
        handle = server.call_later(random.uniform(0.001, 0.010), fired, box := [])
        box.append(handle)

    def fired(box: list) -> None:
        result["timer"].append(server.time() - box[0].when())
        next_timer()

    wakes = result["wake"]

    def waker() -> None:
        for _ in range(SAMPLES):
            time.sleep(random.uniform(0.002, 0.005))
            sent = time.perf_counter()
            server.call_soon_threadsafe(lambda s=sent: wakes.append(time.perf_counter() - s))
        time.sleep(0.05)
        server.call_soon_threadsafe(server.call_later, max(0.0, duration - 0.1), server.stop_server)

    def on_listen_success() -> None:
        print(f"ready {listener.port}", flush=True)
        if mode == "latency":
            server.call_later(0.5, next_timer)
            server.call_later(0.5, lambda: threading.Thread(target=waker, daemon=True).start())

    server.on_listen_success = on_listen_success  # type: ignore[method-assign]
    server.listen()
    if mode == "latency":
        print(json.dumps(result), flush=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_server(mode: str, pending: int, duration: float, pin: bool) -> tuple:
    argv = [sys.executable, __file__, "--serve", mode, "--pending", str(pending)]
    argv += ["--duration", str(duration)]
    server = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pin else None,
    )
    assert server.stdout is not None
    line = server.stdout.readline().split()
    assert line and line[0] == "ready", f"server did not start: {line}"
    return server, int(line[1])


def load(port: int, duration: float, pin: bool, warmup: float = 0.0) -> dict:
    argv = [sys.executable, "-m", "rsepoll.bench", f"127.0.0.1:{port}", "--json"]
    argv += ["--connections", "100", "--size", "1024", "--threads", "1"]
    argv += ["--duration", str(duration), "--warmup", str(warmup)]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {1})) if pin else None,
    )
    return json.loads(out.stdout)


def percentiles(values: list[float]) -> str:
    us = sorted(v * 1e6 for v in values)
    if not us:
        return "no samples"
    p50 = us[len(us) // 2]
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    return f"p50 {p50:8.1f} µs   p99 {p99:8.1f} µs   max {us[-1]:8.1f} µs   (n={len(us)})"


def latency(loaded: bool, duration: float, pin: bool) -> dict:
    server, port = start_server("latency", 0, duration, pin)
    if loaded:
        load(port, duration - 0.3, pin)
    out, _ = server.communicate(timeout=duration + 30)
    return json.loads(out.strip().splitlines()[-1])


def dispatch(pending: int, duration: float, pin: bool) -> tuple[float, float]:
    server, port = start_server("dispatch", pending, 0, pin)
    try:
        load(port, 1.0, pin)  # warm-up, unmeasured
        cpu0 = cpu_seconds(server.pid)
        report = load(port, duration, pin)
        cpu1 = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    # The CPU window also spans the load tool's start and connects: a small
    # overstatement, the same for both contenders.
    return report["requests_per_s"], (cpu1 - cpu0) / report["requests"] * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--serve", choices=("latency", "dispatch"), help=argparse.SUPPRESS)
    parser.add_argument("--pending", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.pending, args.duration)
        return 0
    for loaded in (False, True):
        got = latency(loaded, max(args.duration, 3.0), args.pin)
        label = "under load (rr 1 KiB x100)" if loaded else "idle"
        print(f"timer lateness, {label}:  {percentiles(got['timer'])}")
        print(f"wake latency,   {label}:  {percentiles(got['wake'])}")
    runs: dict[int, list[tuple[float, float]]] = {0: [], 100_000: []}
    for _ in range(args.rounds):
        for pending in runs:
            runs[pending].append(dispatch(pending, args.duration, args.pin))
    print(f"\ndispatch, rr 1 KiB x100, {args.rounds} interleaved rounds of {args.duration} s:")
    medians = {}
    for pending, results in runs.items():
        rps = [r for r, _ in results]
        cpu = [c for _, c in results]
        medians[pending] = statistics.median(rps)
        print(
            f"  {pending:>7} pending timers: {statistics.median(rps):>9,.0f} req/s "
            f"(spread {min(rps):,.0f}-{max(rps):,.0f}), "
            f"server CPU {statistics.median(cpu):.1f} µs/req"
        )
    print(f"  ratio 100,000 / 0: {medians[100_000] / medians[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
