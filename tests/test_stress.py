"""Byte-exact echo under concurrency, big bursts and slow readers."""

from __future__ import annotations

import hashlib
import os
import random
import selectors
import socket
import threading
import time

import pytest
import rsepoll
from conftest import connect, recv_exactly, running, wait_until

MiB = 1 << 20
KiB = 1 << 10


class _Client:
    def __init__(self, sock: socket.socket, payload: bytes, rng: random.Random) -> None:
        self.sock = sock
        self.payload = memoryview(payload)
        self.rng = rng
        self.sent = 0
        self.received = 0
        self.hasher = hashlib.sha256()
        self.next_chunk = rng.randint(1, 64 * KiB)


def _echo_many(port: int, n_clients: int, size: int, seed: int, deadline_s: float) -> None:
    rng = random.Random(seed)
    clients = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(n_clients):
            sock = connect(port)
            sock.setblocking(False)
            c = _Client(sock, os.urandom(size), random.Random(rng.random()))
            clients.append(c)
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        remaining = n_clients
        deadline = time.monotonic() + deadline_s
        while remaining:
            assert time.monotonic() < deadline, (
                f"{remaining} of {n_clients} clients unfinished after {deadline_s} s; "
                f"sent={sum(c.sent for c in clients)} "
                f"received={sum(c.received for c in clients)}"
            )
            for key, events in sel.select(timeout=0.5):
                c = key.data
                if events & selectors.EVENT_WRITE and c.sent < size:
                    end = min(size, c.sent + c.next_chunk)
                    try:
                        n = c.sock.send(c.payload[c.sent : end])
                    except BlockingIOError:
                        n = 0
                    c.sent += n
                    if c.sent == end:
                        c.next_chunk = c.rng.randint(1, 64 * KiB)
                    if c.sent == size:
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                if events & selectors.EVENT_READ:
                    try:
                        data = c.sock.recv(256 * KiB)
                    except BlockingIOError:
                        continue
                    assert data, f"EOF after {c.received} of {size} echoed bytes"
                    c.hasher.update(data)
                    c.received += len(data)
                    assert c.received <= c.sent, "received more than was sent"
                    if c.received == size:
                        sel.unregister(c.sock)
                        remaining -= 1
        for c in clients:
            assert c.hasher.digest() == hashlib.sha256(c.payload).digest()
    finally:
        sel.close()
        for c in clients:
            c.sock.close()


class Counting(rsepoll.Server):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.opened = set()
        self.closed = []

    def on_connection_opened(self, conn):
        self.opened.add(conn)

    def on_connection_closed(self, conn):
        self.closed.append(conn)


@pytest.mark.timeout(90)
def test_200_clients_1mib_random_chunks_echo():
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    with running(Counting, max_fds=8192) as (server, port):
        _echo_many(port, n_clients=200, size=MiB, seed=seed, deadline_s=60)
        assert wait_until(lambda: len(server.closed) == 200, timeout=10)
        assert len(server.opened) == 200
        assert set(server.closed) == server.opened


@pytest.mark.timeout(60)
def test_burst_then_silence_is_fully_echoed():
    """8 MiB written in one go, then nothing more: every byte must come back.

    Catches edge-triggered loops that read a budget and never come back to a
    socket whose data is still in the kernel.
    """
    payload = os.urandom(8 * MiB)
    with running() as (_server, port), connect(port) as c:
        errors = []

        def writer():
            try:
                c.sendall(payload)
            except OSError as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        got = recv_exactly(c, len(payload))
        t.join(10)
        assert not t.is_alive()
        assert errors == []
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


class Flooder(rsepoll.Server):
    """On a b"G" request sends ``self.chunks`` with one send_message each."""

    def __init__(self, chunks, *a, **kw):
        super().__init__(*a, **kw)
        self.chunks = chunks
        self.results = []
        self.requests = 0

    def on_message_received(self, conn, data):
        if data == b"G":
            self.requests += 1
            for chunk in self.chunks:
                self.results.append(self.send_message(conn, chunk))
        else:
            self.send_message(conn, data)


@pytest.mark.timeout(60)
def test_slow_reader_gets_everything_and_does_not_block_others():
    chunk = 64 * KiB
    total = 8 * MiB
    payload = os.urandom(total)
    chunks = [payload[i : i + chunk] for i in range(0, total, chunk)]
    with running(Flooder, chunks) as (server, port):
        with connect(port, rcvbuf=64 * KiB) as slow, connect(port) as other:
            slow.sendall(b"G")
            # on_message_received queued all 8 MiB without blocking the loop...
            assert wait_until(lambda: len(server.results) == len(chunks), timeout=20)
            assert server.results == [True] * len(chunks)
            # ...and while the slow client reads nothing, others are served.
            for i in range(20):
                msg = f"ping {i}".encode()
                other.sendall(msg)
                assert recv_exactly(other, len(msg)) == msg
            got = recv_exactly(slow, total)
            assert got == payload
            # Nothing extra follows.
            slow.sendall(b"tail")
            assert recv_exactly(slow, 4) == b"tail"
        assert server.requests == 1
