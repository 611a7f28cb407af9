"""The reliability suite: many clients at once with random message sizes in
random chunkings, abrupt resets in the middle of sends, and a flooding
client beside a latency-sensitive one. Loopback only; every test is bounded
in time and data."""

from __future__ import annotations

import contextlib
import math
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest
import rsepoll
from conftest import connect, recv_exactly, running, wait_until

pytestmark = pytest.mark.timeout(120)


class Echo(rsepoll.Server):
    """Echoes every message; framed modes frame the reply."""

    def on_exception_occurred(self, exc: BaseException) -> None:
        raise AssertionError(f"unexpected report: {exc!r}") from exc


def encode(framing: str, message: bytes) -> bytes:
    if framing == "line":
        return message + b"\n"
    if framing == "length":
        return struct.pack(">I", len(message)) + message
    return message


def log_uniform_size(rng: random.Random, largest: int) -> int:
    return int(math.exp(rng.uniform(0, math.log(largest + 1)))) - 1


@dataclass
class TortureClient:
    """One non-blocking client: sends its messages in random chunks and
    checks that the echo is exactly what it sent."""

    sock: socket.socket
    outgoing: bytes
    expected: bytes
    rng: random.Random
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)

    def send_some(self) -> None:
        if self.sent < len(self.outgoing):
            size = self.rng.choice((1, 7, 512, 4096, 65536, 1 << 20))
            with contextlib.suppress(BlockingIOError):
                self.sent += self.sock.send(self.outgoing[self.sent : self.sent + size])

    def receive_some(self) -> None:
        with contextlib.suppress(BlockingIOError):
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                raise AssertionError(f"EOF after {len(self.received)} of {len(self.expected)}")
            self.received += chunk

    @property
    def done(self) -> bool:
        return len(self.received) >= len(self.expected)


def run_torture(port: int, framing: str, clients: int, messages: int, seed: int) -> int:
    """Drives ``clients`` connections at once; returns the bytes echoed."""
    rng = random.Random(seed)
    selector = selectors.DefaultSelector()
    pending: list[TortureClient] = []
    for i in range(clients):
        payloads = []
        for _ in range(messages):
            size = log_uniform_size(rng, 256 * 1024)
            byte = rng.randrange(256) if framing != "line" else rng.choice(b"abcdefgh")
            payloads.append(bytes([byte]) * size)
        wire = b"".join(encode(framing, p) for p in payloads)
        sock = connect(port)
        sock.setblocking(False)
        client = TortureClient(sock, wire, wire, random.Random(seed * 1000 + i))
        pending.append(client)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
    total = sum(len(c.expected) for c in pending)
    deadline = time.monotonic() + 90
    remaining = len(pending)
    try:
        while remaining:
            assert time.monotonic() < deadline, f"{remaining} clients unfinished"
            for key, events in selector.select(timeout=1.0):
                client: TortureClient = key.data
                if events & selectors.EVENT_WRITE:
                    client.send_some()
                    if client.sent == len(client.outgoing):
                        selector.modify(client.sock, selectors.EVENT_READ, client)
                if events & selectors.EVENT_READ:
                    client.receive_some()
                    if client.done:
                        assert bytes(client.received) == client.expected, "echo differs"
                        selector.unregister(client.sock)
                        remaining -= 1
    finally:
        selector.close()
        for client in pending:
            client.sock.close()
    return total


@pytest.mark.parametrize("framing", ["raw", "line", "length"])
def test_torture_500_clients_random_sizes_and_chunkings(framing: str) -> None:
    with running(Echo, framing=framing, max_connections=1000) as (server, port):
        total = run_torture(port, framing, clients=500, messages=5, seed=len(framing))
        assert total > 10 << 20
        assert wait_until(lambda: server.stats()["connections_open"] == 0, 10.0)


def test_abrupt_resets_in_the_middle_of_sends_hurt_nobody_else() -> None:
    """Clients that reset while the server is sending to them, mid-message,
    while well-behaved clients keep echoing: the good ones get every byte,
    the server keeps serving."""
    errors: list[BaseException] = []

    def resetter(port: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):
            sock = connect(port)
            try:
                sock.sendall(encode("length", b"r" * rng.randrange(1, 300_000)))
                time.sleep(rng.uniform(0, 0.01))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            finally:
                sock.close()

    def good(port: int, seed: int) -> None:
        try:
            run_torture(port, "length", clients=20, messages=5, seed=seed)
        except BaseException as exc:
            errors.append(exc)

    with running(Echo, framing="length") as (server, port):
        threads = [threading.Thread(target=resetter, args=(port, i)) for i in range(8)]
        threads.append(threading.Thread(target=good, args=(port, 99)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[0]
        assert wait_until(lambda: server.stats()["connections_open"] == 0, 10.0)
        closes = server.stats()["closes"]
        assert closes["reset"] + closes["peer"] == server.stats()["connections_closed"]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure_ping_under_flood(port: int, rounds: int = 300) -> tuple[float, float, int]:
    """Round trips of a small request while another client floods the server
    with 64 KiB writes (and reads its echoes). Returns (p50, p99, flooded)."""
    stop = threading.Event()
    flooded = [0]

    def flood() -> None:
        sock = connect(port)
        sock.setblocking(False)
        chunk = b"f" * 65536
        try:
            while not stop.is_set():
                with contextlib.suppress(BlockingIOError):
                    flooded[0] += sock.send(chunk)
                with contextlib.suppress(BlockingIOError):
                    while sock.recv(1 << 20):
                        pass
        finally:
            sock.close()

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        time.sleep(0.3)  # the flood is under way
        ping = connect(port)
        ping.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            ping.sendall(b"ping-1234567890!")
            assert recv_exactly(ping, 16) == b"ping-1234567890!"
            samples.append(time.perf_counter() - started)
        ping.close()
    finally:
        stop.set()
        flooder.join(10)
    return percentile(samples, 0.5), percentile(samples, 0.99), flooded[0]


def test_a_flooding_client_does_not_starve_a_small_one() -> None:
    with running(Echo) as (_server, port):
        p50, p99, flooded = measure_ping_under_flood(port)
    print(
        f"\nping under flood: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
        f"{flooded >> 20} MiB flooded"
    )
    assert flooded > 1 << 20, "the flood did not get going"
    # Generous: the two threads and the flooder share two CPUs.
    assert p99 < 0.25, f"p99 {p99 * 1e3:.1f} ms"
