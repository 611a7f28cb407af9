"""Flow control: a client that sends without reading cannot grow the
server's memory past its watermarks, loses nothing, and the application can
pause and resume reading by hand."""

from __future__ import annotations

import hashlib
import sys
import threading
import time

import pytest
import rsepoll
from conftest import connect, recv_exactly, running, wait_until

HIGH = 1 << 20
LOW = 256 << 10
RING_SLOTS = 64
SLOT_SIZE = 16384
RING_BYTES = RING_SLOTS * SLOT_SIZE


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Echo(rsepoll.Server):
    """Echoes and records the largest output queue it saw."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.conns: list[rsepoll.Connection] = []
        self.peak_pending = 0

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.conns.append(conn)

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.send_message(conn, data)
        self.peak_pending = max(self.peak_pending, conn.pending_bytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_a_client_that_never_reads_is_slowed_and_loses_nothing() -> None:
    total = 64 << 20
    # Byte i of the stream is i % 256, whatever the chunking.
    pattern = bytes(range(256)) * 256  # 64 KiB
    with running(
        Echo,
        write_buffer_high=HIGH,
        write_buffer_low=LOW,
        ring_slots=RING_SLOTS,
        slot_size=SLOT_SIZE,
    ) as (server, port):
        # Touch the rings once, so that their pages count in the baseline.
        warm = connect(port)
        warm.sendall(pattern * 32)
        assert recv_exactly(warm, len(pattern) * 32) == pattern * 32
        warm.close()
        baseline = rss_bytes()

        client = connect(port)
        client.setblocking(False)
        sent = 0
        peak_rss = baseline
        last_progress = time.monotonic()
        deadline = last_progress + 30
        # Send without reading until the server stops taking more for 1 s.
        while sent < total and time.monotonic() - last_progress < 1.0:
            assert time.monotonic() < deadline, "bounded by time"
            try:
                sent += client.send(pattern[sent % 256 :][: total - sent])
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.005)
            peak_rss = max(peak_rss, rss_bytes())
        assert sent < total, "the server kept reading a client that never reads"
        conn = server.conns[-1]
        assert server.peak_pending <= HIGH + RING_BYTES, server.peak_pending
        growth = peak_rss - baseline
        assert growth <= 4 * HIGH + 2 * RING_BYTES, f"RSS grew by {growth >> 10} KiB"

        # Now read everything while sending the rest: all of it, in order.
        client.setblocking(True)
        client.settimeout(30)
        sender_error: list[BaseException] = []

        def send_rest(start: int = sent) -> None:
            try:
                offset = start
                while offset < total:
                    piece = pattern[offset % 256 :][: total - offset]
                    client.sendall(piece)
                    offset += len(piece)
            except BaseException as exc:
                sender_error.append(exc)

        rest = threading.Thread(target=send_rest)
        rest.start()
        expected = hashlib.sha256(pattern * (total // len(pattern)))
        got = hashlib.sha256()
        received = 0
        while received < total:
            chunk = client.recv(1 << 20)
            assert chunk, f"EOF after {received} bytes"
            got.update(chunk)
            received += len(chunk)
        rest.join(30)
        assert not sender_error, sender_error
        assert got.hexdigest() == expected.hexdigest()
        assert wait_until(lambda: conn.pending_bytes == 0, 5.0)
        client.close()


def test_pause_reading_holds_input_until_resume() -> None:
    received: list[bytes] = []
    opened = threading.Event()

    class Pausing(rsepoll.Server):
        def on_connection_opened(self, conn: rsepoll.Connection) -> None:
            self.conn = conn
            assert self.pause_reading(conn) is True
            opened.set()

        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            received.append(data)

    with running(Pausing) as (server, port):
        client = connect(port)
        assert opened.wait(5)
        client.sendall(b"held back")
        time.sleep(0.3)
        assert received == []
        assert server.resume_reading(server.conn) is True
        assert wait_until(lambda: b"".join(received) == b"held back", 5.0)
        client.close()
        assert wait_until(lambda: not server.conn.is_open, 5.0)
        assert server.pause_reading(server.conn) is False


def test_watermarks_are_validated() -> None:
    with pytest.raises(ValueError, match="write_buffer_low"):
        rsepoll.Server(write_buffer_high=100, write_buffer_low=200)
    with pytest.raises(ValueError, match="write_buffer_high"):
        rsepoll.Server(write_buffer_high=0, write_buffer_low=0)
