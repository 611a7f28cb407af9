"""Framing in the core: whatever the TCP chunking, every message arrives
whole, once, in order, as one callback; oversized messages disconnect only
their sender."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import rsepoll
from conftest import connect, recv_exactly, recv_until_eof, running, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SLOT_SIZE = 1024  # small, so that many messages are larger than a slot


class Collector(rsepoll.Server):
    """Echoes every message (framed by the server) and records it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.messages: list[bytes] = []
        self.closed: dict[int, str | None] = {}

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.messages.append(data)
        self.send_message(conn, data)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.closed[conn.id] = conn.close_reason

    def on_exception_occurred(self, exc: BaseException) -> None:
        pass  # the tests read test_errors


def encode(framing: str, message: bytes, prefix: int = 4) -> bytes:
    if framing == "line":
        return message + b"\n"
    return len(message).to_bytes(prefix, "big") + message


def read_messages(sock: socket.socket, framing: str, count: int, prefix: int = 4) -> list[bytes]:
    buf = bytearray()
    out: list[bytes] = []
    while len(out) < count:
        if framing == "line":
            end = buf.find(b"\n")
            if end >= 0:
                out.append(bytes(buf[:end]))
                del buf[: end + 1]
                continue
        elif len(buf) >= prefix:
            size = int.from_bytes(buf[:prefix], "big")
            if len(buf) >= prefix + size:
                out.append(bytes(buf[prefix : prefix + size]))
                del buf[: prefix + size]
                continue
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {count} messages")
        buf += chunk
    assert not buf, "bytes beyond the expected messages"
    return out


def send_in_chunks(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    """Sends ``data`` cut at the given offsets, with TCP_NODELAY, so that the
    server sees many different chunkings."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))):
        sock.sendall(data[start:cut])
        start = cut
    sock.sendall(data[start:])


@pytest.fixture(scope="module", params=["line", "length"])
def framed_server(request: pytest.FixtureRequest) -> Iterator[tuple[Collector, int, str]]:
    with running(Collector, framing=request.param, slot_size=SLOT_SIZE) as (server, port):
        yield server, port, request.param


line_message = st.binary(max_size=3 * SLOT_SIZE).map(lambda b: b.replace(b"\n", b"."))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    messages=st.lists(line_message, min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=60_000), max_size=40),
)
def test_any_chunking_gives_the_same_messages(
    framed_server: tuple[Collector, int, str], messages: list[bytes], cuts: list[int]
) -> None:
    _server, port, framing = framed_server
    if framing == "line":
        # A bare "\r" at the end of a line would be taken as part of "\r\n".
        messages = [m.rstrip(b"\r") for m in messages]
    wire = b"".join(encode(framing, m) for m in messages)
    with connect(port) as client:
        send_in_chunks(client, wire, cuts)
        assert read_messages(client, framing, len(messages)) == messages


@pytest.mark.parametrize("framing", ["line", "length"])
def test_one_byte_at_a_time_and_all_at_once(framing: str) -> None:
    messages = [b"", b"a", b"hello world", bytes(range(32, 256)) * 40, b"z" * 5000]
    wire = b"".join(encode(framing, m) for m in messages)
    with running(Collector, framing=framing, slot_size=SLOT_SIZE) as (server, port):
        with connect(port) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(wire)):
                client.send(wire[i : i + 1])
            assert read_messages(client, framing, len(messages)) == messages
        with connect(port) as client:
            client.sendall(wire * 20)
            assert read_messages(client, framing, 20 * len(messages)) == messages * 20
        assert wait_until(lambda: len(server.messages) == 21 * len(messages), 5.0)


def test_lines_end_with_lf_or_crlf_and_sends_append_lf() -> None:
    with running(Collector, framing="line") as (server, port):
        with connect(port) as client:
            client.sendall(b"one\r\ntwo\nthr\ree\r\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_until_eof(client) == b"one\ntwo\nthr\ree\n"
        assert server.messages == [b"one", b"two", b"thr\ree"]


def test_an_eight_byte_prefix() -> None:
    with (
        running(Collector, framing="length", length_prefix=8) as (_server, port),
        connect(port) as client,
    ):
        messages = [b"x" * 70_000, b"", b"tail"]
        client.sendall(b"".join(encode("length", m, 8) for m in messages))
        assert read_messages(client, "length", 3, prefix=8) == messages


@pytest.mark.parametrize(
    ("framing", "wire"),
    [
        ("line", b"y" * 5000),  # no end of line in sight
        ("length", struct.pack(">I", 1 << 30)),  # declares 1 GiB
    ],
)
def test_an_oversized_message_disconnects_only_its_sender(framing: str, wire: bytes) -> None:
    with running(Collector, framing=framing, max_message_size=4096, expect_errors=True) as (
        server,
        port,
    ):
        good = connect(port)
        bad = connect(port)
        good.sendall(encode(framing, b"before"))
        assert read_messages(good, framing, 1) == [b"before"]
        bad.sendall(encode(framing, b"fine") + wire)
        assert read_messages(bad, framing, 1) == [b"fine"]
        assert recv_until_eof(bad) == b""
        assert wait_until(lambda: server.test_errors, 5.0)
        (error,) = server.test_errors
        assert isinstance(error, rsepoll.MessageTooLarge)
        assert isinstance(error, rsepoll.ProtocolError)
        assert "max_message_size" in str(error)
        assert wait_until(lambda: error.conn.id in server.closed, 5.0)
        assert server.closed[error.conn.id] == "too_large"
        good.sendall(encode(framing, b"after"))
        assert read_messages(good, framing, 1) == [b"after"]
        good.close()
        bad.close()


def test_a_message_of_exactly_max_message_size_is_accepted() -> None:
    with (
        running(Collector, framing="length", max_message_size=4096) as (_server, port),
        connect(port) as client,
    ):
        client.sendall(encode("length", b"m" * 4096))
        assert read_messages(client, "length", 1) == [b"m" * 4096]


def test_many_clients_interleaving_large_framed_messages() -> None:
    """Large messages from many clients at once, each checked end to end."""
    clients = 40
    errors: list[BaseException] = []

    def client_run(port: int, seed: int) -> None:
        try:
            with connect(port) as sock:
                messages = [
                    bytes([seed]) * (1 + (seed * 7919 + i * 104_729) % 60_000) for i in range(8)
                ]
                sock.sendall(b"".join(encode("length", m) for m in messages))
                assert read_messages(sock, "length", len(messages)) == messages
        except BaseException as exc:
            errors.append(exc)

    with running(Collector, framing="length", slot_size=SLOT_SIZE) as (_server, port):
        threads = [threading.Thread(target=client_run, args=(port, i)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"framing": "json"}, "unknown framing"),
        ({"framing": 5}, "framing must be a string, got 5"),
        ({"framing": "length", "length_prefix": 2}, "length_prefix"),
        ({"framing": "line", "max_message_size": 0}, "max_message_size"),
    ],
)
def test_bad_framing_options_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rsepoll.Server(**kwargs)  # type: ignore[arg-type]


def test_the_server_reports_its_framing() -> None:
    assert rsepoll.Server().framing == "raw"
    assert rsepoll.Server(framing="line").framing == "line"


def test_a_sleeping_server_keeps_a_partial_message() -> None:
    """A message split by a long pause still arrives whole."""
    with running(Collector, framing="length") as (_server, port), connect(port) as client:
        wire = encode("length", b"patience")
        client.sendall(wire[:3])
        time.sleep(0.3)
        client.sendall(wire[3:])
        assert read_messages(client, "length", 1) == [b"patience"]


class Ledger(rsepoll.Server):
    """Keeps every other message with its offset in the stream, and notes
    for each its length, whether its hash is that of its bytes, how many
    more references it has than a copy made here (one more than the first
    message's count if the server watches it, to read into again: see
    src/python/blanks.rs), and its id. The first callback sleeps, so that
    the rest piles up in the kernel and comes in large reads."""

    def __init__(self, *args, total: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.total = total
        self.offset = 0
        self.kept: list[tuple[int, bytes]] = []
        self.notes: list[tuple[int, int, bool, int]] = []
        self.first_started = threading.Event()

    def on_message_received(self, conn, data):
        copy = bytes(bytearray(data))
        extra = sys.getrefcount(data) - sys.getrefcount(copy)
        if not self.notes:
            self.first_started.set()
            time.sleep(0.3)
        self.notes.append((len(data), extra, hash(data) == hash(copy), id(data)))
        if len(self.notes) % 2 == 0:
            self.kept.append((self.offset, data))
        self.offset += len(data)
        if self.offset == self.total:
            self.send_message(conn, b"done")


@pytest.mark.parametrize("io_threads", [0, 1, 2])
def test_large_reads_go_into_the_bytes_object_and_kept_ones_never_change(io_threads):
    # A large raw read goes straight into a bytes object of the server's,
    # which the callback gets; once only the server references it again,
    # the next read goes into it (src/python/blanks.rs). Every message
    # hashed in its callback must hash as its bytes do, though the object
    # may have been hashed before with other bytes; every message the
    # application keeps must keep its bytes.
    payload = os.urandom(8 << 20)
    stream = b"first" + payload
    # A ring of 1 MiB: with an I/O thread, most of the stream is read after
    # the first callback, once the server has objects to lend.
    options = {"io_threads": io_threads, "ring_slots": 64, "total": len(stream)}
    with running(Ledger, **options) as (server, port), connect(port, timeout=30) as client:
        client.sendall(b"first")
        assert server.first_started.wait(10)
        client.sendall(payload)
        assert recv_exactly(client, 4) == b"done"
    notes = server.notes
    assert sum(size for size, _, _, _ in notes) == len(stream)
    assert all(hash_right for _, _, hash_right, _ in notes)
    for offset, data in server.kept:
        assert data == stream[offset : offset + len(data)]
    # The first message was copied out of its slot: the baseline. Large
    # reads into the server's objects have the watched reference besides.
    baseline = notes[0][1]
    watched = [i for i, (_, extra, _, _) in enumerate(notes) if extra == baseline + 1]
    assert watched, notes
    assert all(notes[i][0] >= 64 << 10 for i in watched), notes
    assert {extra for _, extra, _, _ in notes} <= {baseline, baseline + 1}
    # An object read into again: a watched message not kept (even index)
    # whose id comes back within the next 16 watched ones, while the server
    # still watched it, so it was alive and no other object had its id.
    read_again = [
        (i, j)
        for n, i in enumerate(watched)
        if i % 2 == 0
        for j in watched[n + 1 : n + 17]
        if notes[j][3] == notes[i][3]
    ]
    assert read_again, notes
