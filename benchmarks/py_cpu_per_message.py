"""Python-thread CPU time per message for an rsepoll echo server.

Usage::

    python benchmarks/py_cpu_per_message.py [--messages 300000] [--connections 100]
        [--size 1024] [--backends epoll,portable] [--rounds 3]

An echo server runs in this process; the load generator of ``echo.py``
(``loadgen/``) drives it. Inside ``on_message_received`` the server counts
messages; when the count reaches the end of the warmup, and again
``--messages`` later, it reads ``time.thread_time()`` (the CPU time of the
thread that called ``listen()``, which runs every callback) and the CPU clock
of the ``rsepoll-io`` thread. The difference over the count is the CPU per
message on each thread. Each backend is measured ``--rounds`` times (the
rounds alternate backends) and the median is reported: the number moves with
how well deliveries batch up, which varies from run to run.

What the Python thread's number includes: rsepoll taking deliveries off its
ring, building the ``bytes`` and calling the callback, the callback itself (one
``send_message`` and a counter increment: the leanest echo server there is),
and queueing the reply. The project's target is at most 2 µs per message.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import rsepoll
from echo import LOADGEN, ensure_loadgen

TARGET_US = 2.0


def thread_cpu_clock(tid: int) -> int:
    """The CPU-time clock id of thread ``tid`` of this process (Linux's
    MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED))."""
    return ((~tid) << 3) | 6


def find_thread(name: str) -> int | None:
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return int(tid)
        except FileNotFoundError:
            continue
    return None


@dataclass
class Mark:
    wall: float
    py_cpu: float
    io_cpu: float
    process_cpu: float
    count: int
    received: int


class CountingEcho(rsepoll.Server):
    """Echoes; marks the CPU clocks at two message counts."""

    def __init__(self, warmup: int, messages: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.count = 0
        self.received = 0
        self.next_mark = warmup
        self.end_mark = warmup + messages
        self.marks: list[Mark] = []
        self.ready = threading.Event()
        self.done = threading.Event()
        self.io_clock: int | None = None
        self.errors: list[str] = []

    def on_listen_success(self) -> None:
        self.ready.set()

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.send_message(conn, data)
        self.count += 1
        self.received += len(data)
        if self.count == self.next_mark:
            self.mark()

    def mark(self) -> None:
        if not self.marks:
            # Looked up only now: the I/O thread names itself once it runs.
            tid = find_thread("rsepoll-io")
            self.io_clock = thread_cpu_clock(tid) if tid is not None else None
            if tid is None:
                self.errors.append("no rsepoll-io thread found: I/O thread CPU not measured")
        self.marks.append(
            Mark(
                wall=time.perf_counter(),
                py_cpu=time.thread_time(),
                io_cpu=time.clock_gettime(self.io_clock) if self.io_clock is not None else 0.0,
                process_cpu=time.process_time(),
                count=self.count,
                received=self.received,
            )
        )
        if len(self.marks) == 1:
            self.next_mark = self.end_mark
        else:
            self.next_mark = -1
            self.done.set()

    def on_exception_occurred(self, exc: BaseException) -> None:
        self.errors.append(repr(exc))


def run(backend: str, args: argparse.Namespace) -> CountingEcho:
    server = CountingEcho(args.warmup_messages, args.messages, backend=backend)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    port = listener.port
    server.register_listener_socket(listener)
    listener.close()

    def drive() -> None:
        client = None
        try:
            if not server.ready.wait(10):
                server.errors.append("the server did not start listening")
                return
            client = subprocess.Popen(
                [
                    str(LOADGEN),
                    *("--port", str(port)),
                    *("--connections", str(args.connections)),
                    *("--size", str(args.size)),
                    *("--warmup", "0"),
                    *("--duration", str(args.timeout)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if not server.done.wait(args.timeout):
                server.errors.append(f"{args.messages} messages did not arrive in {args.timeout} s")
        finally:
            if client is not None:
                client.kill()
                client.wait()
            server.stop_server()

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        server.listen()
    finally:
        server.done.set()  # on Ctrl-C too: the driver then kills the load generator
        driver.join(15)
    return server


@dataclass
class Measurement:
    messages: int
    rate: float
    bytes_per_message: float
    py_us: float
    io_us: float
    process_us: float
    py_busy: float


def measurement(server: CountingEcho) -> Measurement | None:
    if len(server.marks) < 2:
        return None
    a, b = server.marks
    n = b.count - a.count
    wall = b.wall - a.wall
    return Measurement(
        messages=n,
        rate=n / wall,
        bytes_per_message=(b.received - a.received) / n,
        py_us=(b.py_cpu - a.py_cpu) * 1e6 / n,
        io_us=(b.io_cpu - a.io_cpu) * 1e6 / n,
        process_us=(b.process_cpu - a.process_cpu) * 1e6 / n,
        py_busy=(b.py_cpu - a.py_cpu) / wall,
    )


def report(backend: str, results: list[Measurement]) -> None:
    print(f"backend {backend}:")
    for i, m in enumerate(results, 1):
        print(
            f"  round {i}: {m.messages:,} messages at {m.rate:,.0f}/s, "
            f"{m.bytes_per_message:,.0f} bytes each; CPU per message: "
            f"Python thread {m.py_us:.3f} µs, I/O thread {m.io_us:.3f} µs, "
            f"process {m.process_us:.3f} µs; Python thread {m.py_busy:.0%} busy"
        )
    if not results:
        print("  no measurement")
        return
    py = statistics.median(m.py_us for m in results)
    io = statistics.median(m.io_us for m in results)
    verdict = "meets" if py <= TARGET_US else "misses"
    print(
        f"  median: Python thread {py:.3f} µs/message ({verdict} the {TARGET_US:g} µs target), "
        f"I/O thread {io:.3f} µs/message"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300_000, help="messages measured")
    parser.add_argument("--warmup-messages", type=int, default=30_000)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--backends", default="epoll,portable")
    parser.add_argument("--rounds", type=int, default=3, help="measure each backend this often")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="give up after this many seconds"
    )
    args = parser.parse_args()
    if args.messages < 1 or args.warmup_messages < 1 or args.rounds < 1:
        parser.error("--messages, --warmup-messages and --rounds must be positive")
    ensure_loadgen()
    print(
        f"rsepoll {rsepoll.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (load generator on the same CPUs); "
        f"{args.connections} connections x {args.size}-byte echoes, "
        f"{args.messages:,} messages measured after {args.warmup_messages:,}"
    )
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: dict[str, list[Measurement]] = {b: [] for b in backends}
    ok = True
    for _ in range(args.rounds):
        for backend in backends:
            server = run(backend, args)
            for error in server.errors:
                print(f"! {backend}: {error}")
            m = measurement(server)
            ok = ok and m is not None and not server.errors
            if m is not None:
                results[backend].append(m)
    for backend in backends:
        report(backend, results[backend])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
