#!/usr/bin/env python3
"""A randomized run of an rsepoll server that accounts for every byte.

    python tests/chaos.py --seconds S --seed N [--backend auto|epoll|portable]
        [--io-threads N] [--framing raw|line|length] [--json]

Single-purpose tests each check one promise in one situation. The stop and
pause defects found in review (issue 13) each needed a mix: framing, a busy
client and a stop; a pause and a stop; a pause and a reset. This harness
mixes all of those events at once, at random, and then checks a ledger of
every byte and every ending against what docs/api.md promises.

**The run.** Hundreds of client connections are opened over the first half
of the run from a few client threads, each driving its share with its own
selector. Every client follows a plan drawn from ``random.Random`` seeded
with the run's seed and its own index, so one seed gives the same clients
(same messages, same chunking, same pauses, same endings) on every run; only
the timing of the server's side differs. A client sends messages of sizes
drawn log-uniformly from 1 byte to 1 MiB (capped by ``max_message_size`` in
the framed modes) within a byte budget of its own, cuts them into writes of
random sizes (whole, random, or a trickle), pipelines them up to a depth,
reads its replies normally, slowly or not at all for a while, and ends by
holding the connection, half-closing and reading on, closing, or resetting
(``SO_LINGER`` 0) at a random moment, possibly mid-message. Some clients
connect and stay idle; in the framed modes some send an oversized line or a
length prefix beyond the limit after a few good messages.

The server is a recording ``rsepoll.Server`` subclass. It answers each
message, from the callback or from a worker pool, pauses and resumes
reading at random (sometimes never resuming), closes connections gracefully
or with a reset, tries sends after its own closes and after
``on_connection_closed``, and is stopped with ``stop_server`` at a random
moment with a random timeout, from a thread of its own, from a callback or
from a worker. In the signal variant (chosen by the seed, or ``--variant
signal``) the server runs in a child process that is sent SIGINT or SIGTERM
instead (SIGTERM calls ``stop_server``, as the CLI does; SIGINT is Ctrl-C).
After the stop, a probe keeps connecting until the listener refuses: that
moment proves the accepting I/O thread had begun to stop.

**Messages that show their own damage.** Every message, in every framing,
is a record: a 33-byte ASCII header (kind, client index, sequence number,
body length, CRC-32 of the header fields and body) and a body. In raw mode
the server reassembles the records from the byte stream itself. A record
that arrives out of sequence, for the wrong connection, or with a bad
checksum is counted; the replies carry the request's sequence number and
either echo its body or carry none, so the client checks each reply
against the CRC of what it sent.

**The ledger.** For every connection the run keeps: what the client sent
(records, bytes, and when each write started), the records the callbacks
got in order, the bytes the server's counters say it read (``stats()``,
summed over connections: the counters are per server), the replies the
application queued (``send_message`` returned True) in the order it queued
them, the replies the client received, and how each side saw the end (EOF,
reset, ``close_reason``). The checks below name the docs/api.md sentence each
one rests on; a check applies only where that sentence makes a promise.

Three checks are about liveness, and carry a stated margin rather than an
exact rule: a connection settled when the stop began may be reset only if
the callbacks were still busy with input sent before the stop within
``SETTLED_GRACE`` of a deadline at least ``SETTLED_STOP`` away; a client's
reset must reach ``on_connection_closed`` before a stop that comes
``RESET_NOTICE`` later; and the watchdog. Input delivered after the stop
began is checked only with one I/O thread: a refused probe proves that the
accepting thread began its stop, and says nothing of the others.

``--json`` prints one object: ``seed``, ``seconds``, ``connections``,
``messages_in``, ``messages_out``, ``bytes_in``, ``bytes_out``, ``lost``,
``reordered``, ``corrupted``, ``unaccounted``, ``leaked_fds``, ``other``
(every other kind of violation) and ``violations`` (the first ten,
described), with the run's parameters. The exit status is 0 only when every
count of a violation is 0, else 1; 2 for a bad argument or a harness
failure. Everything runs on 127.0.0.1, is bounded in count and time, and a
watchdog ends a run whose server hangs (exit status 3, with the report).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import heapq
import json
import math
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import rsepoll

HOST = "127.0.0.1"
HEADER = 33
LINE_SAFE = bytes.maketrans(b"\n\r", b"NR")
#: Client threads, each with its own selector.
CLIENT_THREADS = 4
#: Worker threads that send replies for the server.
WORKERS = 4
#: A stop timeout at least this long leaves ample time to close a connection
#: that has nothing left to send (the check for settled connections, below,
#: applies only then; a shorter stop may legitimately reset them at its
#: deadline).
SETTLED_STOP = 2.0
#: And this long, after the callbacks for the input read before the stop
#: have all returned, to answer the stop and close such a connection.
SETTLED_GRACE = 1.0
#: How long a client's reset may go unreported before a stop for the report
#: to count as missing (a liveness margin, see the reset check).
RESET_NOTICE = 3.0
#: Once the server has returned, how long the clients may take to read their
#: last bytes before they are cut.
DRAIN_LIMIT = 15.0
#: Extra time, beyond the run and its stop timeout, before the watchdog fires.
WATCHDOG_SLACK = 45.0


def now() -> float:
    return time.monotonic()


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def make_record(kind: bytes, client: int, seq: int, body: bytes) -> bytes:
    fields = b"%s%08x%08x%08x" % (kind, client, seq, len(body))
    return fields + b"%08x" % zlib.crc32(body, zlib.crc32(fields)) + body


def body_length(head: bytes) -> int | None:
    """The body length a record header announces, or None if it is not one."""
    try:
        return int(head[17:25], 16)
    except ValueError:
        return None


def parse_record(record: bytes) -> tuple[bytes, int, int, bytes] | str:
    """(kind, client, seq, body), or a description of what is wrong."""
    if len(record) < HEADER:
        return f"record of {len(record)} bytes, shorter than a header"
    head = record[:HEADER]
    try:
        client = int(head[1:9], 16)
        seq = int(head[9:17], 16)
        length = int(head[17:25], 16)
        crc = int(head[25:33], 16)
    except ValueError:
        return f"header is not a record header: {head[:40]!r}"
    body = record[HEADER:]
    if len(body) != length:
        return f"body of {len(body)} bytes where the header says {length}"
    if zlib.crc32(body, zlib.crc32(head[:25])) != crc:
        return f"checksum mismatch in record {seq} of client {client}"
    return head[:1], client, seq, body


def frame(framing: str, prefix: int, payload: bytes) -> bytes:
    if framing == "line":
        return payload + b"\n"
    if framing == "length":
        return len(payload).to_bytes(prefix, "big") + payload
    return payload


def frame_overhead(framing: str, prefix: int) -> int:
    return {"line": 1, "length": prefix}.get(framing, 0)


# ---------------------------------------------------------------------------
# The run's parameters, all drawn from the seed
# ---------------------------------------------------------------------------


class RunPlan:
    """What the seed decides for the server and the stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = random.Random(f"{args.seed}/run")
        self.seed = args.seed
        self.seconds = args.seconds
        # Every draw is made whatever the options, so that options change
        # only what they name.
        self.framing = rng.choice(["raw", "line", "length"])
        if args.framing:
            self.framing = args.framing
        self.length_prefix = rng.choice([4, 8])
        self.max_message_size = rng.choice([64 << 10, 256 << 10, 1 << 20])
        self.connections = args.connections
        variant = "signal" if rng.random() < 0.25 and sys.platform != "win32" else "thread"
        if args.variant != "auto":
            variant = args.variant
        self.variant = variant
        self.signal = rng.choice(["SIGINT", "SIGTERM"])
        self.stop_at = rng.uniform(0.45, 0.95) * self.seconds
        if rng.random() < 0.5:
            self.stop_timeout = rng.uniform(SETTLED_STOP, 4.0)
        else:
            self.stop_timeout = log_uniform(rng, 0.01, SETTLED_STOP)
        self.stop_from = rng.choice(["thread", "callback", "worker"])
        if self.variant == "signal" and self.signal == "SIGINT":
            # Ctrl-C stops as stop_server() does, with its default timeout.
            self.stop_timeout = 5.0
        self.ring_slots = rng.choice([64, 512])
        self.write_buffer_high = rng.choice([64 << 10, 1 << 20])
        self.backend = args.backend
        pool = random.Random(f"{args.seed}/pool").randbytes(3 << 20)
        self.pool = pool.translate(LINE_SAFE) if self.framing == "line" else pool
        self.io_threads = args.io_threads

    def server_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_fds": 4096,
            "framing": self.framing,
            "max_message_size": self.max_message_size,
            "length_prefix": self.length_prefix,
            "ring_slots": self.ring_slots,
            "write_buffer_high": self.write_buffer_high,
            "write_buffer_low": self.write_buffer_high // 4,
        }
        if self.backend != "auto":
            kwargs["backend"] = self.backend
        if self.io_threads is not None:
            kwargs["io_threads"] = self.io_threads
        return kwargs

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "pool"}


# ---------------------------------------------------------------------------
# The server: records every callback, answers, and misbehaves at random
# ---------------------------------------------------------------------------


class ConnRecord:
    """The server's side of one connection's ledger."""

    def __init__(self, conn_id: int, port: int, t_open: float) -> None:
        self.id = conn_id
        self.port = port
        self.t_open = t_open
        self.client: int | None = None
        self.rng: random.Random | None = None
        self.next_seq = 0
        self.msgs = 0  # records delivered intact and in order
        self.calls = 0  # on_message_received calls
        self.wire = 0  # bytes delivered, framing included
        self.buf = bytearray()  # raw mode: bytes of a record not yet whole
        self.log: list[tuple[float, int]] = []  # (callback returned, bytes delivered before it)
        self.last_seq_delivered = -1
        self.eof_at: float | None = None
        self.msgs_at_eof = 0
        self.wire_at_eof = 0
        self.too_large_at: float | None = None
        self.msgs_at_too_large = 0
        self.app_close: float | None = None
        self.app_abort: float | None = None
        self.paused = False
        self.paused_at_close = False
        self.ever_paused = False
        self.closed_at: float | None = None
        self.reason: str | None = None
        self.replies: list[tuple[int, int, bool, float]] = []  # seq, body length, worker, t
        self.workers_pending = 0
        self.pause_at = self.close_at = -1
        self.resume_after: float | None = None
        self.abort = False
        self.slow = 0.0
        self.close_when_done = False
        self.lock = threading.Lock()

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("lock", "rng", "buf")}


class Scheduler:
    """One thread that runs small delayed actions (resumes, late sends)."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Any]] = []
        self.cond = threading.Condition()
        self.count = 0
        self.closed = False
        self.thread = threading.Thread(target=self.run, name="chaos-scheduler", daemon=True)
        self.thread.start()

    def at(self, when: float, fn: Any) -> None:
        with self.cond:
            if self.closed:
                return
            self.count += 1
            heapq.heappush(self.heap, (when, self.count, fn))
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and (not self.heap or self.heap[0][0] > now()):
                    wait = self.heap[0][0] - now() if self.heap else None
                    self.cond.wait(wait)
                if self.closed:
                    return
                _, _, fn = heapq.heappop(self.heap)
            fn()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(10)


def guarded(callback: Any) -> Any:
    """Runs a callback with Ctrl-C held off until its bookkeeping is done.

    Python raises KeyboardInterrupt between any two bytecodes of the main
    thread, so a Ctrl-C could cut a callback between what it did and what it
    wrote down. In the signal variant the SIGINT handler (``CtrlC``) defers
    the interrupt while a callback runs; the callback raises it as it
    returns, and rsepoll treats a KeyboardInterrupt from a callback as
    Ctrl-C (docs/api.md, listen). Outside callbacks it is raised at once.
    """

    def wrapper(self: ChaosServer, *args: Any) -> None:
        try:
            callback(self, *args)
        finally:
            if self.ctrl_c is not None:
                self.ctrl_c.leaving_callback()

    wrapper.__name__ = callback.__name__
    return wrapper


class CtrlC:
    """SIGINT for the signal variant: KeyboardInterrupt, but never inside a
    callback's bookkeeping (see ``guarded``). A deferred interrupt is raised
    as the callback returns; if the signal landed after that point, it is
    raised again 20 ms later through ``_thread.interrupt_main``."""

    def __init__(self) -> None:
        self.state = "none"  # none, pending, raised
        self.lock = threading.Lock()
        self.wrapper_code = guarded(lambda self: None).__code__

    def handler(self, signum: int, frame: Any) -> None:
        with self.lock:
            if self.state == "raised":
                return
            inside = frame
            while inside is not None and inside.f_code is not self.wrapper_code:
                inside = inside.f_back
            if inside is None:
                self.state = "raised"
            else:
                self.state = "pending"
                threading.Thread(target=self.recheck, daemon=True).start()
                return
        raise KeyboardInterrupt

    def leaving_callback(self) -> None:
        with self.lock:
            if self.state != "pending":
                return
            self.state = "raised"
        raise KeyboardInterrupt

    def recheck(self) -> None:
        import _thread

        time.sleep(0.02)
        with self.lock:
            if self.state == "pending":
                _thread.interrupt_main()


class ChaosServer(rsepoll.Server):
    def __init__(self, plan: RunPlan, violations: Violations) -> None:
        super().__init__(**plan.server_kwargs())
        self.plan = plan
        self.v = violations
        self.records: list[ConnRecord] = []
        self.by_id: dict[int, ConnRecord] = {}
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="chaos-worker")
        self.sched = Scheduler()
        self.overhead = frame_overhead(plan.framing, plan.length_prefix)
        self.t_stop_call: float | None = None
        self.t_stop_return: float | None = None
        self.stop_armed_at: float | None = None  # callback stop: due time
        self.t_listen: float | None = None
        self.ready = threading.Event()
        self.exceptions: list[str] = []
        self.ki = False
        self.stop_lock = threading.Lock()
        self.ctrl_c: CtrlC | None = None

    # -- stopping --

    def do_stop(self) -> None:
        with self.stop_lock:
            if self.t_stop_call is not None:
                return
            self.t_stop_call = now()
        self.stop_server(self.plan.stop_timeout)
        self.t_stop_return = now()

    # -- callbacks --

    def on_listen_success(self) -> None:
        self.t_listen = now()
        self.ready.set()

    def _live(self, conn: rsepoll.Connection, what: str) -> ConnRecord | None:
        rec = getattr(conn, "chaos", None)
        if rec is None:
            self.v.add("other", f"{what} for a connection never opened (id {conn.id})")
            return None
        if rec.closed_at is not None:
            # docs/api.md, Callbacks: on_connection_closed runs exactly once per
            # opened connection, and it is the connection's last callback.
            self.v.add("other", f"{what} after on_connection_closed on connection {rec.id}")
        return rec

    @guarded
    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        if hasattr(conn, "chaos"):
            self.v.add("other", f"on_connection_opened twice for connection {conn.id}")
            return
        addr = conn.remote_address
        rec = ConnRecord(conn.id, addr[1] if addr else -1, now())
        conn.chaos = rec
        self.records.append(rec)
        if conn.id in self.by_id:
            # docs/api.md, Connection: id is unique for the server's life.
            self.v.add("other", f"connection id {conn.id} given twice")
        self.by_id[conn.id] = rec

    @guarded
    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        rec = self._live(conn, "on_message_received")
        if rec is None:
            return
        rec.calls += 1
        wire_before = rec.wire
        rec.wire += len(data) + self.overhead
        if self.plan.framing == "raw":
            rec.buf += data
            while len(rec.buf) >= HEADER:
                length = body_length(bytes(rec.buf[:HEADER]))
                if length is None:
                    self._bad(rec, "corrupted", parse_record(bytes(rec.buf[:HEADER])))
                    rec.buf.clear()
                    break
                if len(rec.buf) < HEADER + length:
                    break
                record = bytes(rec.buf[: HEADER + length])
                del rec.buf[: HEADER + length]
                self._record(conn, rec, record)
        else:
            self._record(conn, rec, data)
        if (
            self.stop_armed_at is not None
            and self.t_stop_call is None
            and now() >= self.stop_armed_at
        ):
            self.do_stop()
        rec.log.append((now(), wire_before))

    def _bad(self, rec: ConnRecord, kind: str, detail: Any) -> None:
        self.v.add(kind, f"connection {rec.id} (client {rec.client}): {detail}")

    def _record(self, conn: rsepoll.Connection, rec: ConnRecord, record: bytes) -> None:
        # docs/api.md, Messages: each on_message_received gets exactly one whole
        # message, once, in order (framed); bytes always arrive in order (raw).
        parsed = parse_record(record)
        if isinstance(parsed, str):
            return self._bad(rec, "corrupted", parsed)
        kind, client, seq, body = parsed
        if kind == b"X":
            # docs/api.md, Messages: a client that sends a message larger than
            # max_message_size is disconnected; the message is not delivered.
            return self._bad(rec, "other", f"oversized record {seq} was delivered")
        if kind != b"M":
            return self._bad(rec, "corrupted", f"record of kind {kind!r}")
        if rec.client is None:
            rec.client = client
            rec.rng = rng = random.Random(f"{self.plan.seed}/server/{client}")
            # What the application will do to this connection, and when.
            rec.pause_at = int(log_uniform(rng, 1, 500)) if rng.random() < 0.25 else -1
            rec.resume_after = rng.uniform(0.01, 0.6) if rng.random() < 0.75 else None
            roll = rng.random()
            rec.close_at = int(log_uniform(rng, 1, 500)) if roll < 0.08 else -1
            rec.abort = roll < 0.03
            rec.slow = rng.uniform(0.0001, 0.0003) if rng.random() < 0.1 else 0.0
        elif client != rec.client:
            return self._bad(rec, "corrupted", f"record of client {client} on this connection")
        if seq != rec.next_seq:
            what = "lost" if seq > rec.next_seq else "reordered"
            self._bad(rec, what, f"record {seq} delivered where {rec.next_seq} was due")
        rec.next_seq = seq + 1
        rec.msgs += 1
        rec.last_seq_delivered = seq
        if rec.slow:
            until = now() + rec.slow  # a slow callback, busy as real work is
            while now() < until:
                pass
        self._respond(conn, rec, seq, body)

    def _respond(self, conn: rsepoll.Connection, rec: ConnRecord, seq: int, body: bytes) -> None:
        rng = rec.rng
        assert rng is not None
        reply = make_record(b"R", rec.client or 0, seq, body if rng.random() < 0.8 else b"")
        if rng.random() < 0.3:
            rec.workers_pending += 1
            delay = rng.random() * 0.005 if rng.random() < 0.03 else 0.0
            self.pool.submit(self._worker_reply, conn, rec, seq, reply, delay)
        else:
            self._send(conn, rec, seq, reply, False)
        if rec.msgs == rec.pause_at and not rec.paused:
            rec.paused = rec.ever_paused = True
            self.pause_reading(conn)
            if rec.resume_after is not None:
                self.sched.at(now() + rec.resume_after, lambda: self._resume(conn, rec))
        if rec.msgs == rec.close_at:
            self._app_close(conn, rec, abort=rec.abort)

    def _send(
        self, conn: rsepoll.Connection, rec: ConnRecord, seq: int, reply: bytes, worker: bool
    ) -> bool:
        with rec.lock:
            ok = self.send_message(conn, reply)
            if ok:
                rec.replies.append((seq, len(reply) - HEADER, worker, now()))
                if rec.app_close is not None or rec.app_abort is not None:
                    # docs/api.md, send_message: returns False, sending nothing,
                    # once close_connection(conn) has been called.
                    self._bad(rec, "other", "send_message returned True after close_connection")
        return ok

    def _worker_reply(
        self, conn: rsepoll.Connection, rec: ConnRecord, seq: int, reply: bytes, delay: float
    ) -> None:
        if delay:
            time.sleep(delay)
        self._send(conn, rec, seq, reply, True)
        with rec.lock:
            rec.workers_pending -= 1
            close = rec.workers_pending == 0 and rec.close_when_done
        if close:
            self._app_close(conn, rec, abort=False)

    def _resume(self, conn: rsepoll.Connection, rec: ConnRecord) -> None:
        rec.paused = False
        self.resume_reading(conn)

    def _app_close(self, conn: rsepoll.Connection, rec: ConnRecord, abort: bool) -> None:
        with rec.lock:
            t = now()
            if abort:
                rec.app_abort = rec.app_abort or t
            else:
                rec.app_close = rec.app_close or t
            self.close_connection(conn, abort=abort)
        # Sends after our own close must be refused.
        self._send(conn, rec, 0xFFFFFFF, make_record(b"R", 0, 0xFFFFFFF, b"late"), False)

    @guarded
    def on_eof_received(self, conn: rsepoll.Connection) -> None:
        rec = self._live(conn, "on_eof_received")
        if rec is None:
            return
        rec.eof_at = now()
        rec.msgs_at_eof = rec.msgs
        rec.wire_at_eof = rec.wire
        # docs/api.md, Messages: with replies from worker threads, override it and
        # close the connection when the last reply is sent.
        with rec.lock:
            if rec.workers_pending:
                rec.close_when_done = True
                return
        self._app_close(conn, rec, abort=False)

    @guarded
    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        rec = getattr(conn, "chaos", None)
        if rec is None:
            self.v.add("other", f"on_connection_closed for a connection never opened ({conn.id})")
            return
        if rec.closed_at is not None:
            self._bad(rec, "other", "on_connection_closed twice")
            return
        rec.closed_at = now()
        rec.reason = conn.close_reason
        rec.paused_at_close = rec.paused
        if conn.is_open:
            self._bad(rec, "other", "is_open is True in on_connection_closed")
        if rec.rng is not None and rec.rng.random() < 0.2:
            # docs/api.md, send_message: False once conn has closed.
            def late() -> None:
                if self.send_message(conn, b"after closed"):
                    self._bad(rec, "other", "send_message returned True after on_connection_closed")

            self.pool.submit(late)

    @guarded
    def on_exception_occurred(self, exc: BaseException) -> None:
        if isinstance(exc, rsepoll.MessageTooLarge):
            rec = getattr(exc.conn, "chaos", None)
            if rec is not None:
                rec.too_large_at = now()
                rec.msgs_at_too_large = rec.msgs
            return
        self.exceptions.append(repr(exc))
        self.v.add("other", f"on_exception_occurred: {exc!r}")

    def ledger(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "conns": [r.as_dict() for r in self.records],
            "stats": stats,
            "t_stop_call": self.t_stop_call,
            "t_stop_return": self.t_stop_return,
            "io_threads": self.io_threads,
            "backend": self.backend,
            "exceptions": self.exceptions,
            "ki": self.ki,
        }


class Violations:
    KINDS = ("lost", "reordered", "corrupted", "unaccounted", "leaked_fds", "other")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.first: list[str] = []
        self.lock = threading.Lock()

    def add(self, kind: str, text: str, count: int = 1) -> None:
        with self.lock:
            self.counts[kind] += count
            if len(self.first) < 10:
                self.first.append(f"{kind}: {text}")

    def total(self) -> int:
        return sum(self.counts.values())


def resources() -> tuple[set[str], int]:
    """Open fds (with what they point at) and native threads of this process."""
    if not os.path.isdir("/proc/self/fd"):
        return set(), 0
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not target.startswith("/proc/"):  # the listing's own fd
                fds.add(f"{fd}->{target}")
    return fds, len(os.listdir("/proc/self/task"))


def check_server_end(server: ChaosServer, v: Violations) -> None:
    """What must hold the moment listen() has returned."""
    stats = server.stats()
    # docs/api.md, stop_server: every connection gets on_connection_closed.
    for rec in server.records:
        if rec.closed_at is None:
            v.add("other", f"connection {rec.id} never got on_connection_closed")
    if stats["connections_open"] != 0:
        v.add("other", f"stats()['connections_open'] is {stats['connections_open']} after listen()")
    if stats["connections_accepted"] != len(server.records):
        v.add(
            "other",
            f"stats() counts {stats['connections_accepted']} accepted connections, "
            f"on_connection_opened ran {len(server.records)} times",
        )


# ---------------------------------------------------------------------------
# The clients
# ---------------------------------------------------------------------------


class Client:
    """One client connection following the plan its seed draws."""

    def __init__(self, idx: int, plan: RunPlan, t0: float) -> None:
        self.idx = idx
        self.plan = plan
        framing = plan.framing
        rng = random.Random(f"{plan.seed}/client/{idx}")
        self.rng = rng
        self.start_at = t0 + rng.uniform(0, 0.8) * plan.seconds
        roll = rng.random()
        if roll < 0.1:
            self.kind = "idle"
        elif roll < 0.17 and framing != "raw":
            self.kind = "oversize"
        elif roll < 0.25:
            self.kind = "burst"  # many small messages pipelined in few writes
        elif roll < 0.4:
            self.kind = "stream"  # paced messages until the run ends
        else:
            self.kind = "exchange"
        # Sizes: a byte budget per connection, then message bodies within it.
        budget = int(log_uniform(rng, 64, 1 << 20))
        if rng.random() < 0.02:
            budget = rng.randrange(2 << 20, 4 << 20)
        cap = (1 << 20) if framing == "raw" else plan.max_message_size - HEADER
        self.sizes: list[int] = []
        while self.kind != "idle" and budget > 0 and len(self.sizes) < 400:
            size = min(int(log_uniform(rng, 1, 1 << 20)), cap)
            self.sizes.append(size)
            budget -= size + HEADER
        if self.kind == "oversize":
            self.sizes = self.sizes[: rng.randrange(0, 4)]
        self.gap = 0.0
        self.burst = 0
        if self.kind == "burst":
            self.burst = rng.randrange(50, 1000)
            self.gap = rng.uniform(0.1, 0.6)
            count = self.burst * (int(plan.seconds / self.gap) + 1)
            self.sizes = [int(log_uniform(rng, 1, 256)) for _ in range(min(count, 3000))]
        elif self.kind == "stream":
            self.gap = rng.uniform(0.002, 0.03)
            count = int(plan.seconds / self.gap) + 1
            self.sizes = [min(int(log_uniform(rng, 1, 16 << 10)), cap) for _ in range(count)]
        self.chunking = rng.choice(["whole", "random", "random", "trickle"])
        if self.chunking == "trickle" and sum(self.sizes) > 64 << 10:
            self.chunking = "random"
        self.depth = rng.choice([1, 2, 4, 16, 1 << 30])
        if self.kind == "burst":
            self.chunking = rng.choice(["whole", "random"])
            self.depth = 1 << 30
        self.read_mode = rng.choice(["normal", "normal", "slow", "stopped"])
        self.stop_windows: list[tuple[float, float]] = []
        if self.read_mode == "stopped":
            for _ in range(rng.randrange(1, 3)):
                start = rng.uniform(0, plan.seconds)
                self.stop_windows.append((start, start + rng.uniform(0.2, 2.5)))
        self.ending = rng.choice(["hold", "hold", "halfclose", "close", "reset"])
        if self.kind == "oversize":
            self.ending = "hold"
        self.reset_at = (
            self.start_at + rng.uniform(0.0, plan.seconds) if self.ending == "reset" else None
        )
        # Drawn now so that the plan does not depend on timing.
        self.oversize_seed = rng.random()
        # Runtime state.
        self.sock: socket.socket | None = None
        self.port = -1
        self.state = "waiting"  # waiting, connecting, open, done
        self.t_connect: float | None = None
        self.records: list[list[Any]] = []
        # [wire_start, wire_end, body_len, body_crc, t_first_start, t_last_start]
        self.n_planned = len(self.sizes)
        self.out = b""
        self.out_pos = 0
        self.chunks: list[tuple[int, float]] = []
        self.unstamped = 0  # the first record whose last byte is not yet sent
        self.next_send_at = 0.0
        self.sent = 0
        self.writes: list[tuple[int, float]] = []  # (offset after, t start)
        self.oversize_start: int | None = None
        self.oversize_sent_at: float | None = None
        self.all_sent_at: float | None = None
        self.fin_at: float | None = None
        self.closed_at: float | None = None
        self.self_reset_at: float | None = None
        self.send_failed: str | None = None
        self.reset_seen_on_send = False
        self.inbox = bytearray()
        self.replies: list[tuple[int, int, bool, float]] = []  # seq, body length, ok, t
        self.recv_bytes = 0
        self.bad_replies: list[str] = []
        self.end: str | None = None
        self.end_at: float | None = None
        self.next_read_at = 0.0
        self.registered = 0

    # -- helpers --

    def body(self, seq: int) -> bytes:
        """Message ``seq``'s body: a slice of the run's random pool, at an
        offset that differs between messages and clients."""
        pool = self.plan.pool
        size = self.sizes[seq]
        offset = (self.idx * 7919 + seq * 104729) % (len(pool) - size + 1)
        return pool[offset : offset + size]

    def chunk_plan(self, seq: int, total: int) -> list[tuple[int, float]]:
        rng = random.Random(f"{self.plan.seed}/{self.idx}/{seq}/chunks")
        if self.chunking == "whole":
            return [(total, 0.0)]
        chunks = []
        left = total
        while left > 0:
            if self.chunking == "trickle":
                size, delay = int(log_uniform(rng, 1, 64)), rng.uniform(0.001, 0.02)
            else:
                size = int(log_uniform(rng, 1, 256 << 10))
                delay = rng.uniform(0, 0.03) if rng.random() < 0.2 else 0.0
            size = min(size, left)
            chunks.append((size, delay))
            left -= size
        return chunks

    def reading_stopped(self, t: float, draining: bool) -> bool:
        if draining:
            return False
        rel = t - self.start_at
        return any(a <= rel < b for a, b in self.stop_windows)

    # -- the state machine, driven by ClientThread --

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        self.sock = sock
        self.t_connect = now()
        rc = sock.connect_ex((self.plan_host, self.plan_port))
        if rc not in (
            0,
            errno.EINPROGRESS,
            errno.EWOULDBLOCK,
            getattr(errno, "WSAEWOULDBLOCK", -1),
        ):
            self.finish(f"connect:{errno.errorcode.get(rc, rc)}")
            return
        self.state = "connecting"

    def connected(self) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        with contextlib.suppress(OSError):
            self.port = self.sock.getsockname()[1]
        if err == errno.ECONNRESET:
            # Connected, accepted, and reset before this thread looked.
            self.finish("reset")
        elif err:
            self.finish(f"connect:{errno.errorcode.get(err, err)}")
        else:
            self.state = "open"

    def next_message(self) -> None:
        seq = len(self.records)
        if seq < self.n_planned:
            if seq - len(self.replies) >= self.depth:
                return
            # Without pacing, consecutive messages go out in the same writes
            # (pipelining), up to 256 KiB at a time.
            out = []
            start = self.sent
            while True:
                body = self.body(seq)
                record = make_record(b"M", self.idx, seq, body)
                wire = frame(self.plan.framing, self.plan.length_prefix, record)
                out.append(wire)
                self.records.append([start, start + len(wire), len(body), zlib.crc32(body), 0, 0])
                start += len(wire)
                seq += 1
                if (
                    (self.gap and (not self.burst or seq % self.burst == 0))
                    or self.chunking == "trickle"
                    or seq >= self.n_planned
                    or seq - len(self.replies) >= self.depth
                    or start - self.sent >= 256 << 10
                ):
                    break
            self.out = b"".join(out)
            self.out_pos = 0
            self.chunks = self.chunk_plan(seq - 1, len(self.out))
            if self.gap:
                self.next_send_at = now() + self.gap
            return
        if self.kind == "oversize" and self.oversize_start is None:
            rng = random.Random(self.oversize_seed)
            limit = self.plan.max_message_size
            if self.plan.framing == "line":
                blob = make_record(b"X", self.idx, seq, b"x" * (limit + rng.randrange(1, 4096)))
                self.out = blob + b"\n"
            else:
                # A malformed length prefix: more than the limit allows.
                top = (1 << (8 * self.plan.length_prefix)) - 1
                declared = rng.choice([limit + 1, rng.randrange(limit + 1, top), top])
                self.out = declared.to_bytes(self.plan.length_prefix, "big") + bytes(
                    rng.randrange(0, 32 << 10)
                )
            self.oversize_start = self.sent
            self.out_pos = 0
            self.chunks = self.chunk_plan(seq, len(self.out))
            return

    def wants_write(self, t: float) -> bool:
        if self.state != "open" or self.send_failed or self.fin_at or self.closed_at:
            return False
        if self.out_pos >= len(self.out):
            self.next_message()
            if self.out_pos >= len(self.out):
                self.after_sending(t)
                return False
        return t >= self.next_send_at

    def after_sending(self, t: float) -> None:
        done = len(self.records) >= self.n_planned and (
            self.kind != "oversize" or self.oversize_start is not None
        )
        if not done:
            return
        if self.all_sent_at is None:
            self.all_sent_at = t
        assert self.sock is not None
        if self.ending == "halfclose" and self.fin_at is None:
            self.fin_at = now()
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self.send_failed = f"shutdown: {e}"
        elif (
            self.ending == "close"
            and self.closed_at is None
            and (len(self.replies) >= len(self.records) or t > self.all_sent_at + 1.0)
        ):
            self.closed_at = now()
            self.finish("self_close")

    def on_writable(self, t: float) -> None:
        assert self.sock is not None
        size, delay = self.chunks[0]
        piece = self.out[self.out_pos : self.out_pos + size]
        t_start = now()
        try:
            n = self.sock.send(piece)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            # Linux reports a reset once, to the first call that looks: a
            # send that hit it leaves recv() to read EOF afterwards.
            self.send_failed = f"send: {e}"
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                self.reset_seen_on_send = True
            return
        before = self.sent
        self.out_pos += n
        self.sent += n
        self.writes.append((self.sent, t_start))
        # Stamp the records this write began or completed with its start time.
        i = self.unstamped
        while i < len(self.records) and self.records[i][0] < self.sent:
            record = self.records[i]
            if record[0] >= before:
                record[4] = t_start
            if record[1] <= self.sent:
                record[5] = t_start
                self.unstamped = i + 1
            i += 1
        if n == size:
            self.chunks.pop(0)
            self.next_send_at = t_start + delay
        else:
            self.chunks[0] = (size - n, delay)
        if self.out_pos >= len(self.out) and self.oversize_start is not None:
            self.oversize_sent_at = t_start

    def on_readable(self, t: float) -> None:
        assert self.sock is not None
        slow = self.read_mode == "slow" and self.owner.shared.draining_since is None
        size = 2048 if slow else 65536
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self.finish("reset")
            return
        except OSError as e:
            self.finish(f"error:{errno.errorcode.get(e.errno or 0, e.errno)}")
            return
        if not data:
            self.finish("reset" if self.reset_seen_on_send else "eof")
            return
        if slow:
            self.next_read_at = t + 0.005
        self.recv_bytes += len(data)
        self.inbox += data
        self.parse_replies(t)

    def parse_replies(self, t: float) -> None:
        framing = self.plan.framing
        while True:
            if framing == "line":
                end = self.inbox.find(b"\n")
                if end < 0:
                    return
                record = bytes(self.inbox[:end])
                del self.inbox[: end + 1]
            elif framing == "length":
                p = self.plan.length_prefix
                if len(self.inbox) < p:
                    return
                n = int.from_bytes(self.inbox[:p], "big")
                if len(self.inbox) < p + n:
                    return
                record = bytes(self.inbox[p : p + n])
                del self.inbox[: p + n]
            else:
                if len(self.inbox) < HEADER:
                    return
                n = body_length(bytes(self.inbox[:HEADER]))
                if n is None:
                    self.bad_replies.append(f"unparsable reply header {bytes(self.inbox[:40])!r}")
                    self.inbox.clear()
                    return
                if len(self.inbox) < HEADER + n:
                    return
                record = bytes(self.inbox[: HEADER + n])
                del self.inbox[: HEADER + n]
            self.check_reply(record, t)

    def check_reply(self, record: bytes, t: float) -> None:
        parsed = parse_record(record)
        if isinstance(parsed, str):
            self.bad_replies.append(parsed)
            self.replies.append((-1, -1, False, t))
            return
        kind, client, seq, body = parsed
        ok = kind == b"R" and client == self.idx and 0 <= seq < len(self.records)
        if ok and body:
            _, _, blen, bcrc, _, _ = self.records[seq]
            ok = len(body) == blen and zlib.crc32(body) == bcrc
        if not ok:
            self.bad_replies.append(f"reply {seq} (kind {kind!r}, client {client}) is not intact")
        self.replies.append((seq, len(body), ok, t))

    def self_reset(self) -> None:
        assert self.sock is not None
        self.self_reset_at = now()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.finish("self_reset")

    def finish(self, how: str) -> None:
        owner = getattr(self, "owner", None)
        if owner is not None:
            owner.unregister(self)
        if self.end is None:
            self.end = how
            self.end_at = now()
        self.state = "done"
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()


class ClientThread:
    def __init__(self, clients: list[Client], shared: Shared) -> None:
        self.clients = clients
        self.shared = shared
        self.sel = selectors.DefaultSelector()
        self.thread = threading.Thread(target=self.run, name="chaos-client", daemon=True)
        self.error: BaseException | None = None
        for c in clients:
            c.owner = self  # type: ignore[attr-defined]

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as exc:
            self.error = exc
            import traceback

            traceback.print_exc()
        finally:
            for c in self.clients:
                if c.state != "done":
                    c.finish("unfinished")
            self.sel.close()

    def loop(self) -> None:
        shared = self.shared
        while True:
            t = now()
            draining = shared.draining_since is not None
            if draining and t > shared.draining_since + DRAIN_LIMIT:
                return
            live = 0
            timeout = 0.02
            for c in self.clients:
                if c.state == "done":
                    continue
                live += 1
                if c.state == "waiting":
                    if t >= c.start_at and not draining:
                        c.connect()
                    elif draining:
                        c.finish("never_started")
                        continue
                    else:
                        continue
                if c.state == "open" and c.reset_at is not None and t >= c.reset_at:
                    self.unregister(c)
                    c.self_reset()
                    continue
                mask = 0
                if c.state == "connecting":
                    mask = selectors.EVENT_WRITE
                elif c.state == "open":
                    if c.wants_write(t):
                        mask |= selectors.EVENT_WRITE
                    reads = c.state == "open" and not c.reading_stopped(t, draining)
                    if reads and t >= c.next_read_at:
                        mask |= selectors.EVENT_READ
                if c.state == "done":
                    self.unregister(c)
                    continue
                self.set_mask(c, mask)
            if live == 0:
                return
            for key, events in self.sel.select(timeout):
                c = key.data
                t = now()
                if c.state == "connecting":
                    c.connected()
                    if c.state == "done":
                        self.unregister(c)
                    continue
                if events & selectors.EVENT_READ and c.state == "open":
                    c.on_readable(t)
                if events & selectors.EVENT_WRITE and c.state == "open":
                    c.on_writable(t)
                if c.state == "done":
                    self.unregister(c)

    def set_mask(self, c: Client, mask: int) -> None:
        if mask == c.registered:
            return
        assert c.sock is not None
        if c.registered == 0:
            self.sel.register(c.sock, mask, c)
        elif mask == 0:
            self.sel.unregister(c.sock)
        else:
            self.sel.modify(c.sock, mask, c)
        c.registered = mask

    def unregister(self, c: Client) -> None:
        if c.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(c.sock)  # type: ignore[arg-type]
            c.registered = 0


class Shared:
    def __init__(self) -> None:
        self.draining_since: float | None = None


class Probe:
    """After the stop, connects until the listener refuses: from that moment
    the accepting I/O thread has begun to stop (docs/api.md, stop_server: the
    server stops accepting, new connections are refused, and reading)."""

    def __init__(self, port: int, clients: list[Client], plan: RunPlan) -> None:
        self.port = port
        self.plan = plan
        self.clients = clients
        self.t_refused: float | None = None
        self.thread = threading.Thread(target=self.run, name="chaos-probe", daemon=True)

    def run(self) -> None:
        deadline = now() + self.plan.stop_timeout + 10
        n = 0
        while now() < deadline and n < 500:
            n += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(1.0)
                rc = sock.connect_ex((HOST, self.port))
                if rc == errno.ECONNREFUSED:
                    self.t_refused = now()
                    return
                if rc == 0:
                    probe = Client.__new__(Client)
                    probe.probe_init(self.plan, sock)  # type: ignore[attr-defined]
                    self.clients.append(probe)
            finally:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            time.sleep(0.002)


def _probe_init(self: Client, plan: RunPlan, sock: socket.socket) -> None:
    """A probe connection, in the ledger as a client that resets at once."""
    self.idx = -1
    self.plan = plan
    self.kind = "probe"
    self.port = sock.getsockname()[1]
    self.t_connect = now()
    self.self_reset_at = now()
    self.closed_at = None
    self.fin_at = None
    self.records = []
    self.replies = []
    self.bad_replies = []
    self.sent = 0
    self.recv_bytes = 0
    self.end = "self_reset"
    self.end_at = now()
    self.oversize_start = None
    self.all_sent_at = None
    self.ending = "reset"
    self.writes = []
    self.n_planned = 0
    self.sizes = []


Client.probe_init = _probe_init  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------


def match(clients: list[Client], conns: list[dict[str, Any]], v: Violations) -> list[tuple]:
    """Pairs each server connection with the client it served: by the client
    index its records carry, else by port in order of connection."""
    by_idx = {c.idx: c for c in clients if c.idx >= 0}
    pairs = []
    taken: set[int] = set()
    rest = []
    for s in conns:
        c = by_idx.get(s["client"]) if s["client"] is not None else None
        if c is not None:
            if id(c) in taken:
                v.add("corrupted", f"two connections carry records of client {c.idx}")
                continue
            if s["port"] >= 0 and c.port != s["port"]:
                v.add("corrupted", f"client {c.idx}'s records arrived on another connection")
            taken.add(id(c))
            pairs.append((c, s))
        else:
            rest.append(s)
    by_port: dict[int, list[Client]] = {}
    for c in sorted(clients, key=lambda c: c.t_connect or 0):
        if id(c) not in taken and c.t_connect is not None:
            by_port.setdefault(c.port, []).append(c)
    for s in sorted(rest, key=lambda s: s["id"]):
        candidates = by_port.get(s["port"], [])
        if s["port"] < 0:
            continue  # no remote_address: its peer was gone when it was accepted
        if not candidates:
            v.add(
                "other",
                f"server connection {s['id']} (port {s['port']}, opened {s['t_open']:.3f}, "
                f"closed {s['reason']!r} at {s['closed_at']:.3f}) matches no client",
            )
            continue
        c = candidates.pop(0)
        taken.add(id(c))
        pairs.append((c, s))
    return pairs


def dump(c: Client, s: dict[str, Any]) -> None:
    keep = (
        "idx kind ending chunking depth read_mode port t_connect sent n_planned all_sent_at "
        "fin_at closed_at self_reset_at send_failed recv_bytes end end_at oversize_start"
    )
    out = {k: getattr(c, k, None) for k in keep.split()}
    out["records"] = c.records
    out["replies"] = c.replies
    out["inbox"] = len(getattr(c, "inbox", b""))
    print("CLIENT", json.dumps(out, default=str), file=sys.stderr)
    print("SERVER", json.dumps(s, default=str), file=sys.stderr)


def check(
    plan: RunPlan,
    clients: list[Client],
    ledger: dict[str, Any],
    t_stop: float | None,
    t_refused: float | None,
    v: Violations,
) -> dict[str, Any]:
    framing = plan.framing
    overhead = frame_overhead(framing, plan.length_prefix)
    stats = ledger["stats"]
    conns = ledger["conns"]
    pairs = match(clients, conns, v)
    timeout = plan.stop_timeout

    for c in clients:
        for bad in c.bad_replies[:3]:
            v.add("corrupted", f"client {c.idx}: {bad}")
        if len(c.bad_replies) > 3:
            v.add("corrupted", f"client {c.idx}: more bad replies", len(c.bad_replies) - 3)

    # The most bytes the server may have read and not delivered. A connection
    # that matches no client (its peer was gone before it was accepted, so it
    # has no remote_address, and it delivered no whole record) may hold the
    # start of one message, or an oversized one up to the limit and a read.
    # When the callbacks were done with every byte sent before the stop.
    work_done = 0.0
    if t_stop is not None:
        for c, s in pairs:
            before = max((end for end, t in c.writes if t < t_stop), default=0)
            work_done = max(
                [work_done] + [t for t, wire_before in s["log"] if wire_before < before]
            )
    paired = {s["id"] for _, s in pairs}
    unpaired = [s for s in conns if s["id"] not in paired]
    expected_read = len(unpaired) * (plan.max_message_size + plan.length_prefix + (64 << 10))
    delivered_wire = sum(s["wire"] for s in unpaired)
    for c, s in pairs:
        if c.idx in getattr(plan, "dump", ()):
            dump(c, s)
        who = f"connection {s['id']} (client {c.idx}, {c.kind}, ending {c.ending})"
        msgs = s["msgs"]
        wire = s["wire"]
        delivered_wire += wire
        app_closed = s["app_close"] is not None or s["app_abort"] is not None
        # The next record the server did not get, and how big it is on the wire.
        if msgs < len(c.records):
            next_wire = c.records[msgs][1] - c.records[msgs][0]
        elif c.oversize_start is not None:
            next_wire = c.sent - c.oversize_start + 1
        else:
            next_wire = 1
        unsent = max(0, c.sent - wire)
        if app_closed or s["too_large_at"] is not None or framing == "raw":
            # docs/api.md gives no promise about input after the application's own
            # close; an oversized message is never delivered. (Raw mode is
            # held to the exact counters below instead.)
            expected_read += unsent
        else:
            # docs/api.md: input already read is still delivered (pause_reading;
            # stop_server: "input it has already read still reaches the
            # callbacks"): at most the start of one message may be read and
            # not delivered.
            expected_read += min(unsent, next_wire - 1)

        # docs/api.md, Messages: on_eof_received runs after the callbacks for
        # everything the client sent before it shut down its side.
        if s["eof_at"] is not None and c.fin_at is not None:
            if framing == "raw":
                if s["wire_at_eof"] != c.sent:
                    v.add("lost", f"{who}: EOF after {s['wire_at_eof']} of {c.sent} bytes")
            elif s["msgs_at_eof"] != len(c.records):
                v.add(
                    "lost",
                    f"{who}: on_eof_received after {s['msgs_at_eof']} of {len(c.records)} messages",
                    len(c.records) - s["msgs_at_eof"],
                )

        # docs/api.md, Messages: a message larger than max_message_size: the
        # messages before it are still delivered, then MessageTooLarge, and
        # the connection closes with close_reason "too_large".
        if s["too_large_at"] is not None:
            if c.oversize_start is None:
                v.add("other", f"{who}: MessageTooLarge, but the client sent no such message")
            elif s["msgs_at_too_large"] != len(c.records):
                v.add(
                    "lost",
                    f"{who}: MessageTooLarge after {s['msgs_at_too_large']} of "
                    f"{len(c.records)} messages before it",
                )
        if s["reason"] == "too_large" and s["too_large_at"] is None:
            v.add("other", f"{who}: closed 'too_large' without MessageTooLarge")

        # docs/api.md, send_message: queued data is written whole and in order:
        # what the client got is a prefix of what the application queued.
        queued = s["replies"]
        for i, (seq, blen, ok, _) in enumerate(c.replies):
            if not ok:
                continue
            if i >= len(queued):
                v.add("corrupted", f"{who}: reply {i} ({seq}) was never queued")
                break
            if (queued[i][0], queued[i][1]) != (seq, blen):
                v.add(
                    "reordered",
                    f"{who}: reply {i} is ({seq}, {blen} B), the application queued "
                    f"({queued[i][0]}, {queued[i][1]} B)",
                )
                break

        self_ended = c.closed_at is not None or c.self_reset_at is not None
        reason = s["reason"]
        closed_at = s["closed_at"]
        if closed_at is None:
            continue  # reported already: never got on_connection_closed
        server_own = reason not in ("peer", "local")
        # docs/api.md, send_message: data queued is written before the connection's
        # FIN, unless the peer goes away first; when the server closes on its
        # own, sends made before on_connection_closed may be dropped (those
        # are the worker threads' replies here: the callbacks' replies to
        # input already read must go out, docs/api.md, stop_server).
        if c.end == "eof" and not self_ended:
            missing = [r for r in queued[len(c.replies) :] if not (server_own and r[2])]
            if missing:
                v.add(
                    "lost",
                    f"{who}: clean EOF (close_reason {reason!r}) with {len(missing)} queued "
                    f"replies not received (first: record {missing[0][0]})",
                    len(missing),
                )

        # docs/api.md, Connection, close_reason table: each reason says who ended it.
        client_fin = [t for t in (c.fin_at, c.closed_at) if t is not None]
        if reason == "peer" and (not client_fin or min(client_fin) > closed_at or not app_closed):
            # "peer": the client shut down its side and the connection was
            # then closed (by on_eof_received here).
            v.add("other", f"{who}: close_reason 'peer' but the client had not shut down its side")
        if reason == "local" and not app_closed:
            v.add("other", f"{who}: close_reason 'local' without close_connection")
        own = [t for t in (c.self_reset_at, c.closed_at) if t is not None]
        if reason == "reset" and s["app_abort"] is None and (not own or closed_at < min(own)):
            # "reset": the client reset the connection, or it vanished while
            # the server was sending. Here it had neither closed nor reset.
            v.add("other", f"{who}: close_reason 'reset' while the client was still connected")
        if reason == "shutdown" and (t_stop is None or closed_at < t_stop):
            v.add("other", f"{who}: close_reason 'shutdown' before any stop")
        if reason in ("idle_timeout",):
            v.add("other", f"{who}: close_reason {reason!r}, but no idle_timeout was set")
        if reason == "message_timeout" and closed_at - s["t_open"] < 30.0:
            v.add("other", f"{who}: 'message_timeout' within the 30 s message_timeout")

        # docs/api.md, stop_server: input already read still reaches the callbacks,
        # and their replies are sent; each connection closes with FIN as soon
        # as its queued output has gone out; resets are for connections not
        # closed by the deadline. A connection that was settled when the stop
        # began (opened, everything it sent answered and received, nothing
        # more to send) waits at most for the callbacks to finish the input
        # sent before the stop: once they have (work_done), with ample time
        # left before the deadline (SETTLED_GRACE), it must end with FIN.
        if (
            t_stop is not None
            and reason == "shutdown"
            and timeout >= SETTLED_STOP
            and work_done + SETTLED_GRACE < t_stop + timeout
            and c.end == "reset"
            and not self_ended
            and s["app_abort"] is None
            and s["t_open"] < t_stop
            and c.kind in ("idle", "exchange")
            and len(c.records) == c.n_planned
            and c.all_sent_at is not None
            and c.all_sent_at < t_stop
            and sum(1 for r in c.replies if r[3] < t_stop) == len(c.records)
            and all(r[3] < t_stop for r in queued)
        ):
            v.add(
                "other",
                f"{who}: reset at the stop (timeout {timeout:.2f} s, seen "
                f"{c.end_at - t_stop:.2f} s after it) though it was settled when the stop began "
                f"and the callbacks had handled the input sent before it "
                f"{max(0.0, work_done - t_stop):.2f} s after it",
            )
        # docs/api.md, close_connection: a graceful close sends what is queued,
        # then FIN (and reads the peer's input until its EOF, for 5 s).
        if (
            reason in ("local", "peer")
            and s["app_abort"] is None
            and c.end == "reset"
            and not self_ended
            and (t_stop is None or c.end_at < t_stop)
            and s["app_close"] is not None
            and c.end_at < s["app_close"] + 5.0
        ):
            v.add("other", f"{who}: graceful close seen as a reset by the client")

        # docs/limitations.md: data that arrives after stop_server() is
        # not delivered; stop_server: the server stops accepting and reading.
        # A refused probe proves the accepting I/O thread began the stop; with
        # one I/O thread that is the thread reading every connection.
        if t_refused is not None and ledger["io_threads"] == 1 and wire > 0:
            if framing == "raw":
                started = next((t for end, t in c.writes if end >= wire), None)
                last_start = started
            else:
                last_start = c.records[msgs - 1][5] if 0 < msgs <= len(c.records) else None
            if last_start is not None and last_start > t_refused:
                v.add(
                    "other",
                    f"{who}: input sent {last_start - t_refused:.3f} s after the stop began "
                    "(listener refused) was delivered",
                )

        # docs/api.md, close_reason "reset": noticed even on an idle half-closed
        # connection. A client's reset must be reported; we allow RESET_NOTICE
        # seconds before a stop for that.
        if (
            c.self_reset_at is not None
            and t_stop is not None
            and c.self_reset_at + RESET_NOTICE < t_stop
            and s["app_close"] is None
            and s["app_abort"] is None
            and closed_at > t_stop
        ):
            v.add(
                "other",
                f"{who}: the client's reset {t_stop - c.self_reset_at:.1f} s before the stop "
                f"was not reported until the stop (paused at close: {s['paused_at_close']})",
            )

    # docs/api.md, pause_reading and stop_server: input already read is still
    # delivered. The I/O thread's counters (stats(), exact once listen() has
    # returned) count what it read and what it handed over.
    calls = sum(s["calls"] for s in conns)
    msgs = sum(s["msgs"] for s in conns)
    if framing == "raw":
        if stats["messages_received"] != calls:
            v.add(
                "lost",
                f"the I/O thread delivered {stats['messages_received']} reads, "
                f"on_message_received ran {calls} times",
                abs(stats["messages_received"] - calls),
            )
        if stats["bytes_received"] != delivered_wire:
            v.add(
                "unaccounted",
                f"the I/O thread read {stats['bytes_received']} bytes, the callbacks got "
                f"{delivered_wire}",
                abs(stats["bytes_received"] - delivered_wire),
            )
    else:
        if stats["messages_received"] != calls:
            v.add(
                "lost",
                f"the I/O thread delivered {stats['messages_received']} messages, "
                f"on_message_received ran {calls} times",
                abs(stats["messages_received"] - calls),
            )
        excess = stats["bytes_received"] - delivered_wire - expected_read
        if excess > 0:
            paused = [s["id"] for s in conns if s["paused_at_close"]]
            v.add(
                "unaccounted",
                f"the I/O thread read {excess} bytes more than the callbacks got, beyond "
                f"partial messages (connections paused when they closed: {paused[:8]})",
                excess,
            )
    del msgs, overhead
    ends: dict[str, int] = {}
    for c in clients:
        ends[str(c.end)] = ends.get(str(c.end), 0) + 1
    return {
        "closes": stats["closes"],
        "client_ends": ends,
        "connections": sum(1 for c in clients if c.kind != "probe"),
        "messages_in": calls if framing != "raw" else sum(s["msgs"] for s in conns),
        "messages_out": sum(len(s["replies"]) for s in conns),
        "bytes_in": stats["bytes_received"],
        "bytes_out": stats["bytes_sent"],
    }


# ---------------------------------------------------------------------------
# Driving a run
# ---------------------------------------------------------------------------


def watchdog(limit: float, report: dict[str, Any], as_json: bool) -> None:
    def fire() -> None:
        time.sleep(limit)
        faulthandler.dump_traceback(file=sys.stderr)
        report["violations"] = [f"other: the run did not end within {limit:.0f} s (hung)"]
        report["other"] = report.get("other", 0) + 1
        emit(report, as_json)
        os._exit(3)

    threading.Thread(target=fire, name="chaos-watchdog", daemon=True).start()


def emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report), flush=True)
        return
    for key, value in report.items():
        if key != "violations":
            print(f"{key:>12}  {value}")
    for line in report.get("violations", []):
        print(f"  - {line}")
    sys.stdout.flush()


def run_clients(plan: RunPlan, port: int, t0: float) -> tuple[list[Client], list[ClientThread]]:
    clients = [Client(i, plan, t0) for i in range(plan.connections)]
    for c in clients:
        c.plan_host, c.plan_port = HOST, port  # type: ignore[attr-defined]
    shared = Shared()
    threads = [ClientThread(clients[i::CLIENT_THREADS], shared) for i in range(CLIENT_THREADS)]
    for t in threads:
        t.shared = shared
        t.thread.start()
    return clients, threads


def finish_clients(threads: list[ClientThread]) -> None:
    shared = threads[0].shared
    shared.draining_since = now()
    for t in threads:
        t.thread.join(DRAIN_LIMIT + 10)
    for t in threads:
        if t.error is not None:
            raise RuntimeError(f"a client thread failed: {t.error!r}") from t.error


def run_in_thread(plan: RunPlan, report: dict[str, Any], v: Violations) -> dict[str, Any]:
    fds_before, tasks_before = resources()
    pythreads_before = {t.ident for t in threading.enumerate()}
    server = ChaosServer(plan, v)
    listener = rsepoll.make_listener_socket(0, HOST)
    port = listener.port
    server.register_listener_socket(listener)
    listener.close()  # the server's duplicate is the only one: a stop refuses
    t0 = now()
    clients, threads = run_clients(plan, port, t0)
    probe = Probe(port, clients, plan)

    def stopper() -> None:
        time.sleep(max(0.0, t0 + plan.stop_at - now()))
        if plan.stop_from == "worker":
            server.pool.submit(server.do_stop)
        elif plan.stop_from == "callback":
            server.stop_armed_at = now()
        # No callback or worker got to it within 0.3 s: stop from here.
        deadline = now() + 0.3
        while server.t_stop_call is None and now() < deadline:
            time.sleep(0.001)
        server.do_stop()
        while server.t_stop_call is None:
            time.sleep(0.001)
        probe.thread.start()

    stop_thread = threading.Thread(target=stopper, name="chaos-stopper", daemon=True)
    stop_thread.start()
    server.listen(timeout=100)
    t_returned = now()
    check_server_end(server, v)
    stop_thread.join(10)
    finish_clients(threads)
    t_drained = now()
    probe.thread.join(plan.stop_timeout + 15)
    server.sched.close()
    server.pool.shutdown(wait=True)
    ledger = server.ledger()
    summary = check(plan, clients, ledger, ledger["t_stop_call"], probe.t_refused, v)
    leak_check(fds_before, tasks_before, pythreads_before, v)
    report.update(summary)
    report["stop"] = {
        "from": plan.stop_from,
        "timeout": round(plan.stop_timeout, 3),
        "listen_returned_after": (
            round(t_returned - ledger["t_stop_call"], 3) if ledger["t_stop_call"] else None
        ),
        "clients_done_after": round(t_drained - t_returned, 3),
        "refused_after": (
            round(probe.t_refused - ledger["t_stop_call"], 4)
            if probe.t_refused and ledger["t_stop_call"]
            else None
        ),
    }
    report["io_threads"] = ledger["io_threads"]
    report["backend"] = ledger["backend"]
    return report


def leak_check(
    fds_before: set[str], tasks_before: int, pythreads_before: set[int | None], v: Violations
) -> None:
    # docs/api.md, register_listener_socket: the server closes its duplicate when
    # listen() returns; stop_server: every connection is closed; and the I/O
    # threads end with the server. Nothing of it may outlive listen().
    fds_after, tasks_after = resources()
    # A joined thread's OS thread may take a moment to leave /proc.
    deadline = now() + 2.0
    while tasks_after > tasks_before and now() < deadline:
        time.sleep(0.01)
        fds_after, tasks_after = resources()
    leaked = sorted(fds_after - fds_before)
    if leaked:
        v.add("leaked_fds", f"fds open after the run: {leaked[:6]}", len(leaked))
    if tasks_after > tasks_before:
        v.add("other", f"{tasks_after - tasks_before} more threads than before the run")
    extra = [t.name for t in threading.enumerate() if t.ident not in pythreads_before]
    extra = [n for n in extra if n != "chaos-watchdog"]
    if extra:
        v.add("other", f"Python threads left after the run: {extra}")


# -- the signal variant: the server in a child process --


def child_main(plan: RunPlan) -> None:
    """The server of the signal variant: prints PORT, serves until SIGINT or
    SIGTERM, then prints its ledger as one JSON line."""
    v = Violations()
    fds_before, tasks_before = resources()
    pythreads_before = {t.ident for t in threading.enumerate()}
    server = ChaosServer(plan, v)
    listener = rsepoll.make_listener_socket(0, HOST)
    server.register_listener_socket(listener)
    print("PORT", listener.port, flush=True)
    listener.close()

    def on_term(signum: int, frame: Any) -> None:
        server.t_stop_call = server.t_stop_call or now()
        server.stop_server(plan.stop_timeout)

    server.ctrl_c = CtrlC()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, server.ctrl_c.handler)
    try:
        server.listen(timeout=100)
    except KeyboardInterrupt:
        server.ki = True
    check_server_end(server, v)
    server.sched.close()
    server.pool.shutdown(wait=True)
    ledger = server.ledger()
    leak_check(fds_before, tasks_before, pythreads_before, v)
    ledger["violations"] = {"counts": v.counts, "first": v.first}
    print("LEDGER", json.dumps(ledger), flush=True)


def run_in_child(plan: RunPlan, report: dict[str, Any], v: Violations, argv: list[str]) -> dict:
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, "--child"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    line = child.stdout.readline().decode()
    if not line.startswith("PORT"):
        child.kill()
        raise RuntimeError(f"the server child did not start: {line!r}")
    port = int(line.split()[1])
    t0 = now()
    clients, threads = run_clients(plan, port, t0)
    probe = Probe(port, clients, plan)
    time.sleep(max(0.0, t0 + plan.stop_at - now()))
    t_stop = now()
    child.send_signal(getattr(signal, plan.signal))
    probe.thread.start()
    out = b""
    try:
        out, _ = child.communicate(timeout=plan.stop_timeout + 30)
    except subprocess.TimeoutExpired:
        child.kill()
        v.add(
            "other",
            f"the server did not end within {plan.stop_timeout + 30:.0f} s of {plan.signal}",
        )
        child.communicate()
    finish_clients(threads)
    probe.thread.join(plan.stop_timeout + 15)
    ledger = None
    for line in out.decode().splitlines():
        if line.startswith("LEDGER "):
            ledger = json.loads(line[7:])
    if ledger is None:
        raise RuntimeError(f"the server child printed no ledger (status {child.returncode})")
    for kind, n in ledger["violations"]["counts"].items():
        v.counts[kind] += n
    for text in ledger["violations"]["first"]:
        if len(v.first) < 10:
            v.first.append(f"(server) {text}")
    if plan.signal == "SIGINT" and not ledger["ki"]:
        # docs/api.md, listen: Ctrl-C raises KeyboardInterrupt once the server has shut down.
        v.add("other", "SIGINT did not raise KeyboardInterrupt out of listen()")
    summary = check(plan, clients, ledger, t_stop, probe.t_refused, v)
    report.update(summary)
    report["stop"] = {"signal": plan.signal, "timeout": round(plan.stop_timeout, 3)}
    report["io_threads"] = ledger["io_threads"]
    report["backend"] = ledger["backend"]
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["auto", "epoll", "portable"], default="auto")
    parser.add_argument("--io-threads", type=int, default=None)
    parser.add_argument(
        "--framing", choices=["raw", "line", "length"], default=None, help="default: from the seed"
    )
    parser.add_argument("--connections", type=int, default=300, help="client connections")
    parser.add_argument(
        "--variant",
        choices=["auto", "thread", "signal"],
        default="auto",
        help="thread: stop_server() in-process; signal: a child server gets SIGINT/SIGTERM; "
        "auto: from the seed",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dump", type=int, action="append", default=[], help="print the ledger of client N"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.connections <= 0:
        parser.error("--seconds and --connections must be positive")
    plan = RunPlan(args)
    plan.dump = args.dump
    if args.child:
        child_main(plan)
        return 0
    report: dict[str, Any] = {
        "seed": plan.seed,
        "seconds": plan.seconds,
        "framing": plan.framing,
        "variant": plan.variant,
    }
    v = Violations()
    watchdog(plan.seconds + plan.stop_timeout + DRAIN_LIMIT + WATCHDOG_SLACK, report, args.json)
    started = now()
    if plan.variant == "signal":
        child_argv = [a for a in argv if a != "--json"]
        child_argv += ["--framing", plan.framing, "--variant", "signal"]
        run_in_child(plan, report, v, child_argv)
    else:
        run_in_thread(plan, report, v)
    report.update(v.counts)
    report["violations"] = v.first
    report["elapsed"] = round(now() - started, 2)
    emit(report, args.json)
    return 0 if v.total() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
