"""Type stubs for the compiled core of rsepoll (``rsepoll._rsepoll``)."""

from collections.abc import Callable
from types import TracebackType
from typing import Any, type_check_only

from typing_extensions import disjoint_base, final

__all__ = [
    "Connection",
    "ListenerSocket",
    "ServeSession",
    "ServerCore",
    "TimerHandle",
    "__version__",
    "make_listener_socket",
    "run_bench",
    "usable_cpus",
]
__version__: str

@final
class TimerHandle:
    """A callback scheduled with ``call_later`` or ``call_at``."""
    def cancel(self) -> None:
        """Cancels the call if it has not run yet; ``cancelled()`` is True from then on."""
    def cancelled(self) -> bool:
        """True once ``cancel()`` was called."""
    def when(self) -> float:
        """When the call is due, on the clock of ``Server.time()``."""

@final
class ServeSession:
    """A server running under an asyncio event loop (see ``Server.serve``)."""
    def turn(self) -> float | None: ...
    def io_fd(self) -> int | None: ...
    def interrupt(self, error: BaseException) -> None: ...
    def finish(self) -> None: ...

@final
class Connection:
    """One client connection, the same object from opened to closed.

    Hashable, usable as a dict key, and able to carry the application's own
    attributes (``conn.name = ...``): it has a ``__dict__``. Not constructible
    from Python.
    """

    __dict__: dict[str, Any]
    # The application's own attributes, in the __dict__: any name but the
    # properties below (which are read-only). For the type checker only: at
    # runtime these are object's.
    @type_check_only
    def __getattr__(self, name: str) -> Any: ...
    @type_check_only
    def __setattr__(self, name: str, value: Any) -> None: ...
    @type_check_only
    def __delattr__(self, name: str) -> None: ...
    @property
    def id(self) -> int:
        """Unique for the server's life (fd numbers are not)."""
    @property
    def fd(self) -> int:
        """The socket's fd, for display; the I/O thread owns the socket."""
    @property
    def remote_address(self) -> tuple[str, int] | None:
        """The peer's ``(host, port)``; None if the client had reset the
        connection before the server accepted it, so that the system no
        longer knew the peer (the connection then closes at once, with
        ``close_reason == "reset"``)."""
    @property
    def local_address(self) -> tuple[str, int] | None:
        """The local ``(host, port)`` the connection arrived on; None only if
        the system would not tell."""
    @property
    def is_open(self) -> bool:
        """False once the connection has closed."""
    @property
    def pending_bytes(self) -> int:
        """Bytes accepted by send_message that the socket has not taken yet."""
    @property
    def close_reason(self) -> str | None:
        """Why it closed (``"peer"``, ``"reset"``, ``"local"``, ``"shutdown"``,
        ...); None while it is open."""

@final
class ListenerSocket:
    """A bound, listening, non-blocking TCP socket (see make_listener_socket)."""

    @property
    def port(self) -> int:
        """The port it listens on (the one the system picked, for port 0)."""
    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` it listens on."""
    @property
    def closed(self) -> bool:
        """True after close()."""
    def fileno(self) -> int:
        """The file descriptor, or -1 once closed."""
    def close(self) -> None:
        """Closes this handle; servers it was registered with keep theirs."""
    def __enter__(self) -> ListenerSocket: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

def make_listener_socket(port: int, host: str = "0.0.0.0", backlog: int = 1024) -> ListenerSocket:
    """A TCP socket bound to ``(host, port)`` and listening; port 0 picks one."""

def usable_cpus() -> int:
    """The CPUs this process may run on, at least 1: on Linux its affinity
    mask and its cgroup CPU quota (``cpu.max``; 1.5 CPUs counts as 1);
    elsewhere the logical CPUs. What ``io_threads="auto"`` picks by."""

def run_bench(
    host: str,
    port: int,
    *,
    mode: str = "rr",
    connections: int = 100,
    size: int = 1024,
    duration: float = 10.0,
    warmup: float = 0.0,
    warmup_until_steady: bool = False,
    warmup_max: float = 10.0,
    steady_tolerance: float = 0.05,
    threads: int = 0,
    verify: str = "echo",
    framing: str = "raw",
    connect_timeout: float = 10.0,
    progress: Callable[[dict[str, Any]], object] | None = None,
    progress_interval: float = 1.0,
    marks: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Runs the load of ``python -m rsepoll.bench`` against ``host`` (an IP
    address) and ``port`` with the GIL released; returns the report.

    With ``warmup_until_steady``, the warm-up goes on after ``warmup`` until
    the rate settles (the last four 0.25 s rates within ``steady_tolerance``,
    a fraction, of their mean), for at most ``warmup_max`` seconds.

    ``progress``, if given, is called about every ``progress_interval``
    seconds with a dict (``phase``, ``elapsed``, ``requests``, ``errors``,
    ``p99_us``). ``marks``, if given, is called with ``"start"`` and then
    ``"end"`` at the edges of the measured time (a run that ends early gets
    them when it ends). Raises ValueError for bad arguments, OSError if no
    connection could be made, KeyboardInterrupt on Ctrl-C. The exception that
    ends a run early (Ctrl-C, or one raised by ``progress`` or ``marks``)
    carries the report of what was measured until then as its ``report``
    attribute, if the run had connected and wound down within a second.
    """

@disjoint_base
class ServerCore:
    """The engine of rsepoll.Server; subclass rsepoll.Server, not this."""

    def __new__(cls, *args: object, **kwargs: object) -> ServerCore: ...
    def _configure(
        self,
        backend: object = None,
        ring_slots: object = None,
        slot_size: object = None,
        write_buffer_high: object = None,
        write_buffer_low: object = None,
        framing: object = None,
        max_message_size: object = None,
        length_prefix: object = None,
        idle_timeout: object = None,
        message_timeout: object = None,
        max_connections: object = None,
        io_threads: object = None,
    ) -> None: ...
    def stats(self) -> dict[str, Any]:
        """The server's counters (see rsepoll.Server.stats)."""
    @property
    def framing(self) -> str:
        """``"raw"``, ``"line"`` or ``"length"``."""
    @property
    def io_threads(self) -> int:
        """How many I/O threads serve the connections (0: inline).

        Under ``serve()`` on a loop that cannot watch the poller (IOCP on
        Windows, or a loop without ``add_reader``), an inline server runs one
        I/O thread for that run, and this still says 0.
        """
    @property
    def backend(self) -> str:
        """The backend that runs: ``"epoll"`` or ``"portable"`` (never ``"auto"``)."""
    @property
    def is_running(self) -> bool:
        """True while listen() or serve() runs."""
    def _add_listener(self, listener: ListenerSocket) -> None: ...
    def _add_listener_fd(self, fd: int) -> None: ...
    def listen(self, timeout: int = 1000) -> None:
        """Serves until stop_server(), Ctrl-C, or KeyboardInterrupt/SystemExit
        from a callback (each stops as stop_server() does; a second one resets
        what is still open); ``timeout`` (ms) paces on_waiting_for_activity."""
    def _serve_session(
        self, wake_fd: int, timeout: int = 1000, watch_fds: bool = True
    ) -> ServeSession: ...
    def time(self) -> float:
        """The timers' clock: monotonic seconds from an arbitrary origin."""
    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """Runs ``callback(*args)`` on the listening thread ``delay`` seconds from now."""
    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """Runs ``callback(*args)`` on the listening thread once ``time()`` reaches ``when``."""
    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> bool:
        """Runs ``callback(*args)`` on the listening thread soon; from any thread.
        False, running nothing, once the server has stopped."""
    def send_message(self, conn: Connection, data: bytes | bytearray | memoryview | str) -> bool:
        """Queues ``data`` for ``conn``; False if it has closed or is closing."""
    def close_connection(self, conn: Connection, abort: bool = False) -> bool:
        """Closes ``conn`` after what is queued for it (FIN), or at once with a
        reset if ``abort``; False if already closed (or closing, without abort)."""
    def pause_reading(self, conn: Connection) -> bool:
        """Stops reading ``conn`` until resume_reading (input already read is
        still delivered; a reset still ends it); False if it has closed."""
    def resume_reading(self, conn: Connection) -> bool:
        """Reads ``conn`` again; False if it has closed."""
    def stop_server(self, timeout: float = 5.0, *, close_connections: bool = True) -> None:
        """Stops listen(): accepting (and, by default, reading) stops and
        on_stopping() runs; then the connections close once their queued
        output is out or, with ``close_connections=False``, are served until
        the application closes them; what is open after ``timeout`` seconds
        is reset. Safe from any thread and from signal handlers."""
