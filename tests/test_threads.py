"""send_message / close_connection / stop_server from foreign Python threads."""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import rsepoll
from conftest import (
    Workers,
    assert_eof,
    connect,
    io_thread_names,
    recv_exactly,
    recv_until_eof,
    running,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


class PoolServer(rsepoll.Server):
    """Replies from a thread pool: upper-cased data."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.results = []
        self.reply_idents = set()

    def on_message_received(self, conn, data):
        self.pool.submit(self._reply, conn, data)

    def _reply(self, conn, data):
        self.reply_idents.add(threading.get_ident())
        self.results.append(self.send_message(conn, data.upper()))


def test_replies_sent_from_thread_pool():
    with running(PoolServer) as (server, port):
        try:

            def client(k):
                with connect(port) as c:
                    for i in range(20):
                        msg = f"client {k} message {i} ".encode() * 3
                        c.sendall(msg)
                        assert recv_exactly(c, len(msg)) == msg.upper()

            workers = Workers()
            for k in range(5):
                workers.spawn(client, k)
            workers.join(30)
            assert len(server.results) >= 100
            assert all(server.results)
            assert server.test_thread.ident not in server.reply_idents
        finally:
            server.pool.shutdown(wait=True)


def test_many_cross_thread_ping_pongs_no_lost_wakeup():
    """Every reply is sent from a pool thread; a lost wake-up would hang."""
    with running(PoolServer) as (server, port):
        try:
            with connect(port) as c:
                for i in range(2000):
                    msg = b"p%d;" % i
                    c.sendall(msg)
                    assert recv_exactly(c, len(msg)) == msg.upper()
            assert all(server.results)
        finally:
            server.pool.shutdown(wait=True)


class Silent(rsepoll.Server):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.conns = []
        self.closed = []

    def on_connection_opened(self, conn):
        self.conns.append(conn)

    def on_message_received(self, conn, data):
        pass

    def on_connection_closed(self, conn):
        self.closed.append(conn)


def _message(tid: int, i: int) -> bytes:
    pad = (tid * 7919 + i * 104729) % 3000
    return f"<t{tid}:{i:04d}:{pad}:{'x' * pad}>\n".encode()


def test_concurrent_foreign_thread_sends_are_contiguous_and_ordered():
    n_threads, n_conns, n_msgs = 8, 20, 40
    expected_len = sum(len(_message(t, i)) for t in range(n_threads) for i in range(n_msgs))
    line_rx = re.compile(rb"<t(\d+):(\d{4}):(\d+):(x*)>")
    with running(Silent) as (server, port):
        clients = [connect(port) for _ in range(n_conns)]
        try:
            assert wait_until(lambda: len(server.conns) == n_conns)
            by_addr = {tuple(conn.remote_address): conn for conn in server.conns}
            conns = [by_addr[c.getsockname()] for c in clients]

            received = [b""] * n_conns

            def reader(k):
                received[k] = recv_exactly(clients[k], expected_len)

            readers = Workers()
            for k in range(n_conns):
                readers.spawn(reader, k)

            barrier = threading.Barrier(n_threads)
            send_results = []

            def sender(tid):
                barrier.wait(10)
                ok = True
                for i in range(n_msgs):
                    msg = _message(tid, i)
                    for conn in conns:
                        ok = server.send_message(conn, msg) and ok
                send_results.append(ok)

            senders = Workers()
            for tid in range(n_threads):
                senders.spawn(sender, tid)
            senders.join(30)
            assert send_results == [True] * n_threads
            readers.join(30)

            for k in range(n_conns):
                lines = received[k].split(b"\n")
                assert lines[-1] == b""
                lines = lines[:-1]
                assert len(lines) == n_threads * n_msgs
                next_i = [0] * n_threads
                for line in lines:
                    m = line_rx.fullmatch(line)
                    assert m, f"interleaved/corrupt message on conn {k}: {line[:80]!r}"
                    tid, i, pad = int(m.group(1)), int(m.group(2)), int(m.group(3))
                    assert len(m.group(4)) == pad
                    assert i == next_i[tid], f"thread {tid} out of order on conn {k}"
                    next_i[tid] += 1
                assert next_i == [n_msgs] * n_threads
        finally:
            for c in clients:
                c.close()


def test_close_connection_from_foreign_thread_flushes_first():
    with running(Silent) as (server, port), connect(port) as c:
        assert wait_until(lambda: len(server.conns) == 1)
        conn = server.conns[0]
        payload = b"0123456789" * 50_000

        def work():
            assert server.send_message(conn, payload) is True
            server.close_connection(conn)

        with ThreadPoolExecutor(max_workers=1) as ex:
            ex.submit(work).result(10)
        assert recv_until_eof(c, limit=len(payload)) == payload
        assert wait_until(lambda: len(server.closed) == 1)
        assert server.closed[0] is conn
        assert conn.is_open is False


def test_stop_server_from_executor_thread():
    with running() as (server, port), connect(port) as c:
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        with ThreadPoolExecutor(max_workers=1) as ex:
            ex.submit(server.stop_server).result(5)
        server.test_thread.join(5)
        assert server.test_thread.returned
        assert server.test_thread.exc is None
        assert_eof(c)


class StopOnMessage(rsepoll.Server):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.shutdowns = 0

    def on_message_received(self, conn, data):
        if b"stop" in data:
            self.send_message(conn, b"bye")
            self.stop_server()
        else:
            self.send_message(conn, data)

    def on_shutdown_success(self):
        self.shutdowns += 1


def test_stop_server_from_a_callback():
    with running(StopOnMessage) as (server, port), connect(port) as c:
        c.sendall(b"stop")
        server.test_thread.join(5)
        assert server.test_thread.returned
        assert server.shutdowns == 1
        # The reply was queued before the stop: it goes out before the FIN.
        assert recv_until_eof(c, limit=100) == b"bye"


class Waiter(rsepoll.Server):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []  # (monotonic time, thread ident)

    def on_waiting_for_activity(self):
        self.calls.append((time.monotonic(), threading.get_ident()))


def test_on_waiting_for_activity_cadence_and_thread():
    with running(Waiter, listen_timeout=100) as (server, _port):
        t0 = time.monotonic()
        time.sleep(1.0)
        t1 = time.monotonic()
        window = [c for c in server.calls if t0 <= c[0] <= t1]
        assert 5 <= len(window) <= 15, f"{len(window)} calls in {t1 - t0:.2f} s"
        assert {ident for _, ident in server.calls} == {server.test_thread.ident}
        assert server.test_thread.ident != threading.get_ident()


def test_on_waiting_for_activity_not_called_more_often_than_timeout():
    with running(Waiter, listen_timeout=300) as (server, _port):
        assert wait_until(lambda: len(server.calls) >= 3, timeout=5)
        times = [t for t, _ in server.calls]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # Each call needs a full idle timeout before it (small scheduling slack).
        assert min(gaps) >= 0.25, gaps


class DelayedTokenEcho(rsepoll.Server):
    """Echoes each 16-byte token from a pool thread after a random delay."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.buffers = {}
        self.stale = 0
        self.closed = 0

    def on_connection_opened(self, conn):
        self.buffers[conn] = b""

    def on_message_received(self, conn, data):
        buf = self.buffers[conn] + data
        while len(buf) >= 16:
            token, buf = buf[:16], buf[16:]
            self.pool.submit(self._reply, conn, token, random.random() * 0.005)
        self.buffers[conn] = buf

    def on_connection_closed(self, conn):
        del self.buffers[conn]
        self.closed += 1

    def _reply(self, conn, token, delay):
        time.sleep(delay)
        if not self.send_message(conn, token):
            self.stale += 1


def test_stale_handles_never_deliver_to_a_reused_fd():
    """Replies to connections that are gone must not reach their fd's next owner."""
    with running(DelayedTokenEcho) as (server, port):
        try:

            def client(k):
                rng = random.Random(k)
                for i in range(100):
                    token = b"%06d:%09d" % (k, i)
                    with connect(port) as c:
                        c.sendall(token)
                        if rng.random() < 0.5:
                            continue  # leave before the reply: fd gets reused
                        assert recv_exactly(c, 16) == token

            workers = Workers()
            for k in range(4):
                workers.spawn(client, k)
            workers.join(50)
            # Every connection made has been seen and closed by the server (an
            # empty buffer dict alone could precede a late Opened).
            assert wait_until(lambda: server.closed == 4 * 100, timeout=10)
            assert server.buffers == {}
        finally:
            server.pool.shutdown(wait=True)


# ---------------------------------------------------------------------------
# Several I/O threads (io_threads); the whole suite also runs with
# RSEPOLL_IO_THREADS=2 in .ci/run.
# ---------------------------------------------------------------------------


def test_io_threads_takes_a_count_or_auto(monkeypatch):
    monkeypatch.delenv("RSEPOLL_IO_THREADS", raising=False)
    # The default: inline on one usable CPU, one I/O thread on more.
    assert rsepoll.Server().io_threads == (0 if rsepoll.usable_cpus() == 1 else 1)
    assert rsepoll.Server(io_threads=3).io_threads == 3
    assert rsepoll.Server(io_threads=0).io_threads == 0
    monkeypatch.setenv("RSEPOLL_IO_THREADS", "2")
    assert rsepoll.Server().io_threads == 2
    assert rsepoll.Server(io_threads=1).io_threads == 1
    monkeypatch.setenv("RSEPOLL_IO_THREADS", "0")
    assert rsepoll.Server().io_threads == 0
    for bad in (-1, "two", 1.5, True, 100_000):
        with pytest.raises(ValueError, match="io_threads"):
            rsepoll.Server(io_threads=bad)


class IdRecorder(rsepoll.Server):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ids = []

    def on_connection_opened(self, conn):
        self.ids.append(conn.id)


def test_three_io_threads_serve_one_listener_with_unique_ids():
    clients = 12
    with running(IdRecorder, io_threads=3) as (server, port):
        socks = [connect(port) for _ in range(clients)]
        try:
            for i, sock in enumerate(socks):
                sock.sendall(b"x" * (i + 1))
            for i, sock in enumerate(socks):
                assert recv_exactly(sock, i + 1) == b"x" * (i + 1)
            assert wait_until(lambda: len(server.ids) == clients)
            assert len(set(server.ids)) == clients
            assert server.stats()["connections_open"] == clients
            if io_thread_names() is not None:
                assert io_thread_names() == {"rsepoll-io-0", "rsepoll-io-1", "rsepoll-io-2"}
        finally:
            for sock in socks:
                sock.close()
    # Every I/O thread is gone with the server.
    if io_thread_names() is not None:
        assert wait_until(lambda: not io_thread_names())
