"""Stopping with work in flight (issue 14, item 6).

``stop_server(close_connections=False)`` stops accepting and keeps serving
the open connections until the application has closed each (or the timeout
resets them); ``on_stopping()`` is the application's cue, called once on the
listening thread at the start of any stop. Each test fails on the behaviour
before it: a stop then closed every connection whose reply was still being
computed, so 16 requests in a thread pool got 0 replies.

Each runs on both backends and with two I/O threads, like the rest of the
suite: where it matters, each I/O thread gets connections of its own (they
are dealt out in turn).
"""

from __future__ import annotations

import signal
import socket
import struct
import sys
import textwrap
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import rsepoll
from conftest import (
    ChildProcess,
    LineReader,
    assert_eof,
    connect,
    make_server,
    needs_visible_resets,
    recv_exactly,
    running,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

#: Requests computed in the pool while the server stops.
IN_FLIGHT = 16


class Stopwatch(rsepoll.Server):
    """Echoes (raw mode), and records the lifecycle: ``events`` in callback
    order, the thread ``on_stopping`` ran on, and each close's reason."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[str] = []
        self.conns: list[rsepoll.Connection] = []
        self.stopping_threads: list[int] = []
        self.stopping = threading.Event()
        self.reasons: list[str | None] = []
        self.waits_while_stopping = 0

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.events.append("opened")
        self.conns.append(conn)

    def on_stopping(self) -> None:
        self.events.append("stopping")
        self.stopping_threads.append(threading.get_ident())
        self.stopping.set()

    def on_waiting_for_activity(self) -> None:
        if self.stopping.is_set():
            self.waits_while_stopping += 1

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.events.append("closed")
        self.reasons.append(conn.close_reason)

    def on_shutdown_success(self) -> None:
        self.events.append("shutdown")


class Pooled(Stopwatch):
    """Computes each reply in a thread pool, where it waits for ``release``;
    the pool's thread sends it, then closes the connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = ThreadPoolExecutor(max_workers=IN_FLIGHT)
        self.release = threading.Event()
        self.received: list[bytes] = []
        self.jobs: list[Future[None]] = []

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.received.append(data)
        self.jobs.append(self.pool.submit(self.compute, conn, data))

    def compute(self, conn: rsepoll.Connection, data: bytes) -> None:
        assert self.release.wait(10), "never released"
        assert self.send_message(conn, b"reply to " + data) is True
        assert self.close_connection(conn) is True

    def finish_jobs(self) -> None:
        """Lets the pool go and raises what a job raised."""
        self.release.set()
        self.pool.shutdown(wait=True)
        for job in self.jobs:
            job.result()


def frame(framing: str, payload: bytes) -> bytes:
    if framing == "line":
        return payload + b"\n"
    return struct.pack(">I", len(payload)) + payload


def read_framed(framing: str, sock: socket.socket) -> bytes:
    if framing == "line":
        return LineReader(sock).readline()
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, length)


def clients_for(server: Any, port: int, per_thread: int = 2) -> list[socket.socket]:
    """Connections, ``per_thread`` per I/O thread (inline: per engine), all
    opened by the server."""
    clients = [connect(port) for _ in range(per_thread * max(server.io_threads, 1))]
    assert wait_until(lambda: len(server.conns) == len(clients), 5.0)
    return clients


@pytest.mark.parametrize("framing", ["length", "line"])
def test_replies_computed_in_a_pool_all_arrive_when_the_stop_keeps_the_connections(
    framing: str,
) -> None:
    with running(Pooled, framing=framing) as (server, port):
        try:
            clients = [connect(port) for _ in range(IN_FLIGHT)]
            for i, client in enumerate(clients):
                client.sendall(frame(framing, b"request %d" % i))
            assert wait_until(lambda: len(server.received) == IN_FLIGHT, 5.0)
            # A timeout far beyond the test's: listen() must end because the
            # application closed the connections, not at the deadline.
            server.stop_server(60.0, close_connections=False)
            assert server.stopping.wait(5.0)
            server.release.set()
            for i, client in enumerate(clients):
                assert read_framed(framing, client) == b"reply to request %d" % i
                assert_eof(client)
                client.close()
            server.test_thread.join(5.0)
            assert server.test_thread.returned
        finally:
            server.finish_jobs()
    assert server.reasons == ["local"] * IN_FLIGHT
    assert server.events.count("stopping") == 1
    assert server.events[-1] == "shutdown"


def test_new_clients_are_refused_while_the_kept_connections_are_served() -> None:
    with running(Pooled) as (server, port):
        try:
            # The server keeps a duplicate of the listener, which the stop
            # closes; ours would keep the port listening.
            server.test_listener.close()
            kept = clients_for(server, port)
            server.stop_server(60.0, close_connections=False)
            assert server.stopping.wait(5.0)

            def refused() -> bool:
                # The I/O thread closes the listeners within a turn of the
                # request; a client accepted before that ends at its EOF.
                try:
                    connect(port, timeout=2.0).close()
                except ConnectionRefusedError:
                    return True
                return False

            assert wait_until(refused, 5.0), "a new client was still accepted"
            assert server.test_thread.is_alive()
            # The kept connections are served as usual, and end when the
            # application closes them.
            server.release.set()
            for i, client in enumerate(kept):
                client.sendall(b"after the stop %d" % i)
                expected = b"reply to after the stop %d" % i
                assert recv_exactly(client, len(expected)) == expected
                assert_eof(client)
                client.close()
            server.test_thread.join(5.0)
            assert server.test_thread.returned
        finally:
            server.finish_jobs()
    assert [conn.close_reason for conn in server.conns[: len(kept)]] == ["local"] * len(kept)


@pytest.mark.parametrize("close_connections", [True, False])
def test_on_stopping_runs_once_on_the_listening_thread_before_any_close(
    close_connections: bool,
) -> None:
    with running(Stopwatch) as (server, port):
        clients = clients_for(server, port)
        stoppers = [
            threading.Thread(
                target=server.stop_server, kwargs={"close_connections": close_connections}
            )
            for _ in range(4)
        ]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(5.0)
        assert server.stopping.wait(5.0)
        if not close_connections:
            assert server.test_thread.is_alive()
            for conn in list(server.conns):
                server.close_connection(conn)
        for client in clients:
            assert_eof(client)
            client.close()
        server.test_thread.join(5.0)
        assert server.test_thread.returned
    assert server.stopping_threads == [server.test_listen_ident]
    # The cue comes before the stop closes anything.
    n = len(clients)
    assert server.events == ["opened"] * n + ["stopping"] + ["closed"] * n + ["shutdown"]
    assert server.reasons == ["shutdown" if close_connections else "local"] * n


class SayingGoodbye(Stopwatch):
    """Says goodbye to every open connection when the server begins to stop
    (and, keeping them, closes them)."""

    close_them = False

    def on_stopping(self) -> None:
        super().on_stopping()
        self.sent = [self.send_message(conn, b"goodbye") for conn in self.conns]
        if self.close_them:
            for conn in self.conns:
                self.close_connection(conn)


@pytest.mark.parametrize("close_connections", [True, False])
def test_what_on_stopping_sends_goes_out_before_the_connections_close(
    close_connections: bool,
) -> None:
    class Server(SayingGoodbye):
        close_them = not close_connections

    with running(Server) as (server, port):
        clients = clients_for(server, port)
        server.stop_server(60.0, close_connections=close_connections)
        for client in clients:
            assert recv_exactly(client, 7) == b"goodbye"
            assert_eof(client)
            client.close()
        server.test_thread.join(5.0)
        assert server.test_thread.returned
    assert server.sent == [True] * len(clients)


@pytest.mark.parametrize("close_connections", [True, False])
def test_a_stop_before_listen_makes_it_return_at_once(close_connections: bool) -> None:
    server = make_server(Stopwatch)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    listener.close()
    server.stop_server(60.0, close_connections=close_connections)
    done = threading.Event()

    def listen() -> None:
        server.listen()
        done.set()

    threading.Thread(target=listen, daemon=True).start()
    assert done.wait(5.0), "listen() did not return"
    assert server.stopping_threads == [server.test_listen_ident]
    assert server.events == ["stopping", "shutdown"]
    assert server.test_errors == []


TIMEOUT = 1.0


@needs_visible_resets
def test_the_timeout_resets_the_connections_the_application_never_closes() -> None:
    with running(Stopwatch, listen_timeout=100) as (server, port):
        clients = clients_for(server, port)
        began = time.monotonic()
        server.stop_server(TIMEOUT, close_connections=False)
        # Until the deadline they are served as usual.
        for client in clients:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
        server.test_thread.join(TIMEOUT + 5.0)
        took = time.monotonic() - began
        assert server.test_thread.returned
        for client in clients:
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            client.close()
    assert TIMEOUT <= took < TIMEOUT + 1.0, f"listen() returned after {took:.2f} s"
    assert server.reasons == ["shutdown"] * len(clients)
    assert server.events.count("stopping") == 1
    # Idle, the kept connections are waited on as usual.
    assert server.waits_while_stopping > 0


class Flooding(Stopwatch):
    """Answers a message with more than the socket takes."""

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.send_message(conn, b"x" * (8 << 20))


@needs_visible_resets
@pytest.mark.parametrize(
    ("first", "second", "counts_from"),
    [(TIMEOUT, 60.0, "first"), (60.0, TIMEOUT, "second")],
)
def test_a_stop_that_closes_the_connections_turns_a_kept_one_into_a_drain(
    first: float, second: float, counts_from: str
) -> None:
    """A second stop_server() that closes the connections drains them (FIN
    once their output is out), by the earlier of the two deadlines; a
    connection whose output cannot go out is reset then."""
    with running(Flooding) as (server, port):
        idle = clients_for(server, port)
        stuck = connect(port, rcvbuf=4096)
        assert wait_until(lambda: len(server.conns) == len(idle) + 1, 5.0)
        stuck.sendall(b"go")
        began = time.monotonic()
        server.stop_server(first, close_connections=False)
        assert server.stopping.wait(5.0)
        time.sleep(0.2)
        assert server.test_thread.is_alive()
        escalated = time.monotonic()
        server.stop_server(second)
        for client in idle:
            assert_eof(client)
            client.close()
        server.test_thread.join(TIMEOUT + 5.0)
        ended = time.monotonic()
        assert server.test_thread.returned
        with pytest.raises(ConnectionResetError):
            while stuck.recv(1 << 20):
                pass
        stuck.close()
    took = ended - (began if counts_from == "first" else escalated)
    assert TIMEOUT <= took < TIMEOUT + 1.0, f"the stuck client was reset after {took:.2f} s"
    assert server.reasons == ["shutdown"] * (len(idle) + 1)
    assert server.stopping_threads == [server.test_listen_ident]


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys

    import rsepoll

    class S(rsepoll.Server):
        def on_listen_success(self):
            print("READY", flush=True)

        def on_message_received(self, conn, data):
            self.stop_server(60.0, close_connections=False)

        def on_stopping(self):
            print("STOPPING", flush=True)

        def on_connection_closed(self, conn):
            print("CLOSED", conn.close_reason, flush=True)

    server = S()
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    listener.close()
    print("PORT", listener.port, flush=True)
    try:
        server.listen()
    except KeyboardInterrupt:
        print("KI", flush=True)
        sys.exit(0)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (SIGINT by kill)")
def test_ctrl_c_turns_a_kept_stop_into_a_drain(tmp_path) -> None:
    """Ctrl-C stops as stop_server() does, so it drains the connections a
    stop keeps: they end with FIN at once, not at the kept stop's 60 s."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    with ChildProcess([sys.executable, str(script)]) as child:
        port = int(child.wait_for_output(r"PORT (\d+)").group(1))
        child.wait_for_output("READY")
        client = connect(port)
        client.sendall(b"stop")
        child.wait_for_output("STOPPING")
        child.signal(signal.SIGINT)
        assert_eof(client)
        client.close()
        assert child.wait(10) == 0
        assert child.stdout.count("STOPPING") == 1
        assert "CLOSED shutdown" in child.stdout
        assert "KI" in child.stdout
