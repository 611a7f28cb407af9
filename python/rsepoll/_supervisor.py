"""The supervisor of :func:`rsepoll.workers.serve_workers`: forks the workers,
watches them, replaces the ones that crash, and stops them all.

It runs in the process that called ``serve_workers``, on its main thread, and
waits with one ``poll()`` on the workers' start-up pipes and on a pipe into
which ``signal.set_wakeup_fd`` writes the number of every SIGINT, SIGTERM and
SIGCHLD, so that no signal can slip in between a check and the wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _worker
from ._reuseport import Address
from ._workers_shared import (
    MAX_QUICK_CRASHES,
    QUICK_CRASH_SECONDS,
    WorkerError,
    WorkersReady,
    WorkerStartupError,
)

if TYPE_CHECKING:
    from . import Server

logger = logging.getLogger("rsepoll.workers")

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

#: The wait status reported for a child someone else reaped: status 255.
_UNKNOWN_STATUS = 255 << 8


@dataclass
class _Worker:
    """One worker slot; its process changes each time it is replaced."""

    index: int
    pid: int = 0
    started_at: float = 0.0
    #: The read end of the start-up pipe, until the worker has reported.
    pipe: int | None = None
    report: bytearray = field(default_factory=bytearray)
    ready: bool = False
    #: Quick crashes in a row (see QUICK_CRASH_SECONDS).
    crashes: int = 0
    #: When a crashed worker is due to be replaced.
    restart_at: float | None = None

    def name(self, pid: int | None = None) -> str:
        """How messages call it: ``rsepoll worker 2 (pid 4242)``."""
        return f"rsepoll worker {self.index} (pid {self.pid if pid is None else pid})"

    def read_report(self) -> None:
        """Reads what the process said about its start; at the pipe's EOF, it
        is ready if it said ``ready``."""
        while self.pipe is not None:
            try:
                data = os.read(self.pipe, 4096)
            except BlockingIOError:
                return
            if data:
                self.report += data
                continue
            self.close_pipe()
            self.ready = bytes(self.report) == b"ready"

    def close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None

    def reaped(self, status: int) -> _Exit:
        """Records that the process has exited with wait status ``status``."""
        self.read_report()
        self.close_pipe()  # if a grandchild still holds its write end
        ended = _Exit(self, self.pid, status)
        # A reaped pid may be reused at once: it must never be signalled again.
        self.pid = 0
        return ended


class _Exit(NamedTuple):
    """A worker process that has exited and been reaped."""

    worker: _Worker
    pid: int
    #: As os.waitpid returns it.
    status: int

    def name(self) -> str:
        return self.worker.name(self.pid)

    @property
    def clean(self) -> bool:
        """Exited with status 0: its server stopped, as asked."""
        return os.waitstatus_to_exitcode(self.status) == 0

    def failure(self) -> str:
        """What went wrong, for an exit that is not clean."""
        if self.worker.ready:
            return f"{self.name()} {describe(self.status)}"
        said = bytes(self.worker.report).decode("utf-8", "replace")
        if said.startswith("error: "):
            return f"{self.name()} failed to start: {said[len('error: ') :]}"
        return f"{self.name()} {describe(self.status)} before it was serving"


class _Stop(Exception):
    """A stop was asked for: the pool stops its workers and returns."""


class _Signals:
    """SIGINT, SIGTERM and SIGCHLD, turned into bytes on a pipe while the
    pool runs; the previous handlers and wake-up fd are put back after."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
        self._saved: dict[int, Any] = {}
        self._saved_wakeup_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in _worker.PARENT_SIGNALS:
            # Any Python handler makes the C-level handler write the signal's
            # number into the wake-up pipe; this one need not do anything.
            self._saved[signum] = signal.signal(signum, _ignore)

    def take(self) -> set[int]:
        """The signals that came since the last call."""
        taken: set[int] = set()
        while True:
            try:
                data = os.read(self.read_fd, 256)
            except BlockingIOError:
                return taken
            if not data:
                return taken
            taken.update(data)

    def restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(self._saved_wakeup_fd)
        self.close()

    def close(self) -> None:
        """Closes the pipe (in a worker, the inherited copy)."""
        os.close(self.read_fd)
        os.close(self.write_fd)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The pool's handler: the wake-up pipe has the signal's number."""


class Pool:
    """Runs ``count`` workers on ``address`` until a stop; see serve_workers."""

    def __init__(
        self,
        make_server: Callable[[], Server],
        address: Address,
        reservation: socket.socket,
        count: int,
        *,
        backlog: int,
        restart: bool,
        stop_timeout: float,
        startup_timeout: float,
    ) -> None:
        self.make_server = make_server
        self.address = address
        self.reservation = reservation
        self.backlog = backlog
        self.restart = restart
        self.stop_timeout = stop_timeout
        self.startup_timeout = startup_timeout
        self.workers = [_Worker(index) for index in range(1, count + 1)]
        self.pid = os.getpid()
        self.signals: _Signals | None = None

    def run(self, on_ready: Callable[[WorkersReady], object] | None) -> None:
        """Starts the workers, calls ``on_ready``, supervises them until a stop,
        and stops them; whatever happens, no worker is left running."""
        self.signals = _Signals()
        try:
            try:
                self._start_all()
                if on_ready is not None:
                    host, port = self.address.sockaddr[:2]
                    on_ready(WorkersReady((host, port), tuple(w.pid for w in self.workers)))
                self._supervise()
            except _Stop:
                pass
            finally:
                self._stop_all()
        finally:
            self.signals.restore()

    def _wait(self, timeout: float) -> set[int]:
        """Waits up to ``timeout`` seconds for a signal or a start-up report;
        reads the reports that came and returns the signals that came."""
        assert self.signals is not None
        poller = select.poll()
        poller.register(self.signals.read_fd, select.POLLIN)
        for worker in self.workers:
            if worker.pipe is not None:
                poller.register(worker.pipe, select.POLLIN)
        # Rounded up: a wait that ends just before a deadline would spin.
        poller.poll(max(0, int(timeout * 1000)) + 1)
        for worker in self.workers:
            worker.read_report()
        return self.signals.take()

    # -- starting ----------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        ready_r, ready_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # else the child would write the parent's buffer again
        # Blocked across fork(), so that none reaches the child before it has
        # its own handlers: the inherited ones would wake this process.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _worker.PARENT_SIGNALS)
        try:
            try:
                pid = os.fork()
            except OSError:  # EAGAIN, ENOMEM: the pool stops with this error
                os.close(ready_r)
                os.close(ready_w)
                raise
            if pid == 0:
                os.close(ready_r)
                _worker.run(
                    self.make_server,
                    self.address,
                    self.backlog,
                    ready_w,
                    self.pid,
                    mask,
                    self._close_in_child,
                )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.pipe = ready_r
        worker.report = bytearray()
        worker.ready = False
        worker.restart_at = None

    def _close_in_child(self) -> None:
        """Closes, in a worker, what it inherited of the supervisor."""
        self.reservation.close()
        if self.signals is not None:
            self.signals.close()
        for worker in self.workers:
            worker.close_pipe()

    def _start_all(self) -> None:
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + self.startup_timeout
        while not all(w.ready for w in self.workers):
            now = time.monotonic()
            if now >= deadline:
                late = next(w for w in self.workers if not w.ready)
                raise WorkerStartupError(
                    f"{late.name()} was not serving after {self.startup_timeout:g} s"
                )
            if self._wait(deadline - now) & _STOP_SIGNALS:
                raise _Stop
            for ended in self._reap():
                if ended.clean:
                    raise _Stop  # stopped by a signal of its own, or by its server
                raise WorkerStartupError(ended.failure())

    # -- supervising -------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            now = time.monotonic()
            starting = [w for w in self.workers if w.pid and not w.ready]
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            due += [w.started_at + self.startup_timeout for w in starting]
            if self._wait(min([*due, now + 1.0]) - now) & _STOP_SIGNALS:
                raise _Stop
            now = time.monotonic()
            for worker in starting:
                if worker.ready:
                    logger.info("%s started, replacing a crashed one", worker.name())
            for ended in self._reap():
                self._replace(ended, now)
            for worker in self.workers:
                late = now >= worker.started_at + self.startup_timeout
                if worker.pid and not worker.ready and late:
                    logger.warning(
                        "%s was not serving after %g s; killing it",
                        worker.name(),
                        self.startup_timeout,
                    )
                    self._replace(_kill_and_reap(worker), now)
                if worker.restart_at is not None and now >= worker.restart_at:
                    self._spawn(worker)

    def _replace(self, ended: _Exit, now: float) -> None:
        """Reports a worker that exited while the pool was serving and
        schedules its replacement; or stops the pool, if it exited cleanly,
        with ``restart=False``, or after too many quick crashes."""
        if ended.clean:
            logger.info("%s stopped its server: stopping the others", ended.name())
            raise _Stop
        what = ended.failure()
        if not self.restart:
            raise WorkerError(what)
        worker = ended.worker
        quick = now - worker.started_at < QUICK_CRASH_SECONDS
        worker.crashes = worker.crashes + 1 if quick else 1
        if worker.crashes >= MAX_QUICK_CRASHES:
            raise WorkerError(
                f"{what}; it crashed {worker.crashes} times in a row, each time within "
                f"{QUICK_CRASH_SECONDS:g} s of starting: giving up"
            )
        delay = restart_delay(worker.crashes)
        logger.warning("%s; restarting it%s", what, f" in {delay:g} s" if delay else "")
        worker.restart_at = now + delay

    def _reap(self) -> list[_Exit]:
        """The workers that have exited since the last call. Only our own
        children are waited for: the program may have others."""
        exits = []
        for worker in self.workers:
            if not worker.pid:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else
                pid, status = worker.pid, _UNKNOWN_STATUS
            if pid != 0:
                exits.append(worker.reaped(status))
        return exits

    # -- stopping ----------------------------------------------------------

    def _stop_all(self) -> None:
        """SIGTERM to every worker, then SIGKILL to those still running after
        ``stop_timeout`` seconds, or at a second stop signal; reaps them all."""
        for worker in self.workers:
            worker.restart_at = None
            if worker.pid:
                _kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while any(w.pid for w in self.workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for worker in self.workers:
                    if worker.pid:
                        logger.warning(
                            "%s did not stop within %g s; killing it",
                            worker.name(),
                            self.stop_timeout,
                        )
                break
            if self._wait(min(remaining, 1.0)) & _STOP_SIGNALS:
                logger.warning("stop asked for again: killing the workers")
                break
            for ended in self._reap():
                if not ended.clean:
                    logger.warning("%s %s while stopping", ended.name(), describe(ended.status))
        for worker in self.workers:
            if worker.pid:
                _kill_and_reap(worker)
            worker.close_pipe()


def restart_delay(crashes: int) -> float:
    """Seconds before replacing a worker after its ``crashes``-th quick crash
    in a row: none after the first, then 0.5, 1, 2, ..."""
    return 0.0 if crashes <= 1 else 0.5 * 2 ** (crashes - 2)


def describe(status: int) -> str:
    """A wait status in words: ``exited with status 1``, ``was killed by
    signal 9 (SIGKILL)``."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-code}{name}"


def _kill(pid: int, signum: int) -> None:
    # ProcessLookupError: it exited, not reaped yet; waitpid will tell.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _kill_and_reap(worker: _Worker, timeout: float = 5.0) -> _Exit:
    """Kills the worker's process with SIGKILL and reaps it, waiting at most
    ``timeout`` seconds: a process stuck in the kernel dies only when it
    leaves it, and is then left to its fate."""
    _kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = worker.pid, _UNKNOWN_STATUS
        if pid != 0:
            return worker.reaped(status)
        if time.monotonic() >= deadline:
            logger.error("%s did not die within %g s of SIGKILL", worker.name(), timeout)
            return worker.reaped(signal.SIGKILL)  # the wait status of a SIGKILL death
        time.sleep(0.01)
