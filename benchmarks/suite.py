"""The comparison suite: rsepoll, asyncio, uvloop and a native C epoll echo server.

Usage::

    python benchmarks/suite.py [--placement both] [--rounds 1] [--duration 3] [--warmup 1]
                               [--warmup-max 10] [--json results.json] [--chart chart.png]
    python benchmarks/suite.py --from-json results.json --chart chart.png

Every contender is an echo server in its own process on 127.0.0.1: rsepoll (a
``Server`` subclass that echoes in ``on_message_received``), an asyncio
Protocol, the same Protocol on uvloop (``echo.py --serve KIND``), and
``native/echo.c``, a single-threaded epoll server with no Python (the ceiling),
built here with ``cc -O2``. Each server is started afresh for every run and
first has one request echoed on a connection of its own, which it then sees
closed (a fresh asyncio server is 3-4x slower until then). The load is
``python -m rsepoll.bench`` with ``--warmup-until-steady`` (the measured time
starts once the rate has settled) and ``--marks``: it prints a line when its
measured window starts and ends, and the server's CPU time is read from /proc
at those lines, so CPU and requests cover the same window. Each cell (a
workload) runs every contender once per round, back to back, under each CPU
placement. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import echo  # noqa: E402  (benchmarks/echo.py: its servers and /proc helpers)

NATIVE_SOURCE = HERE / "native" / "echo.c"
NATIVE_BINARY = HERE / "native" / "echo"
#: rsepoll as configured by default (inline on one usable CPU, else one I/O
#: thread), threaded (io_threads=1), inline (io_threads=0) and with
#: io_threads="auto" (inline when pinned to one CPU).
CONTENDERS = (
    "rsepoll",
    "rsepoll-threaded",
    "rsepoll-inline",
    "rsepoll-auto",
    "asyncio",
    "uvloop",
    "native",
)
PLACEMENTS = ("pinned", "unpinned")
#: Descriptors a process needs besides its connections (the load tool keeps
#: 64 spare; servers need a few of their own).
SPARE_FDS = 128
#: A run in which the load tool was busy for at least this share of its core
#: and the server for less counts as bound by the load tool: ^ in the table.
CLIENT_BOUND = 0.9
#: JSON layout version, for --from-json (2: the warm-up's length and whether
#: it settled, per run; 1 is still read).
FORMAT = 2
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class Cell:
    """One workload of the matrix."""

    mode: str  # rr, stream or idle
    size: int
    connections: int

    @property
    def name(self) -> str:
        """A short id, used by --cells: rr-1k-c10, stream-64k-c10, idle-c10000."""
        if self.mode == "idle":
            return f"idle-c{self.connections}"
        return f"{self.mode}-{self.size // 1024}k-c{self.connections}"

    @property
    def label(self) -> str:
        """For tables and charts."""
        if self.mode == "idle":
            return f"idle x{self.connections:,}"
        return f"{self.mode} {self.size // 1024} KiB x{self.connections}"


DEFAULT_CELLS = (
    Cell("rr", 1024, 1),
    Cell("rr", 1024, 10),
    Cell("rr", 1024, 100),
    Cell("rr", 1024, 1000),
    Cell("rr", 65536, 10),
    Cell("stream", 65536, 10),
)
QUICK_CELLS = (Cell("rr", 1024, 10),)


@dataclass
class Run:
    """One contender on one cell under one placement, in one round."""

    round: int
    placement: str
    cell: str
    contender: str
    ok: bool = False
    note: str = ""
    #: What the server said when it was ready (rsepoll: which build it imported).
    server_ready: str = ""
    #: The load tool's JSON report (see python -m rsepoll.bench --help).
    client: dict[str, Any] = field(default_factory=dict)
    #: Seconds between the measure-start and measure-end samples.
    window_s: float = 0.0
    server_cpu_s: float = 0.0
    server_user_s: float = 0.0
    #: CPU seconds per server thread, by name (the thread with the process's
    #: id is "main"; rsepoll's I/O thread is "rsepoll-io").
    server_threads_s: dict[str, float] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    #: CPU seconds that neither the server nor the client used meanwhile.
    other_cpu_s: float = 0.0
    #: CPUs the server's threads were allowed on, as seen during the run.
    server_cpus: list[int] = field(default_factory=list)
    #: VmRSS in bytes: once the server is ready, and at both marks.
    rss_ready: int = 0
    rss_start: int = 0
    rss_end: int = 0

    @property
    def errors(self) -> int:
        return int(self.client.get("errors", 0)) + int(self.client.get("stalled", 0))

    @property
    def requests(self) -> int:
        return int(self.client.get("requests", 0))

    def throughput(self) -> float:
        """req/s (rr), MB/s echoed back (stream), connections held (idle)."""
        mode = self.client.get("mode")
        if mode == "stream":
            return float(self.client.get("mb_per_s_in", 0.0))
        if mode == "idle":
            return float(self.client.get("held", 0))
        return float(self.client.get("requests_per_s", 0.0))

    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s * 1e6 / self.requests if self.requests else 0.0

    def thread_us_per_request(self) -> dict[str, float]:
        if not self.requests:
            return {}
        return {k: v * 1e6 / self.requests for k, v in sorted(self.server_threads_s.items())}

    def bytes_per_connection(self) -> float:
        held = int(self.client.get("held", 0))
        return (self.rss_end - self.rss_ready) / held if held else 0.0

    def summary(self) -> dict[str, Any]:
        """The numbers the tables, the medians and the chart use."""
        return {
            "throughput": self.throughput(),
            "warmup_s": self.client.get("warmup_s", 0.0),
            # None: a fixed warm-up (--fixed-warmup, or an idle cell).
            "warmup_steady": self.client.get("warmup_steady"),
            "requests_per_s": self.client.get("requests_per_s", 0.0),
            "mb_per_s": self.client.get("mb_per_s_in", 0.0),
            "p50_us": self.client.get("p50_us", 0.0),
            "p99_us": self.client.get("p99_us", 0.0),
            "errors": self.errors,
            "cpu_us_per_request": self.cpu_us_per_request(),
            "thread_us_per_request": self.thread_us_per_request(),
            "server_cpu_frac": self.server_cpu_s / self.window_s if self.window_s else 0.0,
            "client_cpu_frac": self.client_cpu_s / self.window_s if self.window_s else 0.0,
            "other_cpu_frac": self.other_cpu_s / self.window_s if self.window_s else 0.0,
            "held": self.client.get("held", 0),
            "rss_ready": self.rss_ready,
            "rss_end": self.rss_end,
            "bytes_per_connection": self.bytes_per_connection(),
        }


# --------------------------------------------------------------------------
# Child processes: started pinned or not, never outliving the suite.

_LIVE: set[subprocess.Popen[bytes]] = set()
_PR_SET_PDEATHSIG = 1


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """A preexec_fn: pin the child (and so every thread it starts) to ``cpu``,
    and have the kernel kill it if the suite dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


@contextlib.contextmanager
def child(argv: list[str], cpu: int | None, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess that is stopped (SIGTERM, then SIGKILL) when the block ends,
    however it ends."""
    proc = subprocess.Popen(argv, preexec_fn=_child_setup(cpu), **popen)
    _LIVE.add(proc)
    try:
        yield proc
    finally:
        with contextlib.suppress(Exception):
            echo.stop(proc, grace=5.0)
        _LIVE.discard(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def kill_children() -> None:
    """Kills whatever child is still running (on Ctrl-C, SIGTERM or a crash)."""
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(5)


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one (children inherit it: the
    asyncio servers do not raise it themselves); returns the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------
# Servers and measuring one run.


def ensure_native() -> str:
    """Builds native/echo.c if its binary is missing or older; '' if it is
    ready, else why the native server is skipped."""
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler (cc) on PATH: native skipped"
    if NATIVE_BINARY.exists() and NATIVE_BINARY.stat().st_mtime >= NATIVE_SOURCE.stat().st_mtime:
        return ""
    print(f"building {NATIVE_BINARY.relative_to(HERE.parent)} (cc -O2) ...", flush=True)
    done = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(NATIVE_BINARY), str(NATIVE_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode:
        return f"cc failed: native skipped\n{done.stderr}"
    return ""


def server_argv(contender: str, cell: Cell, callback_us: float = 0) -> list[str]:
    if contender == "native":
        return [str(NATIVE_BINARY)]
    kind = "rsepoll-epoll" if contender == "rsepoll" else contender
    argv = [sys.executable, str(HERE / "echo.py"), "--serve", kind]
    if contender.startswith("rsepoll"):
        # Server's default max_fds (8192) would turn away a big idle cell.
        argv += ["--max-fds", str(max(8192, cell.connections + SPARE_FDS))]
    if callback_us:
        argv += ["--callback-us", str(callback_us)]
    return argv


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def allowed_cpus(pid: int) -> list[int]:
    """The CPUs any thread of ``pid`` may run on (pinned: exactly one)."""
    cpus: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            cpus |= os.sched_getaffinity(int(tid))
    return sorted(cpus)


def measure(run: Run, cell: Cell, args: argparse.Namespace, cpus: tuple[int, int] | None) -> None:
    """Starts the server and the load tool, samples /proc at the load tool's
    marks, and fills in ``run``."""
    server_cpu, client_cpu = cpus if cpus else (None, None)
    with contextlib.ExitStack() as stack:
        server_err = stack.enter_context(tempfile.TemporaryFile("w+"))
        client_out = stack.enter_context(tempfile.TemporaryFile("w+"))
        server = stack.enter_context(
            child(
                server_argv(run.contender, cell, args.callback_us),
                server_cpu,
                stdout=subprocess.PIPE,
                stderr=server_err,
                bufsize=0,
            )
        )
        assert server.stdout is not None
        line = echo.LineReader(server.stdout).readline(time.monotonic() + 15)
        if not line or not line.startswith("ready "):
            server_err.seek(0)
            run.note = f"server did not start (said {line!r}; stderr {server_err.read()[-300:]!r})"
            return
        port = int(line.split()[1])
        run.server_ready = line
        if not args.no_first_connection:
            try:
                echo.first_connection(port, cell.size)
            except OSError as exc:
                run.note = f"the first connection failed: {exc}"
                return
        run.rss_ready = rss_bytes(server.pid)
        connect_timeout = max(10.0, cell.connections / 1000)
        argv = [
            sys.executable,
            *("-m", "rsepoll.bench", f"127.0.0.1:{port}"),
            *("--mode", cell.mode, "--size", str(cell.size)),
            *("--connections", str(cell.connections), "--threads", str(args.client_threads)),
            *("--duration", str(args.duration), "--warmup", str(args.warmup)),
            *("--connect-timeout", str(connect_timeout)),
            "--json",
            "--marks",
        ]
        if not args.fixed_warmup:
            argv += ["--warmup-until-steady", "--warmup-max", str(args.warmup_max)]
            argv += ["--steady-tolerance", str(args.steady_tolerance)]
        client = stack.enter_context(
            child(argv, client_cpu, stdout=client_out, stderr=subprocess.PIPE, bufsize=0)
        )
        assert client.stderr is not None
        lines = echo.LineReader(client.stderr)
        # The load tool ends by itself within connect + warmup + duration + 2 s.
        warmup = args.warmup if args.fixed_warmup else args.warmup_max
        deadline = time.monotonic() + connect_timeout + warmup + args.duration + 15
        before = after = None
        complaints = []
        while (text := lines.readline(deadline)) is not None:
            try:
                if text == "measure-start":
                    before = echo.sample(server.pid, client.pid)
                    run.rss_start = rss_bytes(server.pid)
                    run.server_cpus = allowed_cpus(server.pid)
                elif text == "measure-end":
                    after = echo.sample(server.pid, client.pid)
                    run.rss_end = rss_bytes(server.pid)
                elif text.strip():
                    complaints.append(text.strip())
            except (FileNotFoundError, ProcessLookupError):
                complaints.append("a process ended during the run")
        try:
            client.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            run.note = "the load tool did not finish in time: killed"
            return
        client_out.seek(0)
        output = client_out.read().strip()
        if not output:
            run.note = "; ".join(complaints[-3:]) or f"load tool exited {client.returncode}"
            return
        try:
            run.client = json.loads(output)
        except ValueError:
            run.note = f"the load tool printed no JSON: {output[:200]!r}"
            return
        if before is None or after is None:
            run.note = "no measure marks from the load tool"
            return
        if server.poll() is not None:
            run.note = f"server exited with code {server.returncode} during the run"
            return
    run.window_s = after.wall - before.wall
    run.server_user_s = after.server_user - before.server_user
    run.server_cpu_s = run.server_user_s + after.server_sys - before.server_sys
    run.client_cpu_s = after.client_cpu - before.client_cpu
    run.server_threads_s = {
        name: cpu - before.server_threads.get(name, 0.0)
        for name, cpu in after.server_threads.items()
    }
    busy = (after.machine_busy - before.machine_busy) / echo.CLK_TCK
    run.other_cpu_s = max(0.0, busy - run.server_cpu_s - run.client_cpu_s)
    run.ok = True
    if server_cpu is not None and run.server_cpus != [server_cpu]:
        run.note = f"pinning failed: the server's threads could run on CPUs {run.server_cpus}"
        run.ok = False
    if run.errors:
        run.note = f"{run.errors} errors: " + "; ".join(run.client.get("error_samples", [])[:2])


# --------------------------------------------------------------------------
# The matrix.


@dataclass
class Plan:
    """What runs: every contender on every cell under every placement."""

    placements: list[str]
    cells: list[Cell]
    contenders: list[str]
    #: What will not run: each names a "placement", "cell" or "contender",
    #: and gives the "reason".
    skipped: list[dict[str, str]]
    notes: list[str]


def parse_cells(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Cell]:
    if args.quick:
        cells = list(QUICK_CELLS)
    else:
        cells = list(DEFAULT_CELLS)
        for text in filter(None, (t.strip() for t in args.idle.split(","))):
            if text == "none":
                continue
            try:
                count = int(text.replace("_", ""))
            except ValueError:
                parser.error(f"--idle: {text!r} is not a number of connections")
            if count < 1:
                parser.error("--idle: connections must be positive")
            cells.append(Cell("idle", 64, count))
    if args.cells:
        wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
        known = {c.name: c for c in cells}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            parser.error(f"--cells: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        cells = [known[w] for w in wanted]
    return cells


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """What will run, and what will not and why."""
    skipped: list[dict[str, str]] = []
    notes: list[str] = []
    placements = list(PLACEMENTS) if args.placement == "both" else [args.placement]
    if "pinned" in placements and len(os.sched_getaffinity(0)) < 2:
        placements.remove("pinned")
        skipped.append({"placement": "pinned", "reason": "needs 2 usable CPUs"})
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if c not in CONTENDERS:
            parser.error(f"--contenders: unknown {c!r} (one of {', '.join(CONTENDERS)})")
    if "uvloop" in contenders:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            contenders.remove("uvloop")
            skipped.append({"contender": "uvloop", "reason": "not installed (pip install uvloop)"})
    if "native" in contenders and args.callback_us:
        contenders.remove("native")
        skipped.append(
            {"contender": "native", "reason": "--callback-us: it has no Python callback"}
        )
    if "native" in contenders and (why := ensure_native()):
        contenders.remove("native")
        skipped.append({"contender": "native", "reason": why})
    hard = raise_fd_limit()
    cells = []
    for cell in parse_cells(args, parser):
        need = cell.connections + SPARE_FDS
        if hard != resource.RLIM_INFINITY and need > hard:
            reason = (
                f"needs ~{need:,} file descriptors in the server and in the client, but "
                f"the hard RLIMIT_NOFILE here is {hard:,} (raising it takes a limit the "
                "machine allows: ulimit -Hn, or LimitNOFILE)"
            )
            skipped.append({"cell": cell.name, "reason": reason})
        else:
            cells.append(cell)
    if len(contenders) < 2:
        notes.append("fewer than two contenders: no ratios")
    return Plan(placements, cells, contenders, skipped, notes)


def cpus_for(placement: str) -> tuple[int, int] | None:
    """(server CPU, client CPU) for ``pinned``: the first two usable CPUs."""
    if placement != "pinned":
        return None
    usable = sorted(os.sched_getaffinity(0))
    return usable[0], usable[1]


def estimate_seconds(p: Plan, args: argparse.Namespace) -> float:
    """About how long the plan takes: each run is its warmup (until steady: ~1 s
    more than the least, on a quiet machine) and duration plus ~0.6 s to start
    and stop both processes and echo the first connection (idle: ~1 s per
    10,000 connections to connect and check them, instead of the warmup)."""
    warmup = args.warmup if args.fixed_warmup else min(args.warmup_max, max(args.warmup, 1.0) + 1)
    per_round = 0.0
    for cell in p.cells:
        load = args.duration + (cell.connections / 10_000 if cell.mode == "idle" else warmup)
        per_round += (load + 0.6) * len(p.contenders)
    return per_round * len(p.placements) * args.rounds


def run_matrix(p: Plan, args: argparse.Namespace) -> list[Run]:
    """Round by round; within a round, every contender back to back on each cell,
    so the ratios of one round share the machine's state."""
    runs: list[Run] = []
    total = len(p.placements) * len(p.cells) * len(p.contenders) * args.rounds
    for round_ in range(1, args.rounds + 1):
        for placement in p.placements:
            for cell in p.cells:
                for contender in p.contenders:
                    run = Run(round_, placement, cell.name, contender)
                    print(
                        f"[{len(runs) + 1}/{total}] round {round_}, {placement}, "
                        f"{cell.label}: {contender} ...",
                        end="",
                        flush=True,
                    )
                    measure(run, cell, args, cpus_for(placement))
                    shown = format_rate(cell, run.throughput()) if run.ok else "failed"
                    print(f" {shown}" + (f" ({run.note})" if run.note else ""), flush=True)
                    runs.append(run)
    return runs


# --------------------------------------------------------------------------
# Medians, ratios and the document written by --json.


def median_run(runs: list[Run]) -> Run | None:
    """The run with the median throughput (lower median), so that every field
    of a row comes from one real run."""
    good = sorted((r for r in runs if r.ok), key=Run.throughput)
    return good[(len(good) - 1) // 2] if good else None


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def medians(p: Plan, runs: list[Run]) -> list[dict[str, Any]]:
    """One entry per (placement, cell, contender): the median run's numbers,
    the min-max of throughput over rounds, and ratios to uvloop and native
    (of the medians, and round by round)."""
    out = []
    for placement in p.placements:
        for cell in p.cells:
            group = {
                c: [
                    r
                    for r in runs
                    if (r.placement, r.cell, r.contender) == (placement, cell.name, c)
                ]
                for c in p.contenders
            }
            mids = {c: median_run(rs) for c, rs in group.items()}
            for contender, rs in group.items():
                mid = mids[contender]
                entry: dict[str, Any] = {
                    "placement": placement,
                    "cell": cell.name,
                    "contender": contender,
                    "rounds": len(rs),
                    "ok_rounds": sum(r.ok for r in rs),
                    "errors": sum(r.errors for r in rs),
                }
                if mid is not None:
                    entry.update(mid.summary())
                    rates = [r.throughput() for r in rs if r.ok]
                    entry["min"], entry["max"] = min(rates), max(rates)
                for base in ("uvloop", "native"):
                    if base not in mids or mids[base] is None or mid is None:
                        continue
                    key = "bytes_per_connection" if cell.mode == "idle" else "throughput"
                    entry[f"vs_{base}"] = ratio(mid.summary()[key], mids[base].summary()[key])
                    entry[f"cpu_vs_{base}"] = ratio(
                        mid.cpu_us_per_request(), mids[base].cpu_us_per_request()
                    )
                    paired = []
                    for mine, theirs in zip(rs, group[base]):
                        if mine.ok and theirs.ok:
                            paired.append(ratio(mine.summary()[key], theirs.summary()[key]))
                    entry[f"vs_{base}_by_round"] = paired
                out.append(entry)
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu_model": echo.cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "rlimit_nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def software() -> dict[str, str]:
    vers = echo.versions({})
    if cc := shutil.which("cc"):
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        vers["cc"] = out.stdout.splitlines()[0] if out.stdout else "?"
    return vers


def document(
    p: Plan, args: argparse.Namespace, runs: list[Run], started: datetime.datetime
) -> dict[str, Any]:
    """Everything --json writes, and what --from-json reads back."""
    return {
        "format": FORMAT,
        "date": started.isoformat(timespec="seconds"),
        "seconds": round(time.time() - started.timestamp(), 1),
        "machine": machine(),
        "versions": software(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {
            "rounds": args.rounds,
            "duration": args.duration,
            "warmup": args.warmup,
            # The warm-up ran until the rate settled, for at most warmup_max
            # (None: exactly `warmup`).
            "warmup_max": None if args.fixed_warmup else args.warmup_max,
            "steady_tolerance_pct": None if args.fixed_warmup else args.steady_tolerance,
            "first_connection": not args.no_first_connection,
            "client_threads": args.client_threads,
            "callback_us": args.callback_us,
            "placements": {pl: cpus_for(pl) for pl in p.placements},
        },
        "cells": [{"name": c.name, "label": c.label, **asdict(c)} for c in p.cells],
        "contenders": p.contenders,
        "skipped": p.skipped,
        "notes": p.notes,
        "runs": [
            {
                **asdict(r),
                "summary": r.summary(),
            }
            for r in runs
        ],
        "medians": medians(p, runs),
    }


# --------------------------------------------------------------------------
# Printing.


def format_rate(cell: Cell, value: float) -> str:
    if cell.mode == "stream":
        return f"{value:,.0f} MB/s"
    if cell.mode == "idle":
        return f"{value:,.0f} held"
    return f"{value:,.0f} req/s"


def short(value: float) -> str:
    return f"{value / 1000:,.0f}k" if value >= 10_000 else f"{value:,.0f}"


def times(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def print_tables(doc: dict[str, Any]) -> None:
    cells = {c["name"]: Cell(c["mode"], c["size"], c["connections"]) for c in doc["cells"]}
    rounds = doc["settings"]["rounds"]
    for placement, cpus in doc["settings"]["placements"].items():
        rows = [m for m in doc["medians"] if m["placement"] == placement]
        if cpus:
            where = f"server (all its threads) on CPU {cpus[0]}, client on CPU {cpus[1]}"
        else:
            where = "server and client on any CPU"
        print()
        callback_us = doc["settings"].get("callback_us") or 0
        print(
            f"{placement}: {where}"
            + (f"; median of {rounds} rounds" if rounds > 1 else "")
            + (f"; every callback spins {callback_us:g} µs first" if callback_us else "")
        )
        load = [m for m in rows if cells[m["cell"]].mode != "idle"]
        if load:
            head = (
                f"{'cell':<18} {'server':<8} {'rate':>16} "
                + (f"{'min-max':>11} " if rounds > 1 else "")
                + f"{'p50 µs':>8} {'p99 µs':>8} {'err':>4} {'CPU µs/req':>10} "
                f"{'vs uvloop':>9} {'vs native':>9} {'client':>6} {'other':>5} {'warm-up':>7}  "
                "by thread (µs/req)"
            )
            print(head)
            print("-" * len(head))
            for m in load:
                print_row(cells[m["cell"]], m, rounds)
        idle = [m for m in rows if cells[m["cell"]].mode == "idle"]
        if idle:
            head = (
                f"{'cell':<18} {'server':<8} {'held':>7} {'err':>4} {'RSS ready':>10} "
                f"{'RSS held':>10} {'bytes/conn':>10} {'vs uvloop':>9} {'vs native':>9} "
                f"{'idle CPU':>8}"
            )
            print()
            print(head)
            print("-" * len(head))
            for m in idle:
                label = cells[m["cell"]].label
                if "throughput" not in m:
                    print(f"{label:<18} {m['contender']:<8} (no result)")
                    continue
                print(
                    f"{label:<18} {m['contender']:<8} {m['held']:>7,} {m['errors']:>4} "
                    f"{m['rss_ready'] / 2**20:>6.1f} MiB {m['rss_end'] / 2**20:>6.1f} MiB "
                    f"{m['bytes_per_connection']:>10,.0f} {times(m.get('vs_uvloop')):>9} "
                    f"{times(m.get('vs_native')):>9} {m['server_cpu_frac']:>8.1%}"
                )
    for s in doc["skipped"]:
        what = s.get("cell") or s.get("contender") or s.get("placement")
        print(f"skipped: {what}: {s['reason']}")
    unsettled = [r for r in doc["runs"] if r["summary"].get("warmup_steady") is False]
    for r in unsettled:
        rates = ", ".join(short(x) for x in r["client"].get("warmup_rates", []))
        print(
            f"note: round {r['round']}, {r['placement']}, {r['cell']}, {r['contender']}: the "
            f"rate did not settle in the warm-up ({r['summary']['warmup_s']:.1f} s; rates per "
            f"0.25 s: {rates})"
        )
    for note in doc["notes"]:
        print(f"note: {note}")


def client_bound(m: dict[str, Any]) -> bool:
    """Whether the load tool, not the server, set the rate of the run summed up
    in ``m``: it was (nearly) always busy, and the server was not."""
    return m.get("client_cpu_frac", 0.0) >= CLIENT_BOUND > m.get("server_cpu_frac", 0.0)


def print_row(cell: Cell, m: dict[str, Any], rounds: int) -> None:
    if "throughput" not in m:
        print(f"{cell.label:<18} {m['contender']:<8} (no result in {m['rounds']} round(s))")
        return
    spread = f"{short(m['min'])}-{short(m['max'])}" if rounds > 1 else ""
    threads = ", ".join(f"{k} {v:.2f}" for k, v in m["thread_us_per_request"].items() if v)
    warmup = f"{m['warmup_s']:.1f}s" if "warmup_s" in m else "-"
    client = f"{m['client_cpu_frac']:.0%}" if "client_cpu_frac" in m else "-"
    rate = format_rate(cell, m["throughput"])
    if client_bound(m):
        rate += "^"
    if m.get("warmup_steady") is False:
        warmup += "!"
    print(
        f"{cell.label:<18} {m['contender']:<8} {rate:>16} "
        + (f"{spread:>11} " if rounds > 1 else "")
        + f"{m['p50_us']:>8.0f} {m['p99_us']:>8.0f} {m['errors']:>4} "
        f"{m['cpu_us_per_request']:>10.2f} {times(m.get('vs_uvloop')):>9} "
        f"{times(m.get('vs_native')):>9} {client:>6} {m['other_cpu_frac']:>5.0%} {warmup:>7}  "
        f"{threads}"
    )


def print_paired(doc: dict[str, Any]) -> None:
    """Round-by-round ratios: each round runs the contenders back to back, so
    these are less exposed to drift than ratios of medians."""
    lines = []
    for m in doc["medians"]:
        for base in ("uvloop", "native"):
            values = [v for v in m.get(f"vs_{base}_by_round", []) if v is not None]
            if m["contender"] != base and len(values) > 1:
                lines.append(
                    f"  {m['placement']}, {m['cell']}: {m['contender']} / {base}: "
                    + ", ".join(f"{v:.2f}" for v in values)
                    + f" (median {statistics.median(values):.2f})"
                )
    if lines:
        print()
        print("round by round (idle: bytes per connection):")
        print("\n".join(lines))


LEGEND = """\
rate: rr: requests/s; stream: MB/s (10^6 bytes) echoed back. min-max: over the rounds.
p50/p99 µs: request written -> whole reply read, at the client (stream: a chunk's write
  -> the read of its last byte). err: failed + stalled connections.
CPU µs/req: server CPU (user+sys, all threads, from /proc/<pid>/stat between the load
  tool's measure-start and measure-end lines) / requests in that window (stream: per
  request-sized chunk). by thread: the same per server thread (/proc/<pid>/task/*/stat).
vs uvloop / vs native: rate / theirs (idle: bytes per connection / theirs).
client: the load tool's CPU, 100% = one core. ^ after a rate: the load tool was busy 90%
  of the time or more and the server less: the load tool set the rate, which is a lower
  bound for what the server can do (and a ratio against it says little).
other: CPU used by other processes meanwhile, 100% = one core (should be ~0%).
warm-up: how long the load ran before the measured time: until 4 successive 0.25 s rates
  were within the tolerance of their mean (at least --warmup); "!": they never were, and
  the measured time began at --warmup-max. Every server first echoed one request on a
  connection of its own and saw it closed.
idle: RSS ready = once the server listens and has echoed its first connection; RSS held =
  with every connection open, at the end of the hold; bytes/conn = (held - ready) /
  connections; idle CPU = server CPU while the connections were held, 100% = one core."""


# --------------------------------------------------------------------------
# The chart.


def draw_chart(doc: dict[str, Any], path: str) -> bool:
    """A grouped bar chart of each contender's rate / the baseline's (uvloop,
    else native, else asyncio) per cell, one panel per placement. False, with
    a message, if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "chart skipped: matplotlib is not installed "
            "(pip install 'rsepoll[bench]', or pip install matplotlib)"
        )
        return False
    cells = [c for c in doc["cells"] if c["mode"] != "idle"]
    contenders = doc["contenders"]
    base = next((b for b in ("uvloop", "native", "asyncio") if b in contenders), contenders[0])
    placements = list(doc["settings"]["placements"])
    fig, axes = plt.subplots(
        1, len(placements), figsize=(6 * len(placements), 4.5), sharey=True, squeeze=False
    )
    width = 0.8 / len(contenders)
    by_key = {(m["placement"], m["cell"], m["contender"]): m for m in doc["medians"]}
    for ax, placement in zip(axes[0], placements):
        for i, contender in enumerate(contenders):
            heights = []
            for c in cells:
                mine = by_key.get((placement, c["name"], contender), {})
                theirs = by_key.get((placement, c["name"], base), {})
                heights.append(
                    mine["throughput"] / theirs["throughput"]
                    if mine.get("throughput") and theirs.get("throughput")
                    else 0.0
                )
            xs = [j + (i - (len(contenders) - 1) / 2) * width for j in range(len(cells))]
            bars = ax.bar(xs, heights, width, label=contender)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(cells)), [c["label"] for c in cells], rotation=30, ha="right")
        ax.set_title(placement)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"rate / {base}'s (higher is better)")
    axes[0][-1].legend(fontsize=8)
    m = doc["machine"]
    callback_us = doc["settings"].get("callback_us") or 0
    fig.suptitle(
        f"Echo servers on {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
        f"{doc['date'][:10]}"
        + (f"\nevery callback spins {callback_us:g} µs first" if callback_us else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"chart written to {path}")
    return True


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--placement",
        choices=["pinned", "unpinned", "both"],
        help="pinned: server (all threads) on one CPU, client on another; "
        "default both (--quick: unpinned)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    parser.add_argument(
        "--duration", type=float, help="measured seconds per run (default 3; idle: held)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="unmeasured seconds first: the least warm-up, which goes on until the rate "
        "settles (default 1; --quick 0.5)",
    )
    parser.add_argument(
        "--warmup-max",
        type=float,
        help="the longest warm-up, if the rate does not settle (default 6; --quick 2)",
    )
    parser.add_argument(
        "--steady-tolerance",
        type=float,
        default=10.0,
        metavar="PCT",
        help="the rate has settled when 4 successive 0.25 s rates are within PCT%% of "
        "their mean, (highest - lowest) / mean (default 10: this 2-vCPU VM's 0.25 s rates "
        "swing by 5-15%% in a steady state)",
    )
    parser.add_argument(
        "--fixed-warmup",
        action="store_true",
        help="warm up for exactly --warmup seconds, settled or not",
    )
    parser.add_argument(
        "--no-first-connection",
        action="store_true",
        help="load each server straight after it starts, without first having one "
        "request echoed on a connection of its own and closed",
    )
    parser.add_argument(
        "--idle",
        default="10000",
        metavar="N[,N...]",
        help="idle cells, in connections (default 10000; 'none' for no idle cell)",
    )
    parser.add_argument(
        "--cells", help="run only these cells, by name (e.g. rr-1k-c10,stream-64k-c10)"
    )
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, from {','.join(CONTENDERS)} (default all)",
    )
    parser.add_argument(
        "--client-threads", type=int, default=1, help="load tool threads (default 1)"
    )
    parser.add_argument(
        "--callback-us",
        type=float,
        default=0.0,
        metavar="US",
        help="every server's callback first spins US µs in Python, holding the GIL, as an "
        "application's own work would (default 0: a bare echo); native, which has no "
        "Python callback, is skipped",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: rr 1 KiB x10 only, 1 s, unpinned, warm-up 0.5-2 s",
    )
    parser.add_argument("--json", metavar="PATH", help="write every run and the medians")
    parser.add_argument("--chart", metavar="PATH.png", help="draw a chart (needs matplotlib)")
    parser.add_argument(
        "--from-json", metavar="PATH", help="read results saved by --json instead of running"
    )
    args = parser.parse_args(argv)

    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        if doc.get("format") not in READABLE_FORMATS:
            parser.error(
                f"{args.from_json}: not a suite.py --json file of format "
                + " or ".join(map(str, READABLE_FORMATS))
            )
        print_tables(doc)
        if args.chart:
            draw_chart(doc, args.chart)
        return 0
    if sys.platform != "linux":
        parser.error("the suite reads /proc and pins with sched_setaffinity: Linux only")
    args.placement = args.placement or ("unpinned" if args.quick else "both")
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    if args.warmup_max is None:
        args.warmup_max = max(args.warmup, 2.0 if args.quick else 6.0)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.client_threads < 1:
        parser.error(
            "--rounds and --client-threads must be positive, --duration > 0, --warmup >= 0"
        )
    if not 0 <= args.callback_us <= 1_000_000:
        parser.error("--callback-us must be from 0 to 1,000,000")
    if not args.fixed_warmup and not (
        args.warmup_max >= args.warmup and args.steady_tolerance >= 0
    ):
        parser.error("--warmup-max must be at least --warmup, --steady-tolerance >= 0")

    p = plan(args, parser)
    started = datetime.datetime.now().astimezone()
    load = echo.background_load(0.5)
    if load > 0.05:
        p.notes.append(
            f"the machine was {load:.0%} busy before the suite started: "
            "expect noise (see the 'other' column)"
        )
    print(
        f"{len(p.cells)} cell(s) x {len(p.contenders)} contender(s) x "
        f"{len(p.placements)} placement(s) x {args.rounds} round(s); "
        f"about {estimate_seconds(p, args) / 60:.1f} min"
    )
    runs = run_matrix(p, args)
    doc = document(p, args, runs, started)
    print_tables(doc)
    print_paired(doc)
    print()
    print(LEGEND)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"results written to {args.json}")
    if args.chart:
        draw_chart(doc, args.chart)
    return 1 if any(not r.ok or r.errors for r in runs) else 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Started in the background by a non-interactive shell, SIGINT is ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        kill_children()
