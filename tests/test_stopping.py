"""What stopping and pausing promise, under the load that used to break it.

Each test here reproduces a way a stop or a pause once broke its documented
promise: a busy framed client that kept the stop reading (and so reset every
other client), messages a paused connection had read that a stop dropped,
Ctrl-C dropping input already read, and a paused connection whose reset went
unreported. Each runs on both backends and with two I/O threads, like the rest
of the suite.
"""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import rsepoll
from conftest import (
    ChildProcess,
    connect,
    needs_visible_resets,
    recv_until_eof,
    running,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

LINES = 2000


def test_a_busy_framed_client_does_not_keep_a_stop_reading() -> None:
    """Stopping reads no new input, whatever a busy client still sends, and
    every other connection ends with FIN at once, not with a reset at the
    stop's deadline."""
    received: list[bytes] = []
    first = threading.Event()

    class Slow(rsepoll.Server):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            received.append(data)
            first.set()
            time.sleep(0.0002)

    stopped = threading.Event()
    # Lines long enough that one read holds fewer than a connection's share
    # of the ring: the decoder then often holds nothing back.
    before_stop = b"b" * 1500 + b"\n"
    after_stop = b"a" * 1500

    def pipeline(sock: socket.socket) -> None:
        # Lines before the stop, then lines sent well after it began.
        try:
            while not stopped.is_set():
                sock.sendall(before_stop * 8)
            time.sleep(0.3)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                sock.sendall((after_stop + b"\n") * 8)
        except OSError:
            pass

    with running(Slow, framing="line") as (server, port):
        # Two connections per I/O thread at least, so that the idle one shares
        # an I/O thread with the busy one whatever the count.
        idle = [connect(port) for _ in range(max(server.io_threads, 1))]
        busy = connect(port)
        sender = threading.Thread(target=pipeline, args=(busy,))
        sender.start()
        assert first.wait(5)
        time.sleep(0.2)
        began = time.monotonic()
        server.stop_server(5.0)
        stopped.set()
        for sock in idle:
            sock.settimeout(10)
            assert sock.recv(1) == b"", "an idle client got data, not FIN"
            sock.close()
        took = time.monotonic() - began
        sender.join(10)
        busy.close()
        assert wait_until(lambda: not server.test_thread.is_alive(), 10.0)
    # A reset at the deadline (5 s) would have come as ConnectionResetError;
    # a FIN delayed to the deadline shows here.
    assert took < 2.5, f"the idle clients' FIN took {took:.2f} s"
    assert after_stop not in received, "input sent after the stop was delivered"


@pytest.mark.parametrize("hold", ["pause", "throttle", "deadline"])
def test_a_stop_delivers_what_a_held_framed_connection_had_read(hold: str) -> None:
    """Messages a paused (or throttled) framed connection had already read
    still reach the callbacks when the server stops, and so do those of a
    connection the stop's deadline resets."""
    received: list[bytes] = []
    big = b"x" * (8 << 20)

    class Holding(rsepoll.Server):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            received.append(data)
            if len(received) == 1:
                if hold == "pause":
                    assert self.pause_reading(conn) is True
                elif hold == "deadline":
                    # The deadline passes while this callback still runs.
                    self.stop_server(0.001)
                    time.sleep(0.05)
                    return
                else:
                    # More than the socket takes, past write_buffer_high: the
                    # connection stops reading while the client reads nothing.
                    self.send_message(conn, big)
                self.stop_server(2.0)

    payload = b"".join(b"%d\n" % i for i in range(LINES))
    with running(Holding, framing="line", write_buffer_high=64 * 1024, write_buffer_low=0) as (
        server,
        port,
    ):
        client = connect(port)
        client.sendall(payload)
        assert wait_until(lambda: not server.test_thread.is_alive(), 10.0)
        client.close()
    assert received == payload.splitlines()


class Pausing(rsepoll.Server):
    """Pauses every connection as it opens, and records what reaches it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[bytes] = []
        self.reasons: list[str | None] = []
        self.opened = threading.Event()

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.conn = conn
        self.pause_reading(conn)
        self.opened.set()

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.received.append(data)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.reasons.append(conn.close_reason)


def reset_a_paused_connection(port: int, server: Pausing) -> None:
    """Sends some input to a paused connection, then resets it."""
    client = connect(port)
    assert server.opened.wait(5)
    client.sendall(b"before the reset")
    time.sleep(0.2)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()


@needs_visible_resets
@pytest.mark.skipif(
    sys.platform == "darwin",
    reason="kqueue has no hang-up filter: a paused connection hears of a reset when "
    "reading resumes (test_a_paused_connection_on_macos_reports_a_reset_on_resume)",
)
def test_a_paused_connection_reports_a_reset_after_the_input_before_it() -> None:
    """A paused connection whose peer resets is reported closed while still
    paused, after the input sent before the reset."""
    with running(Pausing) as (server, port):
        reset_a_paused_connection(port, server)
        assert wait_until(lambda: server.reasons, 5.0), "a reset went unreported while paused"
        assert b"".join(server.received) == b"before the reset"
        assert server.reasons == ["reset"]
        assert server.conn.is_open is False
        assert server.send_message(server.conn, b"late") is False
        assert wait_until(lambda: server.stats()["connections_open"] == 0, 5.0)


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import rsepoll

    class S(rsepoll.Server):
        calls = 0

        def on_listen_success(self):
            print("READY", flush=True)

        def on_message_received(self, conn, data):
            S.calls += 1
            self.send_message(conn, data)
            if S.calls == 1:
                # Interrupts this callback, after its reply.
                os.kill(os.getpid(), signal.SIGINT)

    server = S(framing="line")
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    print("PORT", listener.port, flush=True)
    try:
        server.listen()
    except KeyboardInterrupt:
        print("KI", S.calls, flush=True)
        sys.exit(0)
    print("RETURNED", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (SIGINT by kill)")
def test_ctrl_c_delivers_input_already_read_and_sends_the_replies(tmp_path) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    with ChildProcess([sys.executable, str(script)]) as child:
        port = int(child.wait_for_output(r"PORT (\d+)").group(1))
        child.wait_for_output("READY")
        client = connect(port)
        payload = b"".join(b"%d\n" % i for i in range(LINES))
        client.sendall(payload)
        client.settimeout(15)
        replies = recv_until_eof(client)
        client.close()
        assert child.wait(15) == 0
        assert f"KI {LINES}" in child.stdout
    assert replies == payload


def test_an_idle_timeout_waits_for_the_messages_a_decoder_holds() -> None:
    """A connection whose decoder still holds messages it read is not idle:
    the server, not the peer, is behind, and those messages still reach the
    callbacks before the idle timeout may close it."""
    received: list[bytes] = []
    reasons: list[str | None] = []

    class Slow(rsepoll.Server):
        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            received.append(data)
            time.sleep(0.005)

        def on_connection_closed(self, conn: rsepoll.Connection) -> None:
            reasons.append(conn.close_reason)

    payload = b"".join(b"%d\n" % i for i in range(300))
    with running(Slow, framing="line", idle_timeout=0.3) as (_, port):
        client = connect(port)
        client.sendall(payload)
        assert wait_until(lambda: reasons, 10.0)
        client.close()
    assert received == payload.splitlines()
    assert reasons == ["idle_timeout"]


CUT_SCRIPT = textwrap.dedent(
    """
    import sys

    import rsepoll

    BIG = b"x" * (8 << 20)

    class S(rsepoll.Server):
        def on_listen_success(self):
            print("READY", flush=True)

        def on_message_received(self, conn, data):
            # More than the socket takes: output stays queued while the client
            # reads nothing.
            self.send_message(conn, BIG)
            print("QUEUED", flush=True)

    server = S(framing="line")
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    print("PORT", listener.port, flush=True)
    try:
        server.listen()
    except KeyboardInterrupt:
        print("KI", flush=True)
        sys.exit(0)
    """
)


@needs_visible_resets
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (SIGINT by kill)")
def test_a_second_ctrl_c_cuts_the_stop_short(tmp_path) -> None:
    """The first Ctrl-C stops as stop_server() does, giving queued output the
    stop's timeout (5 s); a second one resets what is still open at once."""
    script = tmp_path / "cut.py"
    script.write_text(CUT_SCRIPT)
    with ChildProcess([sys.executable, str(script)]) as child:
        port = int(child.wait_for_output(r"PORT (\d+)").group(1))
        child.wait_for_output("READY")
        client = connect(port)
        client.sendall(b"go\n")
        child.wait_for_output("QUEUED")
        began = time.monotonic()
        child.signal(signal.SIGINT)
        time.sleep(0.5)
        assert child.proc.poll() is None, "the first Ctrl-C did not wait for the output"
        child.signal(signal.SIGINT)
        assert child.wait(10) == 0
        took = time.monotonic() - began
        assert "KI" in child.stdout
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while client.recv(1 << 20):
                pass
        client.close()
    assert took < 3.0, f"the second Ctrl-C took {took:.2f} s to end the server"


@needs_visible_resets
@pytest.mark.skipif(sys.platform != "darwin", reason="the macOS behaviour (kqueue)")
def test_a_paused_connection_on_macos_reports_a_reset_on_resume() -> None:
    """What docs/api.md says of macOS: a paused connection's reset is noticed
    once reading resumes, after the input sent before it."""
    with running(Pausing) as (server, port):
        reset_a_paused_connection(port, server)
        time.sleep(0.3)
        server.resume_reading(server.conn)
        assert wait_until(lambda: server.reasons, 5.0)
        assert b"".join(server.received) == b"before the reset"
        assert server.reasons == ["reset"]
