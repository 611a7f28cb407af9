"""Echo benchmark: rsepoll (epoll and portable backends) against asyncio and uvloop.

Usage::

    python benchmarks/echo.py [--connections 100] [--size 1024] [--duration 5] [--warmup 1]

Each server runs in its own subprocess (this script with ``--serve KIND``) on a
loopback port. The load comes from ``loadgen/`` (a small Rust program, built
with cargo if missing): ``--connections`` connections, each sending ``--size``
bytes, reading exactly ``--size`` bytes back and sending again, one message in
flight per connection, like vmbench's echo client. Responses are checked by
length, framing bytes and a sequence number in the first and last 8 bytes of
their payload every time, and in full every 32nd time.

The server's CPU time (utime + stime from /proc/<pid>/stat) is sampled when the
load generator enters and leaves its measured window. The client runs on the
same CPUs as the servers: both compete for the machine's cores.

``--framing raw|line|length`` makes every request one well-formed message of
exactly ``--size`` bytes on the wire and starts the rsepoll servers with that
``framing``; the asyncio and uvloop servers echo the bytes as they come, which
for one message at a time is the same reply. ``--servers`` takes contenders of
the form ``KIND[/FRAMING][@SOURCE]``, where ``/FRAMING`` overrides ``--framing``
for that contender and ``@SOURCE`` names a ``--rsepoll-from SOURCE=DIR``: a
directory put first on that server's PYTHONPATH, to run an older build side by
side with the current one, e.g.::

    python benchmarks/echo.py --rounds 5 \\
        --rsepoll-from base=/tmp/venv-base/lib/python3.11/site-packages \\
        --servers rsepoll-epoll@base,rsepoll-epoll,rsepoll-epoll/line,rsepoll-epoll/length \\
        --ratios-against rsepoll-epoll@base,rsepoll-epoll
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

HERE = Path(__file__).resolve().parent
LOADGEN_DIR = HERE / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "echo-loadgen"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVERS = (
    "rsepoll-epoll",
    "rsepoll-portable",
    "asyncio",
    "uvloop",
    # rsepoll (epoll) under Server.serve() inside an asyncio or uvloop loop.
    "rsepoll-serve-asyncio",
    "rsepoll-serve-uvloop",
    # rsepoll (epoll) with io_threads=0 (inline), 1 and "auto"; the plain
    # rsepoll-epoll takes the default (inline on one usable CPU, else 1).
    "rsepoll-inline",
    "rsepoll-threaded",
    "rsepoll-auto",
)
#: The io_threads of the contenders that set it.
IO_THREADS: dict[str, int | str] = {
    "rsepoll-inline": 0,
    "rsepoll-threaded": 1,
    "rsepoll-auto": "auto",
}
#: What --servers runs unless told otherwise.
DEFAULT_SERVERS = SERVERS[:4]
FRAMINGS = ("raw", "line", "length")


@dataclass(frozen=True)
class Contender:
    """One entry of ``--servers``: ``KIND[/FRAMING][@SOURCE]``."""

    label: str
    kind: str  # one of SERVERS
    framing: str  # what the load generator sends; the rsepoll server's framing
    source: str  # a name from --rsepoll-from ("" = the default)
    pythonpath: str | None  # the directory put first on the server's PYTHONPATH


def parse_contender(spec: str, framing: str, sources: dict[str, str]) -> Contender:
    rest, _, source = spec.partition("@")
    kind, _, own_framing = rest.partition("/")
    if kind not in SERVERS:
        raise ValueError(f"unknown server {kind!r} in {spec!r} (one of {', '.join(SERVERS)})")
    if own_framing and own_framing not in FRAMINGS:
        raise ValueError(f"unknown framing {own_framing!r} in {spec!r}")
    if source and source not in sources:
        raise ValueError(f"{spec!r}: no --rsepoll-from {source}=DIR was given")
    if source and not kind.startswith("rsepoll-"):
        raise ValueError(f"{spec!r}: @SOURCE is for the rsepoll servers only")
    path = sources.get(source) if kind.startswith("rsepoll-") else None
    return Contender(spec, kind, own_framing or framing, source, path)


# --------------------------------------------------------------------------
# The servers (run as ``echo.py --serve KIND``).


def serve(kind: str, framing: str, max_fds: int | None = None, callback_us: float = 0) -> None:
    """Runs one echo server on a free loopback port; prints ``ready PORT ...``.
    ``max_fds`` goes to the rsepoll servers (suite.py's idle cells need more
    than the default 8192); the asyncio servers take the limit they inherit.
    ``callback_us``: each callback first spins that long (wall time) in
    Python, with the GIL held, as an application's own work would (see
    :func:`work`)."""
    work_ns = round(callback_us * 1000)
    if kind.startswith("rsepoll-serve-"):
        serve_rsepoll("epoll", framing, max_fds, loop=kind.rsplit("-", 1)[1], work_ns=work_ns)
    elif kind in IO_THREADS:
        serve_rsepoll("epoll", framing, max_fds, io_threads=IO_THREADS[kind], work_ns=work_ns)
    elif kind.startswith("rsepoll-"):
        serve_rsepoll(kind.split("-", 1)[1], framing, max_fds, work_ns=work_ns)
    else:
        serve_asyncio(kind, work_ns)


def work(ns: int) -> None:
    """Spins for ``ns`` nanoseconds of wall time in Python: the stand-in for
    what a callback of a real application computes. A busy loop, not a sleep,
    so that it takes a CPU and holds the GIL for that long."""
    deadline = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < deadline:
        pass


def serve_rsepoll(
    backend: str,
    framing: str,
    max_fds: int | None = None,
    loop: str | None = None,
    io_threads: int | str | None = None,
    work_ns: int = 0,
) -> None:
    """``loop``: None runs ``listen()``; "asyncio" or "uvloop" runs ``serve()`` in
    that loop. ``io_threads``: None is the server's default. ``work_ns``: see
    :func:`work`."""
    import rsepoll

    where = Path(rsepoll.__file__).parent

    class Echo(rsepoll.Server):
        def on_listen_success(self) -> None:
            print(f"ready {self.port} rsepoll {rsepoll.__version__} {where}", flush=True)

        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            if work_ns:
                work(work_ns)
            self.send_message(conn, data)

        def on_exception_occurred(self, exc: BaseException) -> None:
            print(f"rsepoll server: {exc!r}", file=sys.stderr, flush=True)

    # Builds from before framing existed take no `framing` argument: raw is theirs.
    kwargs: dict[str, object] = {"backend": backend}
    if framing != "raw":
        kwargs["framing"] = framing
    if max_fds is not None:
        kwargs["max_fds"] = max_fds
    if io_threads is not None:
        kwargs["io_threads"] = io_threads
    server = Echo(**kwargs)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.port = listener.port  # type: ignore[attr-defined]
    server.register_listener_socket(listener)
    listener.close()
    signal.signal(signal.SIGTERM, lambda *_: server.stop_server())
    # SIGINT may be ignored when started from a non-interactive shell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        if loop is None:
            server.listen()
        elif loop == "uvloop":
            import uvloop

            uvloop.run(server.serve())
        else:
            asyncio.run(server.serve())


class EchoProtocol(asyncio.Protocol):
    """The usual asyncio echo server (as in vmbench)."""

    transport: asyncio.Transport

    def __init__(self, work_ns: int = 0) -> None:
        #: Nanoseconds of :func:`work` per ``data_received``.
        self.work_ns = work_ns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.work_ns:
            work(self.work_ns)
        self.transport.write(data)


def serve_asyncio(kind: str, work_ns: int = 0) -> None:
    if kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(lambda: EchoProtocol(work_ns), "127.0.0.1", 0, backlog=1024)
    )
    port = server.sockets[0].getsockname()[1]
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    print(f"ready {port}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


# --------------------------------------------------------------------------
# Measuring.


@dataclass
class Sample:
    wall: float
    server_user: float
    server_sys: float
    client_cpu: float
    server_threads: dict[str, float]
    machine_busy: float
    machine_total: float


@dataclass
class Result:
    kind: str
    ok: bool = False
    note: str = ""
    loaded: str = ""  # which rsepoll the server imported (its "ready" line)
    requests: int = 0
    seconds: float = 0.0
    mean_us: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    errors: int = 0
    stalled: int = 0
    full_checks: int = 0
    server_cpu: float = 0.0
    server_user: float = 0.0
    client_cpu: float = 0.0
    window: float = 0.0
    machine_busy_frac: float = 0.0
    other_cpu: float = 0.0
    server_threads: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_us_per_request(self) -> float:
        return self.server_cpu * 1e6 / self.requests if self.requests else 0.0

    def client_us_per_request(self) -> float:
        return self.client_cpu * 1e6 / self.requests if self.requests else 0.0


def proc_cpu(pid: int, tid: int | None = None) -> tuple[str, float, float]:
    """(comm, utime, stime) in seconds of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        text = f.read()
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return comm, int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads with the same name are summed)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, user, system = proc_cpu(pid, int(tid))
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = "main" if int(tid) == pid else comm
        out[name] = out.get(name, 0.0) + user + system
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user..steal; guest time is already in user
    return float(total - idle), float(total)


def sample(server_pid: int, client_pid: int) -> Sample:
    busy, total = machine_cpu()
    _, server_user, server_sys = proc_cpu(server_pid)
    _, client_user, client_sys = proc_cpu(client_pid)
    return Sample(
        wall=time.monotonic(),
        server_user=server_user,
        server_sys=server_sys,
        client_cpu=client_user + client_sys,
        server_threads=thread_cpu(server_pid),
        machine_busy=busy,
        machine_total=total,
    )


class LineReader:
    """Lines from a child's unbuffered stdout pipe, each waited for with a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buffer = b""
        self.eof = False

    def readline(self, deadline: float) -> str | None:
        """The next line, or None at EOF or once ``deadline`` passes."""
        while b"\n" not in self.buffer and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                self.buffer += chunk
                self.eof = not chunk
        if b"\n" not in self.buffer:
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")


def first_connection(port: int, size: int, framing: str = "raw", timeout: float = 5.0) -> None:
    """Opens one connection to a freshly started echo server, has one request of
    ``size`` bytes (one message in ``framing``) echoed on it, closes it, and
    gives the server 0.1 s to see the close.

    The benchmarks do this before the load, so that every server is measured
    as it runs once it has served a connection. A fresh CPython asyncio server
    is 3-4x slower until then: its transport reads with ``sock.recv(256 KiB)``,
    a buffer glibc serves with ``mmap`` (above the 128 KiB threshold), shrinks
    with ``mremap`` and frees with ``munmap``, once per read, until a read
    frees a whole buffer (a read that gets EOF does), which raises glibc's
    dynamic mmap threshold above 256 KiB for good. See benchmarks/README.md,
    "A fresh asyncio server is slow"."""
    if framing == "line":
        request = b"p" * (size - 1) + b"\n"
    elif framing == "length":
        request = (size - 4).to_bytes(4, "big") + b"p" * (size - 4)
    else:
        request = b"p" * size
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        got = b""
        while len(got) < len(request):
            chunk = sock.recv(len(request) - len(got))
            if not chunk:
                raise ConnectionError(
                    f"the server closed the first connection after {len(got)} bytes"
                )
            got += chunk
    time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> str:
    """Stops ``proc`` with SIGTERM, then SIGKILL; says what happened if odd."""
    if proc.poll() is not None:
        return f"exited early with code {proc.returncode}" if proc.returncode else ""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"did not stop within {grace:.0f} s of SIGTERM; killed"
    return f"exited with code {code} after SIGTERM" if code else ""


def pinner(pin: bool, index: int) -> Callable[[], None] | None:
    """With ``--pin``: a preexec_fn that puts the child (and every thread it
    starts) on the ``index``-th usable CPU."""
    if not pin:
        return None
    cpu = sorted(os.sched_getaffinity(0))[index]
    return lambda: os.sched_setaffinity(0, {cpu})


def server_env(pythonpath: str | None) -> dict[str, str] | None:
    """The environment for a server whose rsepoll comes from ``pythonpath``."""
    if pythonpath is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


def run_one(who: Contender, args: argparse.Namespace) -> Result:
    """Starts the server, runs the load generator against it, stops both."""
    result = Result(who.label)
    with tempfile.TemporaryFile("w+") as server_err, tempfile.TemporaryFile("w+") as client_err:
        measure(who, args, result, server_err, client_err)
    return result


def run_clean(who: Contender, args: argparse.Namespace) -> Result:
    """``run_one``; with ``--max-other``, reruns (up to ``--reruns`` times) a run during
    which something else used more CPU than that, once the machine has gone quiet."""
    result = run_one(who, args)
    tries = []
    while (
        args.max_other is not None
        and result.ok
        and result.window
        and result.other_cpu / result.window > args.max_other / 100
        and len(tries) < args.reruns
    ):
        tries.append(f"{result.rps:,.0f} req/s with other {result.other_cpu / result.window:.0%}")
        print(f"  other {tries[-1].split(' other ')[1]}: waiting for quiet, rerunning", flush=True)
        deadline = time.monotonic() + 60
        while background_load(2.0) > 0.05 and time.monotonic() < deadline:
            pass
        result = run_one(who, args)
    if tries:
        result.problems.append("rerun; discarded: " + "; ".join(tries))
    return result


def measure(
    who: Contender,
    args: argparse.Namespace,
    result: Result,
    server_err: IO[str],
    client_err: IO[str],
) -> None:
    server: subprocess.Popen[bytes] | None = None
    client: subprocess.Popen[bytes] | None = None
    try:
        server = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                *("--serve", who.kind),
                *("--framing", who.framing),
            ],
            stdout=subprocess.PIPE,
            stderr=server_err,
            bufsize=0,
            env=server_env(who.pythonpath),
            preexec_fn=pinner(args.pin, 0),
        )
        assert server.stdout is not None
        line = LineReader(server.stdout).readline(time.monotonic() + 15)
        if not line or not line.startswith("ready "):
            result.note = f"server did not start (said {line!r})"
            return
        port = int(line.split()[1])
        result.loaded = " ".join(line.split()[2:])
        if not args.no_first_connection:
            try:
                first_connection(port, args.size, who.framing)
            except OSError as exc:
                result.note = f"the first connection failed: {exc}"
                return
        client = subprocess.Popen(
            [
                str(LOADGEN),
                *("--port", str(port)),
                *("--connections", str(args.connections)),
                *("--size", str(args.size)),
                *("--framing", who.framing),
                *("--threads", str(args.client_threads)),
                *("--warmup", str(args.warmup)),
                *("--duration", str(args.duration)),
            ],
            stdout=subprocess.PIPE,
            stderr=client_err,
            bufsize=0,
            preexec_fn=pinner(args.pin, 1),
        )
        assert client.stdout is not None
        lines = LineReader(client.stdout)
        deadline = time.monotonic() + args.warmup + args.duration + 20
        before = after = None
        summary = None
        while True:
            line = lines.readline(deadline)
            if line is None:
                break
            try:
                if line.startswith("measure-start"):
                    before = sample(server.pid, client.pid)
                elif line.startswith("measure-end"):
                    after = sample(server.pid, client.pid)
            except OSError as exc:  # the server (or client) is gone
                result.problems.append(f"could not read CPU times: {exc}")
            if line.startswith("result "):
                summary = json.loads(line[len("result ") :])
        try:
            client_code = client.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
            client_code = None
            result.problems.append("the load generator overran its time limit; killed")
        if summary is None or before is None or after is None:
            result.note = f"no result from the load generator (exit code {client_code})"
        else:
            fill(result, summary, before, after)
            result.ok = True
            if client_code:
                result.problems.append(f"load generator exit code {client_code}")
    finally:
        if client is not None and client.poll() is None:
            client.kill()  # only on an error path: it normally exits by itself
            client.wait()
        if server is not None:
            odd = stop(server)
            if odd:
                result.problems.append(f"server {odd}")
        for f, what in ((client_err, "load generator"), (server_err, "server")):
            f.seek(0)
            text = f.read().strip()
            if text:
                result.problems.extend(f"{what} stderr: {t}" for t in text.splitlines()[:12])


def fill(result: Result, summary: dict, before: Sample, after: Sample) -> None:
    for name in (
        "requests",
        "seconds",
        "mean_us",
        "p50_us",
        "p99_us",
        "max_us",
        "errors",
        "stalled",
        "full_checks",
    ):
        setattr(result, name, summary[name])
    result.window = after.wall - before.wall
    result.server_user = after.server_user - before.server_user
    result.server_cpu = result.server_user + after.server_sys - before.server_sys
    result.client_cpu = after.client_cpu - before.client_cpu
    result.server_threads = {
        name: cpu - before.server_threads.get(name, 0.0)
        for name, cpu in after.server_threads.items()
    }
    total = after.machine_total - before.machine_total
    busy = after.machine_busy - before.machine_busy
    if total > 0:
        result.machine_busy_frac = busy / total
    # CPU time that neither the server nor the client used: other processes
    # (a build, a test run) competing for the same cores make results noisy.
    result.other_cpu = max(0.0, busy / CLK_TCK - result.server_cpu - result.client_cpu)


# --------------------------------------------------------------------------
# Building the load generator and reporting.


def ensure_loadgen() -> None:
    sources = [LOADGEN_DIR / "Cargo.toml", *sorted((LOADGEN_DIR / "src").glob("*.rs"))]
    newest = max(p.stat().st_mtime for p in sources)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= newest:
        return
    print("building the load generator (cargo build --release) ...", flush=True)
    subprocess.run(
        ["cargo", "build", "--release", "--quiet"], cwd=LOADGEN_DIR, check=True, timeout=600
    )


def median_result(runs: list[Result]) -> Result:
    """The run with the median requests/s (the runs themselves are listed too)."""
    good = sorted((r for r in runs if r.ok), key=lambda r: r.rps)
    if not good:
        return runs[-1]
    return good[(len(good) - 1) // 2]


def rsepoll_version(pythonpath: str | None) -> str:
    """Which rsepoll a server started with ``pythonpath`` first would import."""
    code = (
        "import rsepoll, pathlib; print(rsepoll.__version__, pathlib.Path(rsepoll.__file__).parent)"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=server_env(pythonpath),
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "not installed (import timed out)"
    if out.returncode:
        return "not installed"
    version, _, where = out.stdout.strip().partition(" ")
    return f"{version} ({where})"


def versions(sources: dict[str, str]) -> dict[str, str]:
    out = {"python": f"{platform.python_version()} ({sys.executable})"}
    out["rsepoll"] = rsepoll_version(sources.get(""))
    for name, path in sources.items():
        if name:
            out[f"rsepoll@{name}"] = rsepoll_version(path)
    try:
        import uvloop

        out["uvloop"] = uvloop.__version__
    except ImportError:
        out["uvloop"] = "not installed"
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def background_load(seconds: float = 1.0) -> float:
    """How busy the machine is (0..1 of all CPUs) before the benchmark starts."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def print_environment(args: argparse.Namespace, vers: dict[str, str]) -> None:
    print(f"date:        {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"machine:     {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{cpu_model()}, Linux {platform.release()}"
    )
    print(f"python:      {vers['python']}")
    for key, value in vers.items():
        if key.startswith("rsepoll"):
            print(f"{key + ':':<12} {value}")
    print(f"uvloop:      {vers['uvloop']}")
    print(
        f"workload:    {args.connections} connections x {args.size}-byte echoes, one in flight "
        f"each; framing {args.framing} (unless a contender says /FRAMING); "
        f"warmup {args.warmup:g} s, measured {args.duration:g} s, {args.rounds} round(s)"
    )
    if args.pin:
        where = "pinned to its own CPU; the server (all threads) is pinned to another"
    else:
        where = f"on the SAME {os.cpu_count()} CPUs as the server (no pinning)"
    print(
        f"client:      benchmarks/loadgen (Rust, {args.client_threads} thread(s)), {where}, "
        "127.0.0.1"
    )
    print()


def ratio(value: float, base: Result | None, attr: str = "rps") -> str:
    if base is None or not base.ok:
        return "-"
    ref = base.rps if attr == "rps" else getattr(base, attr)()
    return f"{value / ref:.2f}x" if ref else "-"


LEGEND = """\
req/s: responses completed in the measured window.
MB/s: payload echoed per second, one direction (10^6 bytes).
mean/p99 µs: request sent -> whole response read, at the client. (Closed loop: mean ~=
  connections / req/s, so it includes queueing in the client and the server.)
srv CPU: server process CPU time (user+sys, all threads) / wall time; 100% = one core.
CPU-µs/req: that CPU time / requests. client CPU: the load generator's, like srv CPU.
other: CPU used by anything else meanwhile, 100% = one core (should be ~0%).
vs asyncio / vs uvloop: this server's value / theirs (req/s: higher is better;
  CPU-µs/req: lower is better)."""


def print_table(results: dict[str, Result], size: int) -> None:
    base_a = results.get("asyncio")
    base_u = results.get("uvloop")
    w = max(17, *(len(k) for k in results))
    head = (
        f"{'server':<{w}} {'req/s':>9} {'MB/s':>7} {'mean µs':>8} {'p99 µs':>8} "
        f"{'vs asyncio':>10} {'vs uvloop':>9} {'srv CPU':>8} {'CPU-µs/req':>10} "
        f"{'vs asyncio':>10} {'vs uvloop':>9} {'client CPU':>10} {'other':>6}"
    )
    print(head)
    print("-" * len(head))
    for kind, r in results.items():
        if not r.ok:
            print(f"{kind:<{w}} {'(no result: ' + r.note + ')'}")
            continue
        cpu = r.cpu_us_per_request()
        print(
            f"{kind:<{w}} {r.rps:>9,.0f} {r.rps * size / 1e6:>7.1f} {r.mean_us:>8.0f} "
            f"{r.p99_us:>8.0f} {ratio(r.rps, base_a):>10} {ratio(r.rps, base_u):>9} "
            f"{r.server_cpu / r.window:>7.0%} {cpu:>10.2f} "
            f"{ratio(cpu, base_a, 'cpu_us_per_request'):>10} "
            f"{ratio(cpu, base_u, 'cpu_us_per_request'):>9} "
            f"{r.client_cpu / r.window:>10.0%} {r.other_cpu / r.window:>6.0%}"
        )
        if r.errors or r.stalled:
            print(f"{'':<{w}} ^ {r.errors} errors, {r.stalled} stalled connections: see details")
    print()
    print(LEGEND)


def print_details(all_runs: dict[str, list[Result]]) -> None:
    print()
    print("details:")
    for kind, runs in all_runs.items():
        for i, r in enumerate(runs, 1):
            tag = f"  {kind} round {i}:" if len(runs) > 1 else f"  {kind}:"
            if not r.ok:
                print(f"{tag} no result ({r.note})")
            else:
                user = r.server_user / r.server_cpu if r.server_cpu else 0.0
                threads = ", ".join(
                    f"{name} {cpu:.2f} s" for name, cpu in sorted(r.server_threads.items()) if cpu
                )
                print(
                    f"{tag} {r.rps:,.0f} req/s, p50 {r.p50_us:.0f} µs, max {r.max_us:.0f} µs, "
                    f"machine {r.machine_busy_frac:.0%} busy, "
                    f"other {r.other_cpu / r.window:.0%}, "
                    f"{r.errors} errors, {r.stalled} stalled, {r.full_checks} full-body checks; "
                    f"server CPU {r.server_cpu:.2f} s ({user:.0%} user), "
                    f"by thread: {threads or '-'}" + (f"; loaded {r.loaded}" if r.loaded else "")
                )
            for problem in r.problems:
                print(f"    ! {problem}")


def print_paired_ratios(all_runs: dict[str, list[Result]], bases: list[str]) -> None:
    """req/s of each server / a base's (uvloop's, asyncio's, or those of --ratios-against)
    in the same round: the servers of one round run back to back, so this is less
    exposed to drift than medians."""
    for base in bases:
        if base not in all_runs:
            continue
        for kind, runs in all_runs.items():
            if kind == base:
                continue
            ratios = [
                r.rps / b.rps for r, b in zip(runs, all_runs[base]) if r.ok and b.ok and b.rps
            ]
            if ratios:
                print(
                    f"  {kind} / {base}, round by round: "
                    + ", ".join(f"{x:.2f}" for x in ratios)
                    + f" (median {statistics.median(ratios):.2f})"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument(
        "--size", type=int, default=1024, help="request size in bytes on the wire, framing included"
    )
    parser.add_argument(
        "--framing",
        choices=FRAMINGS,
        default="raw",
        help="the load generator's requests and the rsepoll servers' framing (default raw)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument(
        "--no-first-connection",
        action="store_true",
        help="load each server straight after it starts, without first having one "
        "request echoed on a connection of its own (a fresh asyncio server is 3-4x "
        "slower until a connection has closed: see benchmarks/README.md)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run every server this often")
    parser.add_argument(
        "--client-threads", type=int, default=1, help="load generator threads (default 1)"
    )
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated contenders KIND[/FRAMING][@SOURCE]; KIND is one of "
        f"{','.join(SERVERS)} (default: {','.join(DEFAULT_SERVERS)})",
    )
    parser.add_argument(
        "--rsepoll-from",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a directory with an importable rsepoll, put first on the PYTHONPATH of the "
        "rsepoll servers named @NAME (or, without NAME=, of those with no @); repeatable",
    )
    parser.add_argument(
        "--ratios-against",
        default="uvloop,asyncio",
        help="contenders to print round-by-round req/s ratios against (default uvloop,asyncio)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server (all its threads) to one CPU and the load generator to another",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        metavar="PCT",
        help="rerun a run during which other processes used more than PCT%% of a core "
        "(after waiting for the machine to go quiet); for shared machines",
    )
    parser.add_argument(
        "--reruns", type=int, default=3, help="at most this many reruns per run (default 3)"
    )
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--max-fds", type=int, help=argparse.SUPPRESS)  # with --serve
    # With --serve: each callback's own work, in µs (suite.py --callback-us).
    parser.add_argument("--callback-us", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.callback_us and not args.serve:
        parser.error("--callback-us goes with --serve (suite.py --callback-us runs the load)")
    if args.serve:
        serve(args.serve, args.framing, args.max_fds, args.callback_us)
        return 0

    sources: dict[str, str] = {}
    for entry in args.rsepoll_from:
        name, _, path = entry.rpartition("=")
        if not Path(path).is_dir():
            parser.error(f"--rsepoll-from {entry}: {path} is not a directory")
        sources[name] = str(Path(path).resolve())
    specs = [k.strip() for k in args.servers.split(",") if k.strip()]
    if len(set(specs)) != len(specs):
        parser.error("--servers names a contender twice")
    try:
        contenders = [parse_contender(spec, args.framing, sources) for spec in specs]
    except ValueError as exc:
        parser.error(str(exc))
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 usable CPUs")
    if args.connections < 1 or args.size < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--connections and --size must be positive, --duration > 0, --warmup >= 0")
    vers = versions(sources)
    notes = []
    if vers["uvloop"] == "not installed" and any(c.kind == "uvloop" for c in contenders):
        contenders = [c for c in contenders if c.kind != "uvloop"]
        notes.append("uvloop is not installed: skipped (pip install uvloop)")
    for c in list(contenders):
        key = f"rsepoll@{c.source}" if c.source else "rsepoll"
        if c.kind.startswith("rsepoll") and vers[key].startswith("not installed"):
            contenders.remove(c)
            notes.append(f"{c.label}: no importable rsepoll ({key}): skipped")
    ensure_loadgen()
    load = background_load()
    if load > 0.05:
        notes.append(
            f"the machine was already {load:.0%} busy before the benchmark started: "
            "expect noisy results (see the 'other' column)"
        )
    print_environment(args, vers)
    for note in notes:
        print(f"note: {note}")

    all_runs: dict[str, list[Result]] = {c.label: [] for c in contenders}
    for round_ in range(args.rounds):
        for who in contenders:
            if args.rounds > 1:
                print(f"round {round_ + 1}/{args.rounds}: {who.label} ...", flush=True)
            else:
                print(f"{who.label} ...", flush=True)
            all_runs[who.label].append(run_clean(who, args))
    print()
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds (by req/s) per server:")
    print_table({k: median_result(v) for k, v in all_runs.items()}, args.size)
    print_details(all_runs)
    if args.rounds > 1:
        bases = [b.strip() for b in args.ratios_against.split(",") if b.strip()]
        print_paired_ratios(all_runs, bases)
        for kind, runs in all_runs.items():
            rates = [r.rps for r in runs if r.ok]
            if len(rates) > 1:
                mid = statistics.median(rates)
                print(
                    f"  {kind}: req/s over rounds: "
                    + ", ".join(f"{x:,.0f}" for x in rates)
                    + f" (median {mid:,.0f}, min {min(rates):,.0f}, max {max(rates):,.0f}, "
                    f"spread {(max(rates) - min(rates)) / mid:.1%} of the median, "
                    f"stdev {statistics.stdev(rates):,.0f})"
                )
        for kind, runs in all_runs.items():
            cpus = [r.cpu_us_per_request() for r in runs if r.ok]
            if len(cpus) > 1:
                print(
                    f"  {kind}: server CPU-µs/req over rounds: "
                    + ", ".join(f"{x:.2f}" for x in cpus)
                    + f" (median {statistics.median(cpus):.2f})"
                )
    bad = any(not r.ok or r.errors or r.stalled for runs in all_runs.values() for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
