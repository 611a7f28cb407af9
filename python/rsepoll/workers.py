"""Several worker processes serving one port (Linux only).

:func:`serve_workers` forks ``workers`` processes. Each builds its own server
with ``make_server()`` and binds its own listening socket to the same address
with ``SO_REUSEPORT``, so that the kernel spreads connections across them.
The calling process only supervises::

    import rsepoll
    from rsepoll.workers import serve_workers

    class Reverser(rsepoll.Server):
        def on_message_received(self, conn, data):
            self.send_message(conn, data[::-1])

    serve_workers(Reverser, 9090, "0.0.0.0", workers=4)

What the supervisor does:

- SIGTERM or SIGINT (Ctrl-C) stops every worker: each gets SIGTERM, and its
  server stops as with ``stop_server()``, sending what is queued (Ctrl-C in
  a terminal also reaches the workers, which stop the same way). Workers
  that have not exited after ``stop_timeout`` seconds are killed.
  ``serve_workers`` then returns. A second SIGTERM or SIGINT kills them at
  once.
- Each worker asks Linux for SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``), so a parent killed with SIGKILL leaves no orphan.
- A worker that crashes (exits with a non-zero status or is killed by a
  signal) is reported on the ``rsepoll.workers`` logger (on stderr unless
  logging is configured) with its exit status, and replaced: at once the
  first time, then after 0.5, 1 and 2 s if the replacements die within
  :data:`QUICK_CRASH_SECONDS` of starting. At :data:`MAX_QUICK_CRASHES` such
  crashes in a row the supervisor gives up: it stops the other workers and
  raises :class:`WorkerError`.
- A worker whose server stops on its own (``stop_server()`` from application
  code, so it exits with status 0) stops the whole pool: the application
  asked to stop. ``serve_workers`` returns.
- If any worker fails to start (``make_server()`` raises, or its socket
  cannot be bound), the others are stopped and :class:`WorkerStartupError`
  says why.

The workers are forked, not spawned: ``make_server`` may be any callable, a
closure included. Call ``serve_workers`` from the main thread, before the
program starts other threads or a server of its own (a forked child has only
the thread that forked).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._reuseport import bind_shared, resolve
from ._workers_shared import (
    MAX_QUICK_CRASHES,
    QUICK_CRASH_SECONDS,
    WorkerError,
    WorkersReady,
    WorkerStartupError,
)

if TYPE_CHECKING:
    from . import Server

__all__ = [
    "MAX_QUICK_CRASHES",
    "QUICK_CRASH_SECONDS",
    "WorkerError",
    "WorkerStartupError",
    "WorkersReady",
    "serve_workers",
]

# Defined beside the supervisor's needs, so that _supervisor.py need not
# import this module; they belong to this module's API.
for _public in (WorkerError, WorkerStartupError, WorkersReady):
    _public.__module__ = __name__
del _public


def serve_workers(
    make_server: Callable[[], Server],
    port: int,
    host: str = "127.0.0.1",
    *,
    workers: int,
    backlog: int = 1024,
    restart: bool = True,
    stop_timeout: float = 10.0,
    startup_timeout: float = 30.0,
    on_ready: Callable[[WorkersReady], object] | None = None,
) -> None:
    """Serves ``host:port`` with ``workers`` processes until SIGTERM or SIGINT.

    Each worker calls ``make_server()`` (which must return an
    :class:`rsepoll.Server`), registers its own ``SO_REUSEPORT`` listening
    socket with it and calls ``listen()``. In a worker, SIGTERM and SIGINT call
    ``stop_server()``. Port 0 picks a free port, the same for every worker:
    the supervisor binds it first (without listening, so it gets no
    connections) and holds it while it runs.

    ``on_ready``, if given, is called in this process once every worker is
    serving. ``restart=False`` turns a crashed worker into a
    :class:`WorkerError` instead of a replacement. ``stop_timeout`` bounds how
    long stopping waits for the workers before killing them; it should exceed
    the servers' own ``stop_server`` timeout (5 s by default).
    ``startup_timeout`` bounds how long a worker may take to start.

    Returns once every worker has exited after a stop (SIGTERM, SIGINT, or a
    worker whose server stopped on its own). Raises :class:`ValueError` for
    bad arguments, :class:`OSError` if the address cannot be bound,
    :class:`WorkerStartupError` if a worker fails to start,
    :class:`WorkerError` if workers crash too often, ``RuntimeError`` if
    called from another thread than the main one, and
    :class:`NotImplementedError` on every platform but Linux: only Linux
    balances connections across ``SO_REUSEPORT`` sockets (macOS accepts the
    option but does not spread connections across the sockets; Windows has
    no such option), so elsewhere run one process.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be from 0 to 65535, got {port}")
    if backlog < 1:
        raise ValueError(f"backlog must be positive, got {backlog}")
    for name, value in (("stop_timeout", stop_timeout), ("startup_timeout", startup_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    if not sys.platform.startswith("linux"):
        raise NotImplementedError(
            "several worker processes on one port need Linux: only Linux balances "
            f"connections across SO_REUSEPORT sockets (this is {sys.platform}); "
            "run one server process instead"
        )
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve_workers() must be called from the main thread")

    # Binding here first gives a busy port's error before any fork, picks the
    # port for port 0, and keeps the port ours for the replacements.
    requested = resolve(host, port)
    with bind_shared(requested, backlog=None) as reservation:
        address = requested.with_port(reservation.getsockname()[1])
        # Imported when used: the supervisor relies on POSIX signals that
        # Windows lacks, and this module must import everywhere (the CLI
        # imports it).
        from ._supervisor import Pool

        Pool(
            make_server,
            address,
            reservation,
            workers,
            backlog=backlog,
            restart=restart,
            stop_timeout=stop_timeout,
            startup_timeout=startup_timeout,
        ).run(on_ready)
