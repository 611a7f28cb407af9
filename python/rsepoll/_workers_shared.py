"""What :mod:`rsepoll.workers` and its supervisor share: the crash policy,
the errors, and what ``on_ready`` receives. Public as ``rsepoll.workers.*``;
kept in a module of their own so that the supervisor does not import the
module that imports it."""

from __future__ import annotations

from typing import NamedTuple

#: A worker that dies within this many seconds of being started counts as a
#: quick crash: its replacement waits longer (0.5 s, then 1, then 2).
QUICK_CRASH_SECONDS = 10.0

#: After this many quick crashes in a row of one worker, the supervisor stops
#: every worker and raises :class:`WorkerError` instead of trying again.
MAX_QUICK_CRASHES = 5


class WorkerError(RuntimeError):
    """The workers could not go on: one crashed too often (or at all, with
    ``restart=False``)."""


class WorkerStartupError(WorkerError):
    """A worker failed before it was serving: ``make_server()`` raised, its
    socket could not be bound, it died, or it took longer than
    ``startup_timeout``."""


class WorkersReady(NamedTuple):
    """What ``on_ready`` receives once every worker is serving."""

    #: The ``(host, port)`` every worker listens on (the chosen port, for 0).
    address: tuple[str, int]
    #: The workers' process ids, in order.
    pids: tuple[int, ...]
