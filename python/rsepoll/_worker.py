"""The life of one worker process of :mod:`rsepoll.workers`, from just after
``fork()`` to ``os._exit()``.

The worker tells its parent how its start went through a pipe: ``ready``
once its listening socket is bound and registered, or ``error: <why>`` before
it exits with :data:`STARTUP_FAILED`. It never returns into the caller's
stack: whatever happens, it ends with ``os._exit`` so that nothing of the
parent (``finally`` blocks, ``atexit`` handlers) runs twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from ._reuseport import Address, bind_shared

if TYPE_CHECKING:
    from . import Server

#: Exit status of a worker that could not start; it sent the reason first.
STARTUP_FAILED = 3

#: The signals the parent blocks around ``fork()`` and watches.
PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)

#: From <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def run(
    make_server: Callable[[], Server],
    address: Address,
    backlog: int,
    ready_fd: int,
    parent_pid: int,
    sigmask: Iterable[int],
    close_inherited: Callable[[], None],
) -> NoReturn:
    """Runs one worker in a freshly forked child and exits with its status:
    0 once its server has stopped, :data:`STARTUP_FAILED` if it could not
    start, 1 if ``listen()`` raised.

    ``sigmask`` is the signal mask to restore: the parent forks with
    :data:`PARENT_SIGNALS` blocked, so that none of them reaches the parent's
    handlers (and its wake-up pipe) in the child before this function has
    replaced them.
    """
    status = 1
    try:
        status = _run(make_server, address, backlog, ready_fd, parent_pid, sigmask, close_inherited)
    except SystemExit as exc:  # as the interpreter would treat it at exit
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            # A closed or broken stream: nothing more can be said.
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


class _Stopper:
    """The worker's SIGTERM and SIGINT handler: stops its server gracefully
    (``stop_server()``, which waits for queued output) once there is one, and
    ends the process before that, when there is nothing to drain yet."""

    def __init__(self) -> None:
        self.server: Server | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.server is None:
            raise SystemExit(0)
        self.server.stop_server()


def _run(
    make_server: Callable[[], Server],
    address: Address,
    backlog: int,
    ready_fd: int,
    parent_pid: int,
    sigmask: Iterable[int],
    close_inherited: Callable[[], None],
) -> int:
    from . import Server

    # The parent's wake-up fd and handlers were inherited; none may run here.
    signal.set_wakeup_fd(-1)
    stopper = _Stopper()
    signal.signal(signal.SIGTERM, stopper)
    signal.signal(signal.SIGINT, stopper)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    close_inherited()
    if not _die_with_parent(parent_pid):
        return 0
    signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)

    try:
        server = make_server()
        if not isinstance(server, Server):
            kind = type(server).__name__
            raise TypeError(f"make_server() returned {kind}, not an rsepoll.Server")
    except Exception as exc:
        traceback.print_exc()
        _tell(ready_fd, f"error: make_server() raised {type(exc).__name__}: {exc}")
        return STARTUP_FAILED
    try:
        with bind_shared(address, backlog) as sock:
            server.register_listener_socket(sock)
    except OSError as exc:
        _tell(ready_fd, f"error: {exc}")
        return STARTUP_FAILED
    # From here a stop signal is a graceful stop_server(); one that came
    # before listen() makes listen() stop at once.
    stopper.server = server
    _tell(ready_fd, "ready")
    server.listen(handle_signals=False)
    return 0


def _die_with_parent(parent_pid: int) -> bool:
    """Asks Linux to send this process SIGTERM when its parent dies, so that
    a parent killed with SIGKILL leaves no orphan. False if the parent has
    already died (between ``fork()`` and now), when no signal would come."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    # A child whose parent died is adopted by another process (init or a
    # subreaper), so its parent pid changes.
    return os.getppid() == parent_pid


def _tell(fd: int, message: str) -> None:
    """Sends one status message to the parent and closes the pipe."""
    try:
        os.write(fd, message.encode("utf-8", "replace"))
    finally:
        os.close(fd)
