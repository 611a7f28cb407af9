"""Connection lifecycle: closing, exactly-once callbacks, errors, stop, fd reuse."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time

import pytest
import rsepoll
from conftest import (
    assert_eof,
    connect,
    make_server,
    recv_exactly,
    recv_until_eof,
    running,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


class Recorder(rsepoll.Server):
    """Records lifecycle events; echoes unless told otherwise."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.events = []  # (kind, conn) in callback order
        self.conns = []  # in opening order
        self.shutdowns = 0
        self.idents = set()

    def _note(self, kind, conn):
        self.idents.add(threading.get_ident())
        self.events.append((kind, conn))

    def on_connection_opened(self, conn):
        self._note("opened", conn)
        self.conns.append(conn)

    def on_message_received(self, conn, data):
        self._note("message", conn)
        self.handle(conn, data)

    def handle(self, conn, data):
        self.send_message(conn, data)

    def on_connection_closed(self, conn):
        self._note("closed", conn)

    def on_shutdown_success(self):
        self.idents.add(threading.get_ident())
        self.shutdowns += 1
        self.events.append(("shutdown", None))

    def count(self, kind, conn=None):
        return sum(1 for k, c in self.events if k == kind and (conn is None or c is conn))

    def assert_lifecycle(self):
        """Per connection: opened first, closed exactly once and last."""
        for conn in self.conns:
            mine = [k for k, c in self.events if c is conn]
            assert mine[0] == "opened", mine
            assert mine.count("opened") == 1, mine
            assert mine.count("closed") == 1, mine
            assert mine[-1] == "closed", mine


def _records_mentioning(caplog, text):
    found = []
    for r in caplog.records:
        blob = r.getMessage() + (r.exc_text or "")
        if r.exc_info and r.exc_info[1] is not None:
            blob += repr(r.exc_info[1])
        if text in blob:
            found.append(r)
    return found


def linger_reset(sock: socket.socket) -> None:
    """Close so that the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------------


class BigThenClose(Recorder):
    def __init__(self, payload, *a, **kw):
        super().__init__(*a, **kw)
        self.payload = payload
        self.results = []

    def handle(self, conn, data):
        step = 256 * 1024
        for i in range(0, len(self.payload), step):
            self.results.append(self.send_message(conn, self.payload[i : i + step]))
        self.close_connection(conn)


def test_close_connection_flushes_queued_bytes_then_eof():
    payload = os.urandom(4 * MiB)
    with running(BigThenClose, payload) as (server, port):
        with connect(port, rcvbuf=64 * 1024) as c:
            c.sendall(b"G")
            got = recv_until_eof(c, limit=len(payload))
        assert got == payload
        assert all(server.results) and len(server.results) == 16
        assert wait_until(lambda: server.count("closed") == 1)
        server.assert_lifecycle()


class CloseOnBye(Recorder):
    def handle(self, conn, data):
        if data.strip() == b"bye":
            self.send_message(conn, b"see you")
            self.close_connection(conn)
        else:
            self.send_message(conn, data)


def test_on_connection_closed_exactly_once_client_and_server_close():
    with running(CloseOnBye) as (server, port):
        a = connect(port)
        b = connect(port)
        r = connect(port)
        try:
            for s in (a, b, r):
                s.sendall(b"hi")
                assert recv_exactly(s, 2) == b"hi"
            assert wait_until(lambda: server.count("opened") == 3)
            a.close()  # client closes (FIN)
            b.sendall(b"bye")  # server closes
            assert recv_exactly(b, 7) == b"see you"
            assert_eof(b)
            linger_reset(r)  # client resets (RST)
            assert wait_until(lambda: server.count("closed") == 3)
            # A later connection is unaffected; no late duplicate callbacks.
            with connect(port) as d:
                d.sendall(b"later")
                assert recv_exactly(d, 5) == b"later"
            assert wait_until(lambda: server.count("closed") == 4)
        finally:
            for s in (a, b, r):
                s.close()
        assert server.count("closed") == 4
        assert all(not conn.is_open for conn in server.conns)
        server.assert_lifecycle()


class Raiser(Recorder):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []
        self.seen_idents = set()

    def on_connection_opened(self, conn):
        super().on_connection_opened(conn)
        if len(self.conns) == 1:
            raise LookupError("opened-boom")

    def handle(self, conn, data):
        if data.startswith(b"boom"):
            raise ValueError("boom!")
        self.send_message(conn, data)

    def on_exception_occurred(self, exc):
        self.seen.append(exc)
        self.seen_idents.add(threading.get_ident())


def test_callback_exception_goes_to_on_exception_occurred_and_serving_continues():
    with running(Raiser, expect_errors=True) as (server, port):
        a = connect(port)
        b = connect(port)
        try:
            # on_connection_opened raised for the first connection: still served.
            assert wait_until(lambda: len(server.seen) == 1)
            assert isinstance(server.seen[0], LookupError)
            assert server.seen[0].args == ("opened-boom",)
            a.sendall(b"boom")
            assert wait_until(lambda: len(server.seen) == 2)
            exc = server.seen[1]
            assert isinstance(exc, ValueError)
            assert exc.args == ("boom!",)
            assert exc.__traceback__ is not None
            # Same connection stays open and is served.
            a.sendall(b"after")
            assert recv_exactly(a, 5) == b"after"
            b.sendall(b"other")
            assert recv_exactly(b, 5) == b"other"
            assert server.count("closed") == 0
            assert server.seen_idents == {server.test_thread.ident}
        finally:
            a.close()
            b.close()
        assert wait_until(lambda: server.count("closed") == 2)
    server.assert_lifecycle()
    assert len(server.seen) == 2


class DefaultHandlerRaiser(rsepoll.Server):
    def on_message_received(self, conn, data):
        if data.startswith(b"kaboom"):
            raise ValueError("kaboom-default-handler")
        self.send_message(conn, data)


def test_default_on_exception_occurred_logs_with_traceback(caplog):
    caplog.set_level(logging.DEBUG, logger="rsepoll")
    with running(DefaultHandlerRaiser, expect_errors=True) as (_, port), connect(port) as c:
        c.sendall(b"kaboom")
        assert wait_until(lambda: "kaboom-default-handler" in caplog.text)
        c.sendall(b"alive")
        assert recv_exactly(c, 5) == b"alive"
    records = _records_mentioning(caplog, "kaboom-default-handler")
    assert records, caplog.text
    assert all(r.name == "rsepoll" or r.name.startswith("rsepoll.") for r in records)
    assert any(r.levelno >= logging.ERROR for r in records)
    assert "Traceback" in caplog.text
    assert [r.getMessage() for r in records] == ["exception in an rsepoll callback"]


class DoubleFault(Recorder):
    def handle(self, conn, data):
        if data.startswith(b"boom"):
            raise ValueError("first-fault")
        self.send_message(conn, data)

    def on_exception_occurred(self, exc):
        raise RuntimeError("second-fault-in-handler")


def test_exception_inside_on_exception_occurred_is_logged_and_serving_continues(caplog):
    caplog.set_level(logging.DEBUG, logger="rsepoll")
    with running(DoubleFault, expect_errors=True) as (server, port):
        a, b = connect(port), connect(port)
        try:
            a.sendall(b"boom")
            assert wait_until(lambda: "second-fault-in-handler" in caplog.text)
            a.sendall(b"still")
            assert recv_exactly(a, 5) == b"still"
            b.sendall(b"here")
            assert recv_exactly(b, 4) == b"here"
            assert server.count("closed") == 0
        finally:
            a.close()
            b.close()
    names = {r.name for r in _records_mentioning(caplog, "second-fault-in-handler")}
    assert any(n == "rsepoll" or n.startswith("rsepoll.") for n in names), names


def _under_rsepoll(name: str) -> bool:
    return name == "rsepoll" or name.startswith("rsepoll.")


def test_every_log_record_of_a_run_is_under_the_rsepoll_logger(caplog):
    caplog.set_level(logging.DEBUG)  # on the root: every logger's records
    with running() as (_, port), connect(port) as c:
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
    names = {r.name for r in caplog.records}
    assert all(_under_rsepoll(name) for name in names), names
    # The core's own record, from Rust, is among them.
    assert any("listener" in r.getMessage() for r in caplog.records), caplog.text


def test_the_default_handler_says_a_message_was_too_large(caplog):
    caplog.set_level(logging.DEBUG, logger="rsepoll")
    with running(framing="line", max_message_size=16, expect_errors=True) as (server, port):
        with connect(port) as c:
            c.sendall(b"x" * 100 + b"\n")
            assert recv_until_eof(c) == b""
        assert wait_until(lambda: server.test_errors)
    [error] = server.test_errors
    assert type(error) is rsepoll.MessageTooLarge  # what users catch is unchanged
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = record.getMessage()
    assert message.startswith("MessageTooLarge: <rsepoll.Connection id="), message
    assert "exceeds max_message_size of 16 bytes" in message, message
    assert "callback" not in message and record.exc_info is None, caplog.text
    assert _under_rsepoll(record.name)


def test_the_default_handler_says_connections_were_turned_away(caplog):
    caplog.set_level(logging.DEBUG, logger="rsepoll")
    with running(max_connections=1, expect_errors=True) as (server, port), connect(port) as first:
        first.sendall(b"a")
        assert recv_exactly(first, 1) == b"a"
        with connect(port) as second:
            assert wait_until(lambda: server.test_errors)
            with contextlib.suppress(ConnectionResetError):
                assert second.recv(1) == b""
    error = server.test_errors[0]
    assert type(error) is OSError  # what users catch is unchanged
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert records, caplog.text
    message = records[0].getMessage()
    assert message.startswith("OSError: max_connections (1) reached: turned away 1 "), message
    assert "callback" not in message and records[0].exc_info is None, caplog.text
    assert _under_rsepoll(records[0].name)


class StopByException(Recorder):
    def __init__(self, exc_type, *a, **kw):
        super().__init__(*a, **kw)
        self.exc_type = exc_type

    def handle(self, conn, data):
        if data.startswith(b"kill"):
            raise self.exc_type()
        self.send_message(conn, data)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_propagate_out_of_listen(exc_type):
    server = make_server(StopByException, exc_type)
    ls = rsepoll.make_listener_socket(0, "127.0.0.1")
    try:
        server.register_listener_socket(ls)
        st = start(server)
        a = connect(ls.port)
        b = connect(ls.port)
        try:
            for s in (a, b):
                s.sendall(b"x")
                assert recv_exactly(s, 1) == b"x"
            a.sendall(b"kill")
            st.join(5)
            assert isinstance(st.exc, exc_type), repr(st.exc)
            assert not st.returned
            # Connections were closed by the server: both clients see EOF.
            assert_eof(a)
            assert_eof(b)
        finally:
            a.close()
            b.close()
            if st.is_alive():
                server.stop_server()
                st.join(5)
        assert server.count("closed") == 2
        server.assert_lifecycle()
    finally:
        ls.close()


def test_stop_server_from_another_thread_closes_every_connection():
    with running(Recorder) as (server, port):
        clients = [connect(port) for _ in range(10)]
        try:
            for i, c in enumerate(clients):
                msg = f"client {i}".encode()
                c.sendall(msg)
                assert recv_exactly(c, len(msg)) == msg
            assert wait_until(lambda: server.count("opened") == 10)
            stopper = threading.Thread(target=server.stop_server, daemon=True)
            stopper.start()
            stopper.join(5)
            assert not stopper.is_alive()
            server.test_thread.join(5)
            assert server.test_thread.returned
            for c in clients:
                assert_eof(c)
        finally:
            for c in clients:
                c.close()
    assert server.shutdowns == 1
    assert server.count("closed") == 10
    assert {id(c) for k, c in server.events if k == "closed"} == {id(c) for c in server.conns}
    # on_shutdown_success comes after every on_connection_closed.
    assert server.events[-1] == ("shutdown", None)
    assert server.idents == {server.test_thread.ident}
    server.assert_lifecycle()
    # Our ListenerSocket is closed by running() and the server closed its
    # duplicate when listen() returned: nothing listens any more.
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2)


def test_stop_while_clients_close_concurrently_still_exactly_once():
    with running(Recorder) as (server, port):
        clients = [connect(port) for _ in range(20)]
        try:
            for c in clients:
                c.sendall(b"x")
                assert recv_exactly(c, 1) == b"x"
            assert wait_until(lambda: server.count("opened") == 20)
            barrier = threading.Barrier(2)

            def close_half():
                barrier.wait(5)
                for c in clients[:10]:
                    c.close()

            t = threading.Thread(target=close_half, daemon=True)
            t.start()
            barrier.wait(5)
            server.stop_server()
            t.join(5)
            server.test_thread.join(5)
        finally:
            for c in clients:
                c.close()
    assert server.count("closed") == 20
    assert server.shutdowns == 1
    server.assert_lifecycle()


class Keeper(Recorder):
    def handle(self, conn, data):
        pass  # never replies on its own


def test_fd_reuse_does_not_leak_data_to_new_connection():
    with running(Keeper) as (server, port):
        with connect(port):
            assert wait_until(lambda: server.count("opened") == 1)
        a = server.conns[0]
        assert wait_until(lambda: server.count("closed", a) == 1)
        assert not a.is_open
        with connect(port) as cb:
            assert wait_until(lambda: server.count("opened") == 2)
            b = server.conns[1]
            assert b is not a
            assert b.id != a.id
            assert b.is_open
            assert a != b
            # Stale handle: nothing is written anywhere.
            assert server.send_message(a, b"stale data for A") is False
            assert server.send_message(a, "stale str") is False
            assert server.send_message(b, b"fresh") is True
            assert recv_exactly(cb, 5) == b"fresh"
            cb.settimeout(0.3)
            with pytest.raises(socket.timeout):
                cb.recv(100)
        assert wait_until(lambda: server.count("closed") == 2)
        assert server.send_message(b, b"late") is False


class AttrServer(Recorder):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.by_conn = {}
        self.checks = []
        self.closed_checks = []

    def on_connection_opened(self, conn):
        super().on_connection_opened(conn)
        conn.username = f"user{conn.id}"
        self.by_conn[conn] = 0

    def handle(self, conn, data):
        self.by_conn[conn] += 1
        opened = next(c for k, c in self.events if k == "opened" and c == conn)
        self.checks.append((opened is conn, conn.username, conn.is_open, self.by_conn[conn]))
        self.send_message(conn, data)

    def on_connection_closed(self, conn):
        super().on_connection_closed(conn)
        self.closed_checks.append((conn in self.by_conn, getattr(conn, "username", None)))
        del self.by_conn[conn]


def test_connection_object_attributes():
    with running(AttrServer) as (server, port):
        with connect(port) as c:
            c.sendall(b"one")
            assert recv_exactly(c, 3) == b"one"
            c.sendall(b"two")
            assert recv_exactly(c, 3) == b"two"
            conn = server.conns[0]
            assert isinstance(conn, rsepoll.Connection)
            assert isinstance(conn.id, int)
            assert isinstance(conn.fd, int) and conn.fd >= 0
            assert tuple(conn.remote_address) == c.getsockname()
            assert tuple(conn.local_address) == ("127.0.0.1", port)
            assert conn.username == f"user{conn.id}"
            assert conn.is_open is True
            assert hash(conn) == hash(conn)
            assert {conn: 1}[conn] == 1
            for name, value in (
                ("id", 123),
                ("fd", 5),
                ("remote_address", ("1.2.3.4", 5)),
            ):
                with pytest.raises(AttributeError):
                    setattr(conn, name, value)
            with pytest.raises(AttributeError):
                conn.is_open = False
        assert wait_until(lambda: server.count("closed") == 1)
        assert conn.is_open is False
        assert server.checks == [
            (True, f"user{conn.id}", True, 1),
            (True, f"user{conn.id}", True, 2),
        ]
        assert server.closed_checks == [(True, f"user{conn.id}")]
        closed = [c for k, c in server.events if k == "closed"]
        assert closed[0] is conn
        assert server.by_conn == {}


def test_connection_ids_unique_over_server_life():
    with running(Recorder) as (server, port):
        for i in range(30):
            with connect(port) as c:
                msg = b"%d" % i
                c.sendall(msg)
                assert recv_exactly(c, len(msg)) == msg
        assert wait_until(lambda: server.count("closed") == 30)
        ids = [c.id for c in server.conns]
        assert len(set(ids)) == 30
        assert len({id(c) for c in server.conns}) == 30


def test_connection_ids_unique_across_listen_runs():
    # docs/api.md: `id` is unique for the server's life, which spans every
    # listen() run of the same Server object.
    server = make_server(Recorder)
    for run in range(2):
        listener = rsepoll.make_listener_socket(0, "127.0.0.1")
        try:
            assert server.register_listener_socket(listener) is True
            server.test_ready.clear()
            st = start(server)
            try:
                for i in range(3):
                    with connect(listener.port) as c:
                        c.sendall(b"%d" % i)
                        assert recv_exactly(c, 1) == b"%d" % i
                closed = 3 * (run + 1)
                assert wait_until(lambda n=closed: server.count("closed") == n)
            finally:
                st.stop()
            st.raise_if_failed()
        finally:
            listener.close()
    assert server.test_errors == []
    first, second = ([c.id for c in server.conns[i : i + 3]] for i in (0, 3))
    assert len(set(first)) == 3
    assert len(set(second)) == 3
    assert not set(first) & set(second), f"ids repeated across runs: {first} then {second}"


def test_half_close_still_gets_full_echo_then_eof():
    payload = os.urandom(512 * 1024)
    with running(Recorder) as (server, port):
        with connect(port) as c:

            def writer():
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            got = recv_until_eof(c, limit=len(payload))
            t.join(5)
            assert not t.is_alive()
            assert got == payload
        assert wait_until(lambda: server.count("closed") == 1)
        server.assert_lifecycle()


class BigReply(Recorder):
    def __init__(self, payload, *a, **kw):
        super().__init__(*a, **kw)
        self.payload = payload

    def handle(self, conn, data):
        step = 64 * 1024
        for _ in data:  # one reply per request byte
            for i in range(0, len(self.payload), step):
                self.send_message(conn, self.payload[i : i + step])


def test_half_close_with_megabytes_still_queued_delivers_all_then_eof():
    """EOF arrives while most of the reply is still queued in the server."""
    payload = os.urandom(8 * MiB)
    with running(BigReply, payload) as (server, port):
        with connect(port, rcvbuf=64 * 1024) as c:
            c.sendall(b"G")
            c.shutdown(socket.SHUT_WR)
            got = recv_until_eof(c, limit=len(payload))
            assert len(got) == len(payload)
            assert got == payload
        assert wait_until(lambda: server.count("closed") == 1)
        server.assert_lifecycle()


def test_half_close_small_message_reply_then_eof():
    class Reply(Recorder):
        def handle(self, conn, data):
            self.send_message(conn, b"reply:" + data)

    with running(Reply) as (server, port), connect(port) as c:
        c.sendall(b"tail")
        c.shutdown(socket.SHUT_WR)
        got = recv_until_eof(c, limit=1 << 16)
        assert got.startswith(b"reply:")
        assert b"".join(got.split(b"reply:")) == b"tail"
        assert wait_until(lambda: server.count("closed") == 1)


@pytest.mark.timeout(30)
def test_on_eof_received_override_keeps_connection_open_for_late_replies():
    """A server that answers from a worker thread overrides on_eof_received so
    that a client's half-close does not close the connection before the reply."""
    eofs = []

    class LateReplies(rsepoll.Server):
        def on_message_received(self, conn, data):
            def reply():
                time.sleep(0.2)
                self.send_message(conn, data.upper())
                self.close_connection(conn)

            threading.Thread(target=reply, daemon=True).start()

        def on_eof_received(self, conn):
            eofs.append(conn)

    with running(LateReplies) as (_server, port), connect(port) as c:
        c.sendall(b"late reply")
        c.shutdown(socket.SHUT_WR)
        assert recv_exactly(c, 10) == b"LATE REPLY"
        assert_eof(c)
    assert len(eofs) == 1


@pytest.mark.timeout(30)
def test_default_on_eof_received_closes_after_earlier_replies():
    with running(rsepoll.Server) as (_server, port), connect(port) as c:
        c.sendall(b"echo me")
        c.shutdown(socket.SHUT_WR)
        assert recv_exactly(c, 7) == b"echo me"
        assert_eof(c)
