"""``python -m rsepoll PORT``: the reverse server.

Every message a client sends is printed (unless ``--quiet``), reversed and sent
back, so ``nc localhost 9090`` shows each typed line reversed. Messages are
lines by default (``--framing line``); ``--framing raw`` reverses each read
as it arrives, as the original epoll example did, and ``--framing length``
speaks length-prefixed messages. The message ``exit``, exactly (a line
``exit`` ended by ``\\n`` or ``\\r\\n``), ends that client's connection
(``--exit-stops-server``: stops the server).

``--workers N`` runs the server in N processes on one port (Linux only; see
:mod:`rsepoll.workers`).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable, Sequence

from . import Connection, Server, __version__, make_listener_socket
from .workers import WorkerError, WorkersReady, WorkerStartupError, serve_workers

#: The longest partial line kept per connection to recognise "exit".
_LINE_TAIL = 64


class ReverseServer(Server):
    """Reverses each message a client sends (in raw mode, each read)."""

    def __init__(
        self, *, quiet: bool, exit_stops_server: bool, announce: bool = True, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.quiet = quiet
        self.exit_stops_server = exit_stops_server
        #: Print the "listening on" line; with --workers, the supervisor does.
        self.announce = announce
        self.address = ""

    def on_listen_success(self) -> None:
        if not self.announce:
            return
        print(
            f"rsepoll: listening on {self.address}, {self.framing} framing, "
            f"{_io_threads(self.io_threads)} (Ctrl-C to stop)",
            flush=True,
        )

    def on_connection_opened(self, conn: Connection) -> None:
        conn.line_tail = b""

    def on_message_received(self, conn: Connection, data: bytes) -> None:
        if not self.quiet:
            host, port = conn.remote_address or ("?", 0)
            print(f"[{host}:{port}] {data!r}", flush=True)
        if self._is_exit(conn, data):
            if self.exit_stops_server:
                self.stop_server()
            else:
                self.close_connection(conn)
            return
        self.send_message(conn, data[::-1])

    def _is_exit(self, conn: Connection, data: bytes) -> bool:
        """True if ``data`` is the message ``exit``, exactly (in raw mode:
        completes a line that reads ``exit`` once its ``\\n`` or ``\\r\\n`` is
        taken off; a line may arrive in several pieces)."""
        if self.framing != "raw":
            # The line decoder has taken the line end off already.
            return data == b"exit"
        text = conn.line_tail + data
        lines = text.split(b"\n")
        conn.line_tail = lines[-1][-_LINE_TAIL:]
        return any(_without_cr(line) == b"exit" for line in lines[:-1])


def _without_cr(line: bytes) -> bytes:
    """``line`` without the ``\\r`` of a ``\\r\\n`` line end."""
    return line[:-1] if line.endswith(b"\r") else line


def _io_threads(count: int) -> str:
    """``count`` I/O threads in words, for the startup line: "1 I/O thread",
    or "inline (no I/O thread)" for 0."""
    if count == 0:
        return "inline (no I/O thread)"
    return f"{count} I/O thread{'s' if count != 1 else ''}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsepoll",
        description=(
            "Run the rsepoll reverse server: every message a client sends is printed, "
            "reversed and sent back. Try it with: nc localhost PORT"
        ),
        epilog="A client that sends the line 'exit' (that word alone) ends its own "
        "connection. Ctrl-C or SIGTERM stops the server.",
    )
    parser.add_argument("--version", action="version", version=f"rsepoll {__version__}")
    parser.add_argument("port", type=int, help="TCP port to listen on (0 picks a free one)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 or :: for every interface)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not print received messages")
    parser.add_argument(
        "--max-fds",
        type=int,
        default=8192,
        metavar="N",
        help="file descriptors to allow the process (raises RLIMIT_NOFILE; default 8192)",
    )
    parser.add_argument(
        "--exit-stops-server",
        action="store_true",
        help="a client's line 'exit' stops the whole server instead of its connection",
    )
    parser.add_argument(
        "--framing",
        choices=["line", "raw", "length"],
        default="line",
        help="how messages are cut: lines (the default), each read as it comes, "
        "or a 4-byte big-endian length prefix",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="longest line or message a client may send (default 1 MiB)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="close connections with no traffic for this long (default: never)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="turn away connections beyond N (default: the fd limit less 32)",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "epoll", "portable"],
        default="auto",
        help="I/O backend (default: auto, which is $RSEPOLL_BACKEND if set, else epoll on "
        "Linux and portable elsewhere)",
    )
    parser.add_argument(
        "--io-threads",
        default=None,
        metavar="N",
        help="I/O threads feeding the one Python thread: a count, 0 for the inline mode "
        "(the Python thread does the I/O itself), or 'auto' (inline on one usable CPU, "
        "else one per CPU less one; default: $RSEPOLL_IO_THREADS if set, else inline on "
        "one usable CPU and 1 on more)",
    )
    parser.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="serve with N processes sharing the port (SO_REUSEPORT; Linux only; default 1: "
        "this process serves)",
    )
    return parser


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def _fail(message: str) -> int:
    print(f"rsepoll: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        return _fail(f"port must be from 0 to 65535, got {args.port}")
    if args.max_fds <= 0:
        return _fail(f"--max-fds must be positive, got {args.max_fds}")

    def make_server(announce: bool = True) -> ReverseServer:
        return ReverseServer(
            quiet=args.quiet,
            exit_stops_server=args.exit_stops_server,
            announce=announce,
            max_fds=args.max_fds,
            backend=args.backend,
            framing=args.framing,
            max_message_size=args.max_message_size,
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            io_threads=args.io_threads,
        )

    try:
        # With --workers too: a bad option fails here, before any fork.
        server = make_server()
    except ValueError as exc:
        return _fail(str(exc))
    if args.workers > 1:
        return _serve_workers(
            args, lambda: make_server(announce=False), server.framing, server.io_threads
        )
    try:
        listener = make_listener_socket(args.port, args.host)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    server.address = _host_port(*listener.address)
    server.register_listener_socket(listener)
    listener.close()

    # SIGTERM stops the server the way stop_server() does; Ctrl-C arrives as
    # KeyboardInterrupt once the server has shut down.
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop_server())
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()
    print("rsepoll: stopped", file=sys.stderr)
    return 0


def _serve_workers(
    args: argparse.Namespace, make_server: Callable[[], Server], framing: str, io_threads: int
) -> int:
    """``--workers N`` for N > 1: N processes, this one supervising."""

    def announce(ready: WorkersReady) -> None:
        pids = ", ".join(str(pid) for pid in ready.pids)
        print(
            f"rsepoll: listening on {_host_port(*ready.address)}, {framing} framing, "
            f"{_io_threads(io_threads)} per worker, {len(ready.pids)} workers (pids {pids}) "
            "(Ctrl-C to stop)",
            flush=True,
        )

    try:
        serve_workers(make_server, args.port, args.host, workers=args.workers, on_ready=announce)
    except KeyboardInterrupt:
        pass  # Ctrl-C before the supervisor took over SIGINT: nothing had started
    except (OSError, ValueError, NotImplementedError, WorkerStartupError) as exc:
        return _fail(str(exc))
    except WorkerError as exc:
        print(f"rsepoll: error: {exc}", file=sys.stderr)
        return 1
    print("rsepoll: stopped", file=sys.stderr)
    return 0


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main())
