"""Honest endings: every close has a reason, a close is ordered behind the
sends before it, an abort is a reset, and stopping drains output within a
deadline and resets what it could not send.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

import pytest
import rsepoll
from conftest import (
    connect,
    needs_visible_resets,
    recv_exactly,
    recv_until_eof,
    running,
    wait_until,
)


class Recorder(rsepoll.Server):
    """Echoes, and records each closed connection's reason."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reasons: dict[int, str | None] = {}
        self.opened: list[rsepoll.Connection] = []
        self.received = 0

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        assert conn.close_reason is None
        self.opened.append(conn)

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.received += len(data)
        self.send_message(conn, data)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.reasons[conn.id] = conn.close_reason


def reset(sock: socket.socket) -> None:
    """Closes ``sock`` with a reset instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def first_conn(server: Recorder) -> rsepoll.Connection:
    assert wait_until(lambda: server.opened, 5.0), "no connection opened"
    return server.opened[0]


def closed_reason(server: Recorder, conn: rsepoll.Connection) -> str | None:
    assert wait_until(lambda: conn.id in server.reasons, 5.0), "on_connection_closed not called"
    return server.reasons[conn.id]


def test_a_client_that_ends_the_conversation_is_reported_as_peer() -> None:
    with running(Recorder) as (server, port):
        client = connect(port)
        client.sendall(b"bye")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b"bye"
        client.close()
        assert closed_reason(server, first_conn(server)) == "peer"


def test_close_connection_is_reported_as_local_and_ends_with_fin() -> None:
    with running(Recorder) as (server, port):
        client = connect(port)
        conn = first_conn(server)
        assert server.send_message(conn, b"last words")
        assert server.close_connection(conn) is True
        assert recv_until_eof(client) == b"last words"
        assert closed_reason(server, conn) == "local"
        client.close()


def test_a_reset_after_a_half_close_is_noticed_without_sending() -> None:
    class Patient(Recorder):
        def on_eof_received(self, conn: rsepoll.Connection) -> None:
            pass  # keep the connection open, as an app answering from a pool would

    with running(Patient) as (server, port):
        client = connect(port)
        client.sendall(b"x")
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 1) == b"x"
        conn = first_conn(server)
        time.sleep(0.1)
        assert conn.id not in server.reasons
        reset(client)
        assert closed_reason(server, conn) == "reset"
        assert server.send_message(conn, b"late") is False


@needs_visible_resets
def test_abort_resets_the_connection_and_drops_the_queue() -> None:
    # A small receive window keeps most of the reply in the server's queue.
    with running(Recorder) as (server, port), connect(port, rcvbuf=4096) as client:
        conn = first_conn(server)
        assert server.send_message(conn, b"x" * (8 << 20))
        assert server.close_connection(conn, abort=True) is True
        with pytest.raises(ConnectionResetError):
            recv_until_eof(client, limit=16 << 20)
        assert closed_reason(server, conn) == "local"
        assert server.close_connection(conn, abort=True) is False


@needs_visible_resets
def test_abort_cuts_a_graceful_close_short() -> None:
    with running(Recorder) as (server, port), connect(port, rcvbuf=4096) as client:
        conn = first_conn(server)
        assert server.send_message(conn, b"y" * (8 << 20))
        assert server.close_connection(conn) is True
        assert server.close_connection(conn) is False
        assert server.close_connection(conn, abort=True) is True
        # The client reads only once the abort has landed: a client reading
        # at once could let the graceful close finish (all 8 MiB and FIN
        # out) before the I/O thread gets to the abort, and a reset behind a
        # FIN reads as EOF (see close_connection in docs/api.md). Unread, at
        # most the socket buffers' few MiB leave, so only the abort can have
        # ended it.
        assert closed_reason(server, conn) == "local"
        with pytest.raises(ConnectionResetError):
            recv_until_eof(client, limit=16 << 20)


def test_send_after_close_connection_returns_false_from_any_thread() -> None:
    with running(Recorder) as (server, port):
        client = connect(port)
        conn = first_conn(server)
        assert server.close_connection(conn) is True
        assert server.send_message(conn, b"too late") is False
        results: list[bool] = []
        t = threading.Thread(target=lambda: results.append(server.send_message(conn, b"no")))
        t.start()
        t.join(5)
        assert results == [False]
        assert recv_until_eof(client) == b""
        client.close()


def test_a_racing_send_either_arrives_whole_before_fin_or_returns_false() -> None:
    """Threads send numbered messages while another closes: every message
    whose send returned True arrives whole, and nothing else arrives."""
    message = 1000

    class Quiet(Recorder):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            pass

    with running(Quiet) as (server, port):
        for _ in range(20):
            server.opened.clear()
            client = connect(port)
            conn = first_conn(server)
            accepted: list[list[int]] = [[], []]
            go = threading.Event()

            def sender(
                worker: int,
                conn: rsepoll.Connection = conn,
                go: threading.Event = go,
                accepted: list[list[int]] = accepted,
            ) -> None:
                go.wait(5)
                for i in range(200):
                    tag = worker * 1000 + i
                    payload = struct.pack(">I", tag) * (message // 4)
                    if server.send_message(conn, payload):
                        accepted[worker].append(tag)

            threads = [threading.Thread(target=sender, args=(w,)) for w in (0, 1)]
            for t in threads:
                t.start()
            go.set()
            time.sleep(0.0005)
            assert server.close_connection(conn)
            for t in threads:
                t.join(10)
            data = recv_until_eof(client)
            client.close()
            assert len(data) % message == 0, "a message was cut"
            got = [struct.unpack(">I", data[i : i + 4])[0] for i in range(0, len(data), message)]
            for i in range(0, len(data), message):
                assert data[i : i + message] == data[i : i + 4] * (message // 4)
            assert sorted(got) == sorted(accepted[0] + accepted[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIOCOUTQ is Linux-only")
def test_input_already_received_is_delivered_when_a_send_fails() -> None:
    """The client sends without reading the echoes until the server stops
    taking more (its output queue is full), then closes with unread data, so
    its kernel resets the connection. Every byte that left the client must
    still reach on_message_received before the close is reported."""
    import fcntl
    import termios

    with running(Recorder) as (server, port):
        client = connect(port, rcvbuf=8192)
        client.setblocking(False)
        chunk = b"z" * 65536
        sent = 0
        last_progress = time.monotonic()
        deadline = last_progress + 30
        while time.monotonic() - last_progress < 0.5:
            assert time.monotonic() < deadline
            try:
                sent += client.send(chunk)
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.005)
        # Bytes still in the client's kernel (unsent or unacknowledged) die
        # with the reset; everything else sits in the server's kernel.
        outq = bytearray(4)
        fcntl.ioctl(client.fileno(), termios.TIOCOUTQ, outq)
        left_the_client = sent - struct.unpack("i", outq)[0]
        assert left_the_client > 1 << 20
        client.close()  # unread echoes: the client's kernel sends RST
        conn = first_conn(server)
        assert closed_reason(server, conn) == "reset"
        assert server.received == left_the_client


def test_stop_server_flushes_queued_output_to_a_client_that_reads_late() -> None:
    payload = bytes(range(256)) * (8 << 12)  # 8 MiB
    with running(Recorder) as (server, port):
        client = connect(port, rcvbuf=4096)
        conn = first_conn(server)
        assert server.send_message(conn, payload)
        stopper = threading.Thread(target=server.stop_server, kwargs={"timeout": 10.0})
        started = time.monotonic()
        stopper.start()
        time.sleep(0.2)  # the stop is under way before the client reads
        assert server.test_thread.is_alive()
        assert recv_until_eof(client, limit=16 << 20) == payload
        client.close()
        server.test_thread.join(10)
        assert time.monotonic() - started < 10
        assert closed_reason(server, conn) == "shutdown"


@needs_visible_resets
def test_stop_server_resets_a_client_that_never_reads_after_the_timeout() -> None:
    with running(Recorder) as (server, port):
        client = connect(port, rcvbuf=4096)
        conn = first_conn(server)
        assert server.send_message(conn, b"w" * (8 << 20))
        started = time.monotonic()
        server.stop_server(timeout=0.5)
        server.test_thread.join(5)
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 3.0, f"listen() returned after {elapsed:.2f} s"
        assert closed_reason(server, conn) == "shutdown"
        with pytest.raises(ConnectionResetError):
            recv_until_eof(client, limit=16 << 20)
        client.close()


def test_stop_server_answers_input_already_read_and_refuses_new_connections() -> None:
    """Callbacks for input read before the stop still run and their replies
    go out; the listener closes at once."""
    release = threading.Event()

    class Slow(Recorder):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            release.wait(5)
            self.send_message(conn, data.upper())

    with running(Slow) as (server, port):
        server.test_listener.close()  # the server's own duplicate stays open
        client = connect(port)
        client.sendall(b"ping")
        first_conn(server)
        time.sleep(0.1)  # the callback is running, blocked on `release`
        threading.Thread(target=server.stop_server).start()
        time.sleep(0.1)
        with pytest.raises(ConnectionRefusedError):
            connect(port, timeout=1.0).close()
        release.set()
        assert recv_until_eof(client) == b"PING"
        client.close()


def test_stop_server_rejects_a_negative_timeout() -> None:
    server = rsepoll.Server()
    with pytest.raises(ValueError, match="non-negative"):
        server.stop_server(timeout=-1)


def test_stop_server_still_answers_framed_messages_a_decoder_holds() -> None:
    """A client pipelines many lines that arrive in one read; the server stops
    from the first callback. Every line it had read is still delivered and
    answered, although only part of them fit in the ring at once."""
    lines = 2000

    class StopEarly(Recorder):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            if self.received == 0:
                self.stop_server()
            self.received += 1
            self.send_message(conn, data)

    with running(StopEarly, framing="line") as (server, port):
        client = connect(port)
        wire = b"".join(b"line %5d\n" % i for i in range(lines))
        client.sendall(wire)
        assert recv_until_eof(client) == wire
        client.close()
        server.test_thread.join(5)
        assert server.received == lines


@needs_visible_resets
def test_an_idle_timeout_on_a_client_that_reads_nothing_ends_in_a_reset() -> None:
    """The idle close cannot flush to a client that reads nothing; it must not
    wait for ever: without progress it becomes a reset."""
    with running(Recorder, idle_timeout=0.5) as (server, port):
        client = connect(port, rcvbuf=4096)
        conn = first_conn(server)
        assert server.send_message(conn, b"q" * (8 << 20))
        assert wait_until(lambda: conn.id in server.reasons, 10.0)
        assert server.reasons[conn.id] == "idle_timeout"
        with pytest.raises(ConnectionResetError):
            recv_until_eof(client, limit=16 << 20)
        client.close()


def test_no_spin_while_a_too_large_client_that_ended_waits_for_its_close() -> None:
    """A client sends an oversized line and shuts down its side; while the
    application takes its time over the report, the I/O thread must not spin
    on the ended connection."""
    cpu: list[float] = []

    class Slow(Recorder):
        def on_exception_occurred(self, exc: BaseException) -> None:
            started = time.process_time()
            time.sleep(0.5)
            cpu.append(time.process_time() - started)

    with running(Slow, framing="line", max_message_size=100, expect_errors=True) as (
        _server,
        port,
    ):
        client = connect(port)
        client.sendall(b"z" * 1000)
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b""
        client.close()
    assert cpu, "no report of the oversized line"
    assert cpu[0] < 0.2, f"{cpu[0]:.2f} s of CPU while the listening thread slept 0.5 s"
