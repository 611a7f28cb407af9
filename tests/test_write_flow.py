"""Write-side flow: ``on_writing_paused`` when a connection's output queue on
the I/O thread rises above ``write_buffer_high``, ``on_writing_resumed`` when
it falls to ``write_buffer_low``; and pausing reading from any thread.

The callbacks alternate, come in order with the connection's other
callbacks, and never after ``on_connection_closed``: a connection reset or
aborted while paused gets no resume. Only the I/O thread's own queue counts,
not what the Python side has queued for it, so a burst of sends to a client
that keeps up pauses nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import rsepoll
from conftest import (
    UNDER_WINE,
    Workers,
    connect,
    needs_visible_resets,
    recv_exactly,
    running,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

HIGH = 64 << 10
LOW = 16 << 10
CHUNK = 64 << 10
#: The most a client that does not read is sent while waiting for the pause:
#: far more than the kernel buffers of a loopback connection hold (about
#: 4 MiB on Linux, as measured when this test was written).
FILL_LIMIT = 64 << 20


def chunk(index: int) -> bytes:
    """The ``index``-th chunk of a stream: its number, over and over, so that
    the reader can tell a lost or reordered chunk."""
    return index.to_bytes(4, "big") * (CHUNK // 4)


class Flow(rsepoll.Server):
    """Records each connection's callbacks, in the order they ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[str] = []
        self.opened = threading.Event()
        self.conn: rsepoll.Connection | None = None
        self.reasons: list[str | None] = []

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.events.append("opened")
        self.conn = conn
        self.opened.set()

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.events.append("message")

    def on_writing_paused(self, conn: rsepoll.Connection) -> None:
        self.events.append("paused")

    def on_writing_resumed(self, conn: rsepoll.Connection) -> None:
        self.events.append("resumed")

    def on_eof_received(self, conn: rsepoll.Connection) -> None:
        self.events.append("eof")
        super().on_eof_received(conn)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.events.append("closed")
        self.reasons.append(conn.close_reason)

    def count(self, event: str) -> int:
        return self.events.count(event)

    def opened_conn(self) -> rsepoll.Connection:
        assert self.opened.wait(5), "no connection opened"
        assert self.conn is not None
        return self.conn


def flow_server(**kwargs: Any) -> Any:
    return running(Flow, write_buffer_high=HIGH, write_buffer_low=LOW, **kwargs)


def fill_until_paused(server: Flow, conn: rsepoll.Connection, first: int = 0) -> int:
    """Sends chunks ``first, first + 1, ...`` from this thread (not the
    listening one) to a client that does not read, until the server reports
    writing paused, then 1 MiB more; returns the index after the last chunk.

    A chunk goes only while at most ``HIGH`` bytes are pending, so that the
    sends cannot run far ahead of the I/O thread (the command ring holds
    many chunks): once more stay pending, they are in its queue, and the
    pause is on its way.
    """
    pauses = server.count("paused")
    index = first
    deadline = time.monotonic() + 10
    while server.count("paused") == pauses:
        assert time.monotonic() < deadline, f"no pause in 10 s, {conn.pending_bytes} pending"
        if conn.pending_bytes > HIGH:
            time.sleep(0.001)
            continue
        assert (index - first) * CHUNK < FILL_LIMIT, "no pause after 64 MiB unread"
        assert server.send_message(conn, chunk(index)) is True
        index += 1
    # The client still reads nothing: the queue stays above the mark, and
    # more sends must not pause it again.
    assert conn.pending_bytes > HIGH
    for _ in range(16):
        assert server.send_message(conn, chunk(index)) is True
        index += 1
    return index


def read_chunks(client: socket.socket, first: int, end: int) -> None:
    """Reads chunks ``first`` to ``end`` (exclusive) and checks each."""
    for index in range(first, end):
        data = recv_exactly(client, CHUNK)
        assert data == chunk(index), f"chunk {index} differs: {data[:8]!r}"


def test_writing_pauses_and_resumes_once_per_crossing_in_order() -> None:
    """A client that stops reading pauses writing once however much more is
    sent; reading everything resumes it once; over several cycles the two
    alternate, in order with the connection's messages, EOF and close."""
    with flow_server() as (server, port), connect(port) as client:
        conn = server.opened_conn()
        sent = 0
        for _ in range(3):
            end = fill_until_paused(server, conn, sent)
            read_chunks(client, sent, end)
            sent = end
            assert wait_until(lambda: server.count("resumed") == server.count("paused"))
            # Read after the resume was emitted: ordered behind it.
            client.sendall(b"x")
            assert wait_until(lambda: server.events[-1] == "message")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        assert wait_until(lambda: "closed" in server.events)
    assert server.events == ["opened"] + ["paused", "resumed", "message"] * 3 + ["eof", "closed"]
    assert conn.pending_bytes == 0


class BackpressuredEcho(Flow):
    """Echoes length-framed messages, and stops reading while writing is
    paused, as a well-behaved asyncio protocol does."""

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        super().on_message_received(conn, data)
        self.send_message(conn, data)  # 64 KiB of bytes: lent, not copied

    def on_writing_paused(self, conn: rsepoll.Connection) -> None:
        super().on_writing_paused(conn)
        self.pause_reading(conn)

    def on_writing_resumed(self, conn: rsepoll.Connection) -> None:
        super().on_writing_resumed(conn)
        self.resume_reading(conn)


@pytest.mark.parametrize("io_threads", [0, 1])
def test_replies_from_callbacks_pause_and_resume_in_order(io_threads: int) -> None:
    """Replies sent from the message callbacks to a client that reads
    slowly: each crossing of the mark is reported once, pauses and resumes
    alternate, and every byte comes back in order. Inline, a lent reply is
    written as its callback returns, between the callbacks of one batch
    (see ``src/python/loans.rs``): that is where the queue crosses the mark
    here, and the pause still comes once, before its resume."""
    count = 128
    payload = b"".join(
        len(m).to_bytes(4, "big") + m for m in (chunk(i)[: CHUNK - 4] for i in range(count))
    )
    with (
        running(
            BackpressuredEcho,
            framing="length",
            io_threads=io_threads,
            write_buffer_high=HIGH,
            write_buffer_low=LOW,
        ) as (server, port),
        connect(port, timeout=30, rcvbuf=64 << 10) as client,
    ):
        server.opened_conn()
        writer = threading.Thread(target=client.sendall, args=(payload,))
        writer.start()
        # Nothing is read until the queue has crossed the mark once.
        assert wait_until(lambda: "paused" in server.events), "the queue never crossed the mark"
        echoed = bytearray()
        while len(echoed) < len(payload):
            data = client.recv(256 << 10)
            assert data, f"closed after {len(echoed)} of {len(payload)} bytes"
            echoed.extend(data)
            time.sleep(0.002)  # slower than the server writes: it may pause again
        writer.join(10)
        assert not writer.is_alive()
        assert bytes(echoed) == payload
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        assert wait_until(lambda: "closed" in server.events)
    crossings = [event for event in server.events if event in ("paused", "resumed")]
    assert crossings == ["paused", "resumed"] * (len(crossings) // 2), crossings
    assert server.count("message") == count
    assert server.events[0] == "opened" and server.events[-2:] == ["eof", "closed"]


@pytest.mark.parametrize(
    "how", [pytest.param("client_reset", marks=needs_visible_resets), "server_abort"]
)
def test_a_connection_that_ends_while_paused_gets_no_resume(how: str) -> None:
    """Reset by the client or aborted by the server while paused: closed,
    and no resume, though its queue is dropped (as asyncio calls no
    ``resume_writing`` after ``connection_lost``)."""
    with flow_server() as (server, port), connect(port) as client:
        conn = server.opened_conn()
        fill_until_paused(server, conn)
        if how == "client_reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            client.close()
        else:
            assert server.close_connection(conn, abort=True) is True
        assert wait_until(lambda: "closed" in server.events)
        # Under Wine a Windows program reads a reset as EOF (see
        # conftest.needs_visible_resets): the client cannot tell there.
        if how == "server_abort" and not UNDER_WINE:
            with pytest.raises(ConnectionResetError):
                while client.recv(1 << 20):
                    pass
    # The server has stopped: whatever its I/O thread delivered was handled.
    assert server.events == ["opened", "paused", "closed"]
    assert server.reasons == ["reset" if how == "client_reset" else "local"]


def test_a_graceful_close_while_paused_resumes_before_it_closes() -> None:
    """A close after the queued bytes drains the queue: writing resumes,
    then the connection closes, and the client gets every byte before EOF."""
    with flow_server() as (server, port), connect(port) as client:
        conn = server.opened_conn()
        end = fill_until_paused(server, conn)
        assert server.close_connection(conn) is True
        read_chunks(client, 0, end)
        assert client.recv(1) == b""
        assert wait_until(lambda: "closed" in server.events)
    assert server.events == ["opened", "paused", "resumed", "closed"]


@pytest.mark.parametrize("client_reads", [True, False])
def test_a_stop_delivers_the_resume_only_if_the_queue_drains(client_reads: bool) -> None:
    """A stop drains: a paused connection whose client reads everything
    resumes, then closes; one whose client reads nothing is reset at the
    stop's deadline, with no resume."""
    with flow_server() as (server, port), connect(port) as client:
        conn = server.opened_conn()
        end = fill_until_paused(server, conn)
        server.stop_server(5.0 if client_reads else 0.2)
        if client_reads:
            read_chunks(client, 0, end)
            assert client.recv(1) == b""
        assert wait_until(lambda: not server.test_thread.is_alive(), 10.0)
    if client_reads:
        assert server.events == ["opened", "paused", "resumed", "closed"]
    else:
        assert server.events == ["opened", "paused", "closed"]
    assert server.reasons == ["shutdown"]


BURSTS = 8
MESSAGES = 1024
MESSAGE = 1024
#: Marks small enough that the sends waiting to be applied climb far above
#: them in every run, however the threads are scheduled (a loaded machine
#: lets the I/O thread keep closer behind the callback).
BURST_HIGH = 8 << 10
BURST_LOW = 1 << 10


def test_a_burst_the_socket_takes_pauses_nothing_however_much_waits_to_be_applied() -> None:
    """Only the I/O thread's own queue counts. Each burst is 1 MiB in 1 KiB
    messages, queued from one callback much faster than the I/O thread writes
    them: ``pending_bytes`` counts what waits in the command ring too, and
    climbs far above ``write_buffer_high``. But the socket takes each message
    as it is applied (the kernel buffers of a loopback connection hold several
    MiB even for a client that does not read), so the I/O thread's queue stays
    empty, and a client that reads each burst is never paused.

    (Measured when this was written, one 8 MiB burst to a reader as fast as
    this one: no pause when the machine is otherwise idle; under two busy
    loops on two cores, now and then one pause and its resume, when the
    reader fell more than the kernel buffers behind. That is the queue
    counting, as it should.)"""
    peaks: list[int] = []

    class Burst(Flow):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            super().on_message_received(conn, data)
            burst = len(peaks)
            peak = 0
            for i in range(MESSAGES):
                self.send_message(conn, bytes([(burst * MESSAGES + i) % 251]) * MESSAGE)
                peak = max(peak, conn.pending_bytes)
            peaks.append(peak)

    with (
        running(Burst, write_buffer_high=BURST_HIGH, write_buffer_low=BURST_LOW) as (server, port),
        connect(port) as client,
    ):
        server.opened_conn()
        for burst in range(BURSTS):
            client.sendall(b"g")
            data = recv_exactly(client, MESSAGES * MESSAGE)
            expected = b"".join(
                bytes([(burst * MESSAGES + i) % 251]) * MESSAGE for i in range(MESSAGES)
            )
            assert data == expected, f"burst {burst} differs"
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        assert wait_until(lambda: "closed" in server.events)
    assert max(peaks) > 4 * BURST_HIGH, f"the bursts never queued much: {peaks}"
    assert server.events == ["opened"] + ["message"] * BURSTS + ["eof", "closed"]


def test_pause_and_resume_reading_from_other_threads() -> None:
    """pause_reading and resume_reading go through the command ring behind
    its lock, like send_message: safe from any thread, and ordered with the
    same thread's sends."""
    received = bytearray()
    callers: list[int] = []

    class Reading(Flow):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            received.extend(data)

    def in_thread(fn: Any) -> Any:
        box: list[Any] = []

        def run() -> None:
            callers.append(threading.get_ident())
            box.append(fn())

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(5)
        assert box, "the call did not return"
        return box[0]

    with running(Reading) as (server, port), connect(port) as client:
        conn = server.opened_conn()

        def pause_then_mark() -> bool:
            paused = server.pause_reading(conn)
            # Behind the pause in the same ring: once the client has this,
            # the I/O thread has applied the pause.
            server.send_message(conn, b"paused")
            return paused

        assert in_thread(pause_then_mark) is True
        assert recv_exactly(client, 6) == b"paused"
        client.sendall(b"held back")
        time.sleep(0.3)
        assert received == b"", "input was read while paused"
        assert in_thread(lambda: server.resume_reading(conn)) is True
        assert wait_until(lambda: received == b"held back")

        # Many threads switching it at once while the client streams; then
        # one more resume, since the threads' last switches may land in any
        # order. Every byte arrives, in order.
        stream = bytes(range(256)) * 4096  # 1 MiB
        workers = Workers()

        def switch() -> None:
            for _ in range(200):
                assert server.pause_reading(conn) is True
                assert server.resume_reading(conn) is True

        # From a thread: while paused, the kernel buffers may not hold it all.
        workers.spawn(client.sendall, stream)
        switchers = [workers.spawn(switch) for _ in range(4)]
        for thread in switchers:
            thread.join(10)
            assert not thread.is_alive()
        assert in_thread(lambda: server.resume_reading(conn)) is True
        workers.join(10)
        assert wait_until(lambda: len(received) == 9 + len(stream), 10.0)
        assert received == b"held back" + stream
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        assert wait_until(lambda: "closed" in server.events)
    assert server.test_listen_ident not in callers
