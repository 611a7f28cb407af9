"""Round trips, send_message argument handling, listener sockets and the API surface."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time

import pytest
import rsepoll
from conftest import (
    call_in_thread,
    connect,
    ipv6_loopback_available,
    make_server,
    recv_exactly,
    recv_until_eof,
    running,
    start,
    wait_until,
)

if sys.platform != "win32":
    import fcntl

pytestmark = pytest.mark.timeout(30)


class Reverser(rsepoll.Server):
    def on_message_received(self, conn, data):
        self.send_message(conn, data[::-1])


def test_default_server_echoes():
    with running() as (_server, port), connect(port) as c:
        for msg in (b"hello", b"x", b"\x00\xffbinary\r\n", b"A" * 100_000):
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg


@pytest.mark.parametrize("framing", ["raw", "length"])
def test_large_bytes_replies_go_out_whole_in_order_and_are_let_go(framing):
    """Large ``bytes`` replies are written from the objects themselves rather
    than copied into the command ring: they must still arrive whole and in
    order with copied ones, and the server must let go of every object."""
    lent = [bytes([i + 1]) * size for i, size in enumerate((5000, 70_000, 4096, 1_000_000))]
    replies = [
        lent[0],
        b"small",
        lent[1],
        bytearray(b"\x07" * 9000),
        lent[2],
        memoryview(b"\x08" * 20_000),
        lent[3],
    ]
    refs_before = [sys.getrefcount(p) for p in lent]

    class Replier(rsepoll.Server):
        def on_message_received(self, conn, data):
            for reply in replies:
                assert self.send_message(conn, reply)

    def framed(data):
        return len(data).to_bytes(4, "big") + bytes(data) if framing == "length" else bytes(data)

    expected = b"".join(framed(r) for r in replies)
    with running(Replier, framing=framing) as (_server, port), connect(port) as c:
        c.sendall(framed(b"go"))
        assert recv_exactly(c, len(expected)) == expected
        assert wait_until(lambda: [sys.getrefcount(p) for p in lent] == refs_before)


def test_a_lent_bytes_is_let_go_once_its_slot_is_released_while_callbacks_run():
    """Issue 13, item 8: a lent ``bytes`` is let go once the I/O thread has
    released its command slot, not only once the whole batch of callbacks has
    run: a callback that waits on a worker sending large replies must not keep
    every one of them alive meanwhile (on top of the queued copy)."""
    first = bytes([1]) * 100_000
    base = sys.getrefcount(first)
    outcome = {}

    class Streamer(rsepoll.Server):
        def on_message_received(self, conn, data):
            def worker():
                assert self.send_message(conn, first)
                outcome["held"] = sys.getrefcount(first) - base
                # The worker goes on sending large replies, as long as the
                # server still holds the first (at most 5 s).
                deadline = time.monotonic() + 5.0
                sends = 0
                while sys.getrefcount(first) > base and time.monotonic() < deadline:
                    assert self.send_message(conn, bytes([2]) * 5000)
                    sends += 1
                    time.sleep(0.005)
                outcome["after"] = sys.getrefcount(first) - base
                outcome["sends"] = sends

            thread = threading.Thread(target=worker)
            thread.start()
            thread.join()
            self.close_connection(conn)

    with running(Streamer) as (_server, port), connect(port) as c:
        c.sendall(b"go")
        received = recv_until_eof(c)
    assert outcome["held"] == 1, "the first reply was not lent"
    assert received == first + bytes([2]) * 5000 * outcome["sends"]
    assert outcome["after"] == 0, (
        f"the first reply was still held after {outcome['sends']} more sends, "
        "though the callback that waited on them had not returned"
    )


def test_reverse_round_trip_subclass():
    with running(Reverser) as (_server, port), connect(port) as c:
        # One small send() on loopback arrives as one segment; each reply is
        # awaited before the next request so requests never coalesce.
        for msg in (b"hello\n", b"abc", b"racecar!"):
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg[::-1]


def test_subclass_overriding_only_a_hook_keeps_default_echo():
    class Counting(rsepoll.Server):
        def on_connection_opened(self, conn):
            self.opened.append(conn)

    class WithList(Counting):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.opened = []

    with running(WithList) as (server, port):
        with connect(port) as c:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"
        assert len(server.opened) == 1


def test_subclass_with_own_init_arguments_and_attributes():
    class Greeter(rsepoll.Server):
        def __init__(self, greeting, *, tag="t", max_fds=1024):
            super().__init__(max_fds=max_fds)
            self.greeting = greeting
            self.tag = tag
            self.messages = 0

        def on_message_received(self, conn, data):
            self.messages += 1
            self.send_message(conn, self.greeting + data + self.tag.encode())

    with running(Greeter, b"hi ", tag="!", max_fds=2048) as (server, port):
        assert server.greeting == b"hi "
        assert server.tag == "!"
        assert isinstance(server, rsepoll.Server)
        with connect(port) as c:
            c.sendall(b"bob")
            assert recv_exactly(c, 7) == b"hi bob!"
        assert server.messages == 1

    # Positional-only construction of a subclass with a different signature.
    g = Greeter(b"yo ")
    assert g.greeting == b"yo " and g.tag == "t"


def test_send_message_accepts_bytes_like_and_str():
    text = "héllo ✓"
    mutable = bytearray(b"-bytearray-")
    expected = b"bytes|" + b"-bytearray-" + b"234" + b"" + text.encode("utf-8") + b"|end"

    class Sender(rsepoll.Server):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.results = []
            self.type_errors = []

        def on_message_received(self, conn, data):
            r = self.results
            r.append(self.send_message(conn, b"bytes|"))
            r.append(self.send_message(conn, mutable))
            # The bytes must be captured at call time.
            mutable[:] = b"X" * len(mutable)
            r.append(self.send_message(conn, memoryview(b"0123456789")[2:5]))
            r.append(self.send_message(conn, b""))
            r.append(self.send_message(conn, text))
            for bad in (123, None, 1.5, ["list"]):
                try:
                    self.send_message(conn, bad)
                except TypeError as exc:
                    self.type_errors.append(exc)
            r.append(self.send_message(conn, "|end"))

    with running(Sender) as (server, port):
        with connect(port) as c:
            c.sendall(b"go")
            assert recv_exactly(c, len(expected)) == expected
        assert server.results == [True] * 6
        assert len(server.type_errors) == 4
        assert all(isinstance(e, TypeError) for e in server.type_errors)


def test_send_message_from_test_thread_type_checks():
    class Keeper(rsepoll.Server):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.conns = []

        def on_connection_opened(self, conn):
            self.conns.append(conn)

        def on_message_received(self, conn, data):
            pass

    with running(Keeper) as (server, port), connect(port) as c:
        assert wait_until(lambda: len(server.conns) == 1)
        conn = server.conns[0]
        with pytest.raises(TypeError):
            server.send_message(conn, 5)
        assert server.send_message(conn, "from ") is True
        assert server.send_message(conn, memoryview(bytearray(b"outside"))) is True
        assert recv_exactly(c, 12) == b"from outside"


def test_several_listeners_on_one_server():
    server = make_server()
    l1 = rsepoll.make_listener_socket(0, "127.0.0.1")
    l2 = rsepoll.make_listener_socket(0, "127.0.0.1")
    s3 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s3.bind(("127.0.0.1", 0))
        s3.listen(16)
        assert server.register_listener_socket(l1) is True
        assert server.register_listener_socket(l2) is True
        assert server.register_listener_socket(s3) is True
        ports = [l1.port, l2.port, s3.getsockname()[1]]
        assert len(set(ports)) == 3
        st = start(server)
        try:
            clients = [connect(p) for p in ports]
            try:
                for i, c in enumerate(clients):
                    msg = f"listener {i}".encode()
                    c.sendall(msg)
                    assert recv_exactly(c, len(msg)) == msg
            finally:
                for c in clients:
                    c.close()
        finally:
            st.stop()
        st.raise_if_failed()
        assert server.test_errors == []
    finally:
        l1.close()
        l2.close()
        s3.close()


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_listener():
    with running(Reverser, host="::1") as (server, port):
        assert server.test_listener.address[0] == "::1"
        assert server.test_listener.address[1] == port
        with connect(port, host="::1") as c:
            c.sendall(b"v6!")
            assert recv_exactly(c, 3) == b"!6v"


def test_make_listener_socket_port_zero():
    ls = rsepoll.make_listener_socket(0, "127.0.0.1")
    try:
        assert isinstance(ls, rsepoll.ListenerSocket)
        assert isinstance(ls.port, int)
        assert 0 < ls.port < 65536
        assert tuple(ls.address) == ("127.0.0.1", ls.port)
        fd = ls.fileno()
        assert isinstance(fd, int) and fd >= 0
        if sys.platform == "win32":
            # A SOCKET handle, not a C runtime fd: wrapped, not duplicated.
            dup = socket.socket(fileno=fd)
        else:
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK, "listener must be non-blocking"
            dup = socket.socket(fileno=os.dup(fd))
        try:
            assert dup.type == socket.SOCK_STREAM
            assert dup.family == socket.AF_INET
            # Set on POSIX; never on Windows, where it lets others bind the port.
            reuse = dup.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
            assert reuse == (sys.platform != "win32")
            assert dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
            assert dup.getsockname() == ("127.0.0.1", ls.port)
            if sys.platform == "win32":
                # Windows cannot report a socket's blocking mode; accepting tells.
                with pytest.raises(BlockingIOError):
                    dup.accept()
        finally:
            if sys.platform == "win32":
                dup.detach()
            else:
                dup.close()
        # Listening already: the kernel completes the handshake via the backlog.
        with connect(ls.port):
            pass
    finally:
        ls.close()


def test_make_listener_socket_backlog_and_context_manager():
    with rsepoll.make_listener_socket(0, "127.0.0.1", backlog=16) as ls:
        port = ls.port
        with connect(port):
            pass
    # Closed on leaving the with-block: nothing listens on the port any more.
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2)


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_make_listener_socket_bad_port(port):
    with pytest.raises(ValueError):
        rsepoll.make_listener_socket(port, "127.0.0.1")


def test_make_listener_socket_port_in_use():
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with pytest.raises(OSError) as info:
            rsepoll.make_listener_socket(port, "127.0.0.1")
        assert not isinstance(info.value, (ValueError, TypeError))
        assert info.value.errno in (None, errno.EADDRINUSE)
    finally:
        blocker.close()
    with rsepoll.make_listener_socket(0, "127.0.0.1") as ls, pytest.raises(OSError):
        rsepoll.make_listener_socket(ls.port, "127.0.0.1")


def test_register_rejects_udp_socket():
    server = rsepoll.Server()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError):
            server.register_listener_socket(udp)


def test_register_rejects_unbound_tcp_socket():
    server = rsepoll.Server()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(ValueError):
        server.register_listener_socket(s)


def test_register_rejects_bound_but_not_listening_socket():
    server = rsepoll.Server()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError):
            server.register_listener_socket(s)


def test_register_rejects_connected_client_socket():
    server = rsepoll.Server()
    ls = rsepoll.make_listener_socket(0, "127.0.0.1")
    try:
        with connect(ls.port) as c, pytest.raises(ValueError):
            server.register_listener_socket(c)
    finally:
        ls.close()


@pytest.mark.parametrize("obj", [42, "127.0.0.1:80", object(), None])
def test_register_rejects_non_socket(obj):
    server = rsepoll.Server()
    with pytest.raises((TypeError, ValueError)):
        server.register_listener_socket(obj)


def test_register_rejects_closed_socket():
    server = rsepoll.Server()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    s.close()
    with pytest.raises((ValueError, OSError)):
        server.register_listener_socket(s)


def test_plain_socket_listener_is_duplicated_and_closed_after_listen():
    server = make_server(Reverser)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    port = s.getsockname()[1]
    assert server.register_listener_socket(s) is True
    # The server keeps its own duplicate: closing ours must not matter.
    s.close()
    st = start(server)
    try:
        with connect(port) as c:
            c.sendall(b"plain")
            assert recv_exactly(c, 5) == b"nialp"
    finally:
        st.stop()
    st.raise_if_failed()
    # listen() returned, so the server closed its duplicate: port is free.
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2)


def test_listener_socket_closed_by_caller_after_register():
    server = make_server()
    ls = rsepoll.make_listener_socket(0, "127.0.0.1")
    port = ls.port
    assert server.register_listener_socket(ls) is True
    ls.close()
    st = start(server)
    try:
        with connect(port) as c:
            c.sendall(b"dup")
            assert recv_exactly(c, 3) == b"dup"
    finally:
        st.stop()
    st.raise_if_failed()
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2)


def test_listen_without_listener_raises_runtime_error():
    server = rsepoll.Server()
    with pytest.raises(RuntimeError):
        call_in_thread(lambda: server.listen(timeout=100))


def test_second_listen_while_running_raises_runtime_error():
    with running() as (server, port):
        with pytest.raises(RuntimeError):
            call_in_thread(lambda: server.listen(timeout=100))
        # The first listen() is unaffected.
        assert server.test_thread.is_alive()
        with connect(port) as c:
            c.sendall(b"still")
            assert recv_exactly(c, 5) == b"still"


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "epoll",
            marks=pytest.mark.skipif(sys.platform != "linux", reason="epoll is Linux-only"),
        ),
        "portable",
        "auto",
    ],
)
def test_explicit_backends_work(backend):
    with running(Reverser, backend=backend) as (_server, port), connect(port) as c:
        c.sendall(b"backend")
        assert recv_exactly(c, 7) == b"dnekcab"


@pytest.mark.parametrize("backend", ["bogus", "", "EPOLL2"])
def test_bogus_backend_raises_value_error(backend):
    with pytest.raises(ValueError):
        rsepoll.Server(backend=backend)


def test_server_default_construction_and_max_fds_keyword():
    assert isinstance(rsepoll.Server(), rsepoll.Server)
    assert isinstance(rsepoll.Server(1024), rsepoll.Server)
    assert isinstance(rsepoll.Server(max_fds=1024, backend=None), rsepoll.Server)


def test_on_listen_success_runs_on_listening_thread():
    with running() as (server, _port):
        assert server.test_listen_ident == server.test_thread.ident
        assert server.test_listen_ident != threading.get_ident()
