"""rsepoll: a TCP server for Python whose network I/O runs on a Rust thread.

Subclass :class:`Server`, override the callbacks you need, register a listening
socket and call :meth:`Server.listen`::

    import rsepoll

    class Reverser(rsepoll.Server):
        def on_message_received(self, conn, data):
            self.send_message(conn, data[::-1])

    server = Reverser()
    server.register_listener_socket(rsepoll.make_listener_socket(9090, "127.0.0.1"))
    server.listen()

An I/O thread in Rust accepts, reads and writes (edge-triggered epoll on Linux,
a portable poller elsewhere) and never takes the GIL; the callbacks run on the
thread that called ``listen()``.

To serve one port from several processes (Linux), see :mod:`rsepoll.workers`.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import SupportsIndex, Union

from ._rsepoll import (
    Connection,
    ListenerSocket,
    ServerCore,
    TimerHandle,
    __version__,
    make_listener_socket,
    usable_cpus,
)

__all__ = [
    "Connection",
    "ListenerSocket",
    "MessageTooLarge",
    "ProtocolError",
    "Server",
    "TimerHandle",
    "__version__",
    "make_listener_socket",
    "usable_cpus",
]

logger = logging.getLogger("rsepoll")

#: What ``Server.register_listener_socket`` accepts.
AnyListener = Union[ListenerSocket, socket.socket]


class ProtocolError(Exception):
    """A client broke the framing protocol, and its connection was closed.

    Reported through :meth:`Server.on_exception_occurred`; ``conn`` is the
    connection.
    """

    def __init__(self, message: str, conn: Connection) -> None:
        super().__init__(message)
        self.conn = conn


class MessageTooLarge(ProtocolError):
    """A client sent a message larger than ``max_message_size``; its connection
    closes with ``close_reason == "too_large"``."""


class Server(ServerCore):
    """A TCP server whose callbacks run on the thread that calls :meth:`listen`.

    Override the ``on_*`` callbacks; call :meth:`send_message`,
    :meth:`close_connection`, :meth:`pause_reading`, :meth:`resume_reading`
    and :meth:`stop_server` from callbacks or from any other thread.

    Args:
        max_fds: the number of file descriptors the process should be able to
            open. The soft ``RLIMIT_NOFILE`` is raised toward it (never above the
            hard limit; a warning is logged when the hard limit is lower), and
            never lowered.
        backend: ``"auto"``, ``"epoll"`` (Linux only) or ``"portable"`` (the
            fallback poller used on macOS and Windows, available everywhere).
            ``"auto"`` (the default; ``None`` means the same) takes the
            ``RSEPOLL_BACKEND`` environment variable if it is set, else the
            platform's best: ``"epoll"`` on Linux, ``"portable"`` elsewhere.
            ``"epoll"`` where it does not exist raises ``ValueError``. The
            ``backend`` property says which one runs.
        ring_slots: slots in each of the two rings between the threads (a power
            of two; each I/O thread has its own pair). With ``slot_size``,
            this bounds the bytes copied in flight between the threads: the
            I/O thread stops reading, and TCP slows the clients, while the
            Python thread is behind. (Large ``bytes`` sends are lent rather
            than copied; raw-mode reads that fill a slot travel in pooled
            buffers, within the same bound; see *Memory* in docs/api.md.)
        slot_size: bytes per slot. In raw mode a read that fills a slot goes
            on into a pooled 256 KiB buffer, so one ``on_message_received``
            gets up to 256 KiB (or ``slot_size``, if larger). Once a
            connection's reads fill slots, they go into a 128 KiB ``bytes``
            object the callback gets, when the server has one ready (see
            *Messages: framing* in docs/api.md).
        write_buffer_high: reading a connection stops while more than this
            many bytes wait in its output queue, so that a client that sends
            without reading the replies is slowed by TCP itself ...
        write_buffer_low: ... and resumes once at most this many do. The two
            crossings call :meth:`on_writing_paused` and
            :meth:`on_writing_resumed`.
        framing: how the byte stream is cut into messages. ``"raw"``: each
            ``on_message_received`` gets the bytes at hand (one read, up to
            256 KiB), and ``send_message`` sends its bytes as they are.
            ``"line"``: each call gets one line without its ``\\n`` or
            ``\\r\\n``, and ``send_message`` appends ``\\n``. ``"length"``:
            each message is a big-endian unsigned length of ``length_prefix``
            bytes, then that many bytes; each call gets one whole message,
            and ``send_message`` writes the prefix.
        max_message_size: the largest line or declared length a client may
            send (framed modes); a client that sends more is disconnected
            and :class:`MessageTooLarge` goes to ``on_exception_occurred``.
        length_prefix: 4 or 8, the width of the length prefix.
        idle_timeout: seconds without a byte either way after which a
            connection is closed (``close_reason == "idle_timeout"``); None,
            the default, never closes an idle connection.
        max_connections: connections beyond this many are accepted and closed
            at once (counted in ``stats()["connections_rejected"]``, reported
            through ``on_exception_occurred`` at most once a second). Default:
            the file descriptor limit (the soft ``RLIMIT_NOFILE`` once raised
            toward ``max_fds``; ``max_fds`` where there is none) less 32 kept
            for the server's own use (and 3 more per I/O thread beyond the
            first).
        message_timeout: framed modes: seconds within which a message, once
            started, must be complete, else the connection is closed
            (``"message_timeout"``); this defeats clients that announce a
            large message and trickle it. None disables it; raw mode has no
            messages and ignores it.
        io_threads: I/O threads, each with its own poller and rings; the
            callbacks still all run on the thread that calls :meth:`listen`.
            Connections are dealt to the I/O threads in turn as they are
            accepted. ``0``: the inline mode, no I/O thread: the listening
            thread waits in the poller itself, reads, runs the callbacks
            and writes their replies, with no hand-off between threads
            (rsepoll's fastest mode on one CPU; a long callback delays
            reading).
            ``"auto"``: inline if the process may use one CPU only (its
            affinity mask and cgroup CPU quota on Linux, see :func:`usable_cpus`),
            else one I/O thread per usable CPU less one for the callbacks'
            thread (at most 256). None, the default, takes
            ``$RSEPOLL_IO_THREADS`` if set, else inline on one usable CPU
            and one I/O thread on more (more have not been shown to pay:
            see benchmarks/README.md).
    """

    def __init__(
        self,
        max_fds: int = 8192,
        *,
        backend: str | None = "auto",
        ring_slots: int = 512,
        slot_size: int = 16384,
        write_buffer_high: int = 1 << 20,
        write_buffer_low: int = 256 << 10,
        framing: str = "raw",
        max_message_size: int = 1 << 20,
        length_prefix: int = 4,
        idle_timeout: float | None = None,
        message_timeout: float | None = 30.0,
        max_connections: int | None = None,
        io_threads: int | str | None = None,
    ) -> None:
        max_fds = _positive("max_fds", max_fds)
        self.max_fds = max_fds
        fd_limit = _raise_fd_limit(max_fds)
        threads = _io_threads(io_threads)
        if max_connections is None:
            reserved = _RESERVED_FDS + _FDS_PER_IO_THREAD * max(threads - 1, 0)
            max_connections = max(1, fd_limit - reserved)
        else:
            max_connections = _positive("max_connections", max_connections)
        if backend is None or backend == "auto":
            backend = os.environ.get("RSEPOLL_BACKEND") or "auto"
        self._configure(
            backend,
            ring_slots,
            slot_size,
            write_buffer_high,
            write_buffer_low,
            framing,
            max_message_size,
            length_prefix,
            idle_timeout,
            message_timeout,
            max_connections,
            threads,
        )

    def register_listener_socket(self, sock: AnyListener) -> bool:
        """Serves ``sock`` from the next :meth:`listen` on; returns True.

        ``sock`` is a :class:`ListenerSocket` or a bound, listening
        ``socket.socket`` of type ``SOCK_STREAM``. The server keeps its own
        duplicate and closes it when ``listen()`` returns; close yours whenever
        you like. A duplicate shares the socket's blocking mode, so a
        ``socket.socket`` becomes non-blocking (as with asyncio's ``sock=``).
        Several listeners may be registered.
        """
        if isinstance(sock, ListenerSocket):
            self._add_listener(sock)
            return True
        if not isinstance(sock, socket.socket):
            raise TypeError(
                f"expected an rsepoll.ListenerSocket or a socket.socket, not {type(sock).__name__}"
            )
        if sock.fileno() < 0:
            raise ValueError("the socket is closed")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("the socket must be a TCP socket (SOCK_STREAM)")
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError("the socket must be an IPv4 or IPv6 socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError("the socket is not listening: call bind() and listen() first")
        self._add_listener_fd(sock.fileno())
        return True

    def listen(self, timeout: int = 1000, *, handle_signals: bool = True) -> None:
        """Serves the registered listeners on this thread until the server stops.

        It stops on :meth:`stop_server`, on Ctrl-C (which stops as
        ``stop_server()`` does, then raises ``KeyboardInterrupt``; a second
        Ctrl-C resets what is still open), on ``KeyboardInterrupt`` or
        ``SystemExit`` from a callback (raised once the server has stopped),
        and, with ``handle_signals`` on the main thread, on SIGTERM, which
        stops as ``stop_server()`` does and lets ``listen()`` return normally.
        The previous SIGTERM handler is put back when ``listen()`` returns;
        ``handle_signals=False`` leaves signals alone.

        ``timeout`` is the pace, in milliseconds, of
        :meth:`on_waiting_for_activity`.
        """
        with _sigterm_stops(self, handle_signals):
            super().listen(timeout)

    async def serve(self, timeout: int = 1000, *, handle_signals: bool = True) -> None:
        """Serves the registered listeners inside the running asyncio event loop.

        ``await server.serve()`` is :meth:`listen` for asyncio programs: the
        callbacks, timers and ``call_soon_threadsafe`` calls run on the
        loop's thread, between the loop's other callbacks, so they may use
        ``asyncio.get_running_loop()``, create tasks, and so on (but must not
        block it). It returns once the server has stopped: after
        :meth:`stop_server`, or SIGTERM with ``handle_signals`` (through the
        loop's signal handling where it has one). Cancelling the task that
        awaits it stops the server the same way, then lets the cancellation
        through. Works with the standard loops and uvloop; a loop without
        ``add_reader`` (Windows' Proactor loop) is woken through a helper
        thread. Inline (``io_threads=0``, or ``"auto"`` on one CPU), the
        loop watches rsepoll's poller too, and its thread does the network
        I/O; on a loop without ``add_reader``, or on Windows (whose poller
        no loop can watch), an inline server runs one I/O thread instead.
        """
        from ._serving import serve

        await serve(self, timeout, handle_signals)

    # Callbacks. All run on the thread that called listen() (or the event
    # loop's, under serve()).

    def on_listen_success(self) -> None:
        """The server is serving its listeners."""
        logger.debug("listening")

    def on_connection_opened(self, conn: Connection) -> None:
        """A client connected."""
        logger.debug("connection opened: %r", conn)

    def on_message_received(self, conn: Connection, data: bytes) -> None:
        """A message arrived from ``conn``: with ``framing="raw"``, the bytes
        of one read (TCP is a byte stream: one send by the client may arrive
        as several calls, and several sends as one); with ``"line"`` or
        ``"length"``, one whole message. The default echoes it back."""
        self.send_message(conn, data)

    def on_eof_received(self, conn: Connection) -> None:
        """The client shut down its sending side: nothing more will arrive, but
        it may still read. Runs after ``on_message_received`` for everything
        that came before. The default closes the connection once what is
        queued for it has been sent; override it to keep the connection open
        while replies are still being computed (for example in a thread pool),
        and call :meth:`close_connection` when they are sent."""
        self.close_connection(conn)

    def on_writing_paused(self, conn: Connection) -> None:
        """More than ``write_buffer_high`` bytes wait in ``conn``'s output
        queue on the I/O thread: the client reads more slowly than it is
        answered. The server stops reading ``conn`` meanwhile; you may stop
        producing for it until :meth:`on_writing_resumed`. Only the bytes the
        socket did not take count, not sends still on their way to the I/O
        thread: a burst of :meth:`send_message` calls to a client that keeps
        up pauses nothing (``conn.pending_bytes`` counts those sends too, so
        it may be above ``write_buffer_high`` without a pause). Calls alternate with
        ``on_writing_resumed``, in order with the connection's other
        callbacks. The default does nothing."""

    def on_writing_resumed(self, conn: Connection) -> None:
        """``conn``'s output queue, paused before, fell to
        ``write_buffer_low`` bytes or fewer; reading it goes on (unless you
        paused it). Never called after :meth:`on_connection_closed`: a
        connection that ends while paused without its queue draining (a
        reset, an abort, a stop's deadline) gets no resume; a graceful close
        drains the queue, so its resume comes first. The default does
        nothing."""

    def on_connection_closed(self, conn: Connection) -> None:
        """``conn`` closed (whoever closed it); called once per connection."""
        logger.debug("connection closed: %r", conn)

    def on_exception_occurred(self, exc: BaseException) -> None:
        """A callback raised ``exc``, or the server reports a problem of its own:
        :class:`MessageTooLarge` when a client sent too much (its connection
        closes), ``OSError`` when connections were turned away at
        ``max_connections`` or accepting one failed, ``RuntimeError`` when an
        I/O thread failed. The server keeps serving, except after an I/O
        thread failed: then it stops.

        The default logs a callback's exception with its traceback, as
        "exception in an rsepoll callback". The server's own reports were
        never raised, so they have no traceback: it logs each as one line
        that names it, such as "MessageTooLarge: <rsepoll.Connection ...>:
        message too large: ..." (a warning for a client that broke the
        protocol, an error otherwise)."""
        if exc.__traceback__ is not None:
            logger.error("exception in an rsepoll callback", exc_info=exc)
        elif isinstance(exc, ProtocolError):
            logger.warning("%s: %s", type(exc).__name__, exc)
        else:
            logger.error("%s: %s", type(exc).__name__, exc)

    def on_waiting_for_activity(self) -> None:
        """``timeout`` milliseconds passed with nothing to do."""

    def on_stopping(self) -> None:
        """The server has begun to stop (:meth:`stop_server`, Ctrl-C, a
        ``KeyboardInterrupt`` or ``SystemExit`` from a callback, or a failed
        I/O thread): it accepts no new connections. Called once per
        :meth:`listen`, before the stop closes any connection (unless an I/O
        thread failed: the I/O threads then stop on their own), so what you
        send from it still goes out. By default the server has stopped
        reading too, and closes each connection once its queued output is
        out; with ``stop_server(close_connections=False)`` the open
        connections are served as usual until you close each of them (or the
        stop's timeout resets them): this is the cue to finish the work in
        flight and close them. The default does nothing."""

    def on_shutdown_success(self) -> None:
        """The server has stopped: every connection was closed and reported."""
        logger.debug("shut down")


@contextlib.contextmanager
def _sigterm_stops(server: Server, enabled: bool) -> Iterator[None]:
    """While the block runs, SIGTERM calls ``server.stop_server()`` (on the main
    thread, when ``enabled``); the previous handler is put back after."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop_server())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _positive(name: str, value: object) -> int:
    """``value`` as an ``int``, if it is a positive integer; else ValueError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    number = operator.index(value)
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    return number


def _io_threads(io_threads: int | str | None) -> int:
    """The number of I/O threads ``io_threads`` asks for, 0 for the inline
    mode (see :class:`Server`)."""
    if io_threads is None:
        io_threads = os.environ.get("RSEPOLL_IO_THREADS") or (0 if usable_cpus() == 1 else 1)
    if io_threads == "auto":
        cpus = usable_cpus()
        return 0 if cpus == 1 else min(cpus - 1, _MAX_IO_THREADS)
    if isinstance(io_threads, str):
        try:
            io_threads = int(io_threads)
        except ValueError:
            raise ValueError(
                f"io_threads must be 0 (inline), a positive integer or 'auto', got {io_threads!r}"
            ) from None
    if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 0:
        raise ValueError(
            f"io_threads must be 0 (inline), a positive integer or 'auto', got {io_threads!r}"
        )
    return io_threads


#: The most I/O threads a server may have (and ``"auto"`` picks).
_MAX_IO_THREADS = 256

#: File descriptors each I/O thread beyond the first holds (its poller and
#: its waker, with a spare), left out of the default ``max_connections``.
_FDS_PER_IO_THREAD = 3

#: File descriptors the default ``max_connections`` leaves for the server's
#: own use: listeners, the poller, its waker, the reserve descriptor, and the
#: files and sockets the application opens.
_RESERVED_FDS = 32


def _raise_fd_limit(max_fds: int) -> int:
    """Raises the soft RLIMIT_NOFILE toward ``max_fds``, as far as allowed, and
    returns how many descriptors the process may have: the soft limit, raised
    or already higher (``max_fds`` where the system sets no such limit)."""
    if sys.platform == "win32":
        return max_fds
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_fds
    if soft >= max_fds:
        return soft
    target = max_fds if hard == resource.RLIM_INFINITY else min(max_fds, hard)
    if target < max_fds:
        logger.warning(
            "max_fds=%d exceeds the hard RLIMIT_NOFILE (%d); using %d", max_fds, hard, target
        )
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise RLIMIT_NOFILE to %d: %s", target, exc)
        return soft
    return target
