"""Signals with listen() in the main thread of a child process."""

from __future__ import annotations

import signal
import socket
import struct
import sys
import textwrap
import time

import pytest
from conftest import ChildProcess, assert_eof, connect, no_traceback, recv_exactly

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        sys.platform == "win32", reason="POSIX signals (SIGINT by kill, SIGUSR1, SIGPIPE)"
    ),
]

SERVER_SCRIPT = textwrap.dedent(
    """
    import signal
    import sys

    import rsepoll

    LISTEN_TIMEOUT = {listen_timeout!r}
    FLOOD = 16 * 1024 * 1024
    CHUNK = 64 * 1024

    if {sigpipe_default!r}:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


    class S(rsepoll.Server):
        def on_listen_success(self):
            print("READY", flush=True)

        def on_message_received(self, conn, data):
            if data.startswith(b"flood"):
                piece = b"f" * CHUNK
                for _ in range(FLOOD // CHUNK):
                    self.send_message(conn, piece)
                print("FLOODED", flush=True)
            else:
                self.send_message(conn, data)

        def on_connection_closed(self, conn):
            print("CLOSED", conn.id, flush=True)

        def on_shutdown_success(self):
            print("SHUTDOWN", flush=True)


    server = S()
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    print("PORT", listener.port, flush=True)
    signal.signal(signal.SIGUSR1, lambda signum, frame: server.stop_server())
    try:
        if LISTEN_TIMEOUT is None:
            server.listen()
        else:
            server.listen(timeout=LISTEN_TIMEOUT)
    except KeyboardInterrupt:
        print("KI", flush=True)
        sys.exit(0)
    print("RETURNED", flush=True)
    sys.exit(0)
    """
)


def start_script(tmp_path, listen_timeout=None, sigpipe_default=False):
    script = tmp_path / "server_script.py"
    script.write_text(
        SERVER_SCRIPT.format(listen_timeout=listen_timeout, sigpipe_default=sigpipe_default)
    )
    child = ChildProcess([sys.executable, str(script)], cwd=str(tmp_path))
    child.wait_for_output(r"READY", stream="out")
    port = int(child.wait_for_output(r"PORT (\d+)", stream="out").group(1))
    return child, port


@pytest.mark.parametrize("listen_timeout", [None, 10_000])
def test_sigint_propagates_keyboard_interrupt_out_of_listen(tmp_path, listen_timeout):
    child, port = start_script(tmp_path, listen_timeout=listen_timeout)
    with child, connect(port) as c:
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        t0 = time.monotonic()
        child.signal(signal.SIGINT)
        rc = child.wait(5)
        elapsed = time.monotonic() - t0
        assert rc == 0, child.stderr
        lines = child.stdout.splitlines()
        assert "KI" in lines, child.stdout
        assert "RETURNED" not in lines
        assert "SHUTDOWN" in lines, child.stdout
        assert lines.index("SHUTDOWN") < lines.index("KI")
        assert any(line.startswith("CLOSED") for line in lines)
        assert elapsed < 2.0, f"took {elapsed:.2f} s to stop after SIGINT"
        assert no_traceback(child.stderr), child.stderr
        assert_eof(c)


def test_stop_server_from_signal_handler(tmp_path):
    child, port = start_script(tmp_path, listen_timeout=10_000)
    with child, connect(port) as c:
        c.sendall(b"hi")
        assert recv_exactly(c, 2) == b"hi"
        t0 = time.monotonic()
        child.signal(signal.SIGUSR1)
        rc = child.wait(5)
        elapsed = time.monotonic() - t0
        assert rc == 0, child.stderr
        lines = child.stdout.splitlines()
        assert "RETURNED" in lines and "SHUTDOWN" in lines, child.stdout
        assert "KI" not in lines
        assert elapsed < 2.0, f"took {elapsed:.2f} s to stop after SIGUSR1"
        assert no_traceback(child.stderr), child.stderr
        assert_eof(c)


def test_reset_peer_with_sigpipe_default_does_not_kill_server(tmp_path):
    child, port = start_script(tmp_path, sigpipe_default=True)
    with child:
        victim = connect(port, rcvbuf=4096)
        try:
            victim.sendall(b"flood")
            child.wait_for_output(r"FLOODED", stream="out")
            assert victim.recv(1024)[:1] == b"f"
        finally:
            # Abortive close: RST while the server still has MiBs queued.
            victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            victim.close()
        child.wait_for_output(r"CLOSED", stream="out")
        # Give the server a chance to write into the dead socket again.
        for i in range(20):
            assert child.proc.poll() is None, (
                f"server died: rc={child.proc.returncode} {child.stderr}"
            )
            with connect(port) as c:
                msg = b"after reset %d" % i
                c.sendall(msg)
                assert recv_exactly(c, len(msg)) == msg
        assert child.proc.poll() is None
        assert no_traceback(child.stderr), child.stderr
        child.signal(signal.SIGUSR1)
        assert child.wait(5) == 0


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import signal
    import sys

    import rsepoll

    MODE = {mode!r}


    def previous(signum, frame):
        print("PREVIOUS HANDLER", flush=True)


    class S(rsepoll.Server):
        def on_listen_success(self):
            print("READY", flush=True)
            if MODE.endswith("-signalled-at-start"):
                # What a supervisor that waits for the ready line may do.
                import os

                os.kill(os.getpid(), signal.SIGTERM)

        def on_connection_closed(self, conn):
            print("CLOSED", conn.close_reason, flush=True)

        def on_shutdown_success(self):
            print("SHUTDOWN", flush=True)


    server = S(framing="line")
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    print("PORT", listener.port, flush=True)
    signal.signal(signal.SIGTERM, previous)
    if MODE in ("listen", "listen-signalled-at-start"):
        server.listen()
    elif MODE == "listen-unhandled":
        server.listen(handle_signals=False)
    elif MODE in ("serve", "serve-signalled-at-start"):
        asyncio.run(server.serve())
    elif MODE == "serve-unhandled":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        asyncio.run(server.serve(handle_signals=False))
    else:  # serve-beside-the-loop's-handler
        async def main():
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, lambda: print("LOOP HANDLER", flush=True))
            serving = asyncio.ensure_future(server.serve())
            print("SERVING", flush=True)
            await serving

        asyncio.run(main())
    print("RETURNED", flush=True)
    print("RESTORED", signal.getsignal(signal.SIGTERM) is previous, flush=True)
    """
)


def start_sigterm_script(tmp_path, mode):
    script = tmp_path / "sigterm_script.py"
    script.write_text(SIGTERM_SCRIPT.format(mode=mode))
    child = ChildProcess([sys.executable, str(script)], cwd=str(tmp_path))
    port = int(child.wait_for_output(r"PORT (\d+)", stream="out").group(1))
    child.wait_for_output(r"READY", stream="out")
    return child, port


@pytest.mark.parametrize("mode", ["listen", "serve"])
def test_sigterm_stops_gracefully_and_the_previous_handler_comes_back(tmp_path, mode):
    child, port = start_sigterm_script(tmp_path, mode)
    with child, connect(port) as c:
        c.sendall(b"ping\n")
        assert recv_exactly(c, 5) == b"ping\n"
        child.signal(signal.SIGTERM)
        assert child.wait(10) == 0, child.stderr
        lines = child.stdout.splitlines()
        assert lines[-4:] == ["CLOSED shutdown", "SHUTDOWN", "RETURNED", "RESTORED True"], (
            child.stdout
        )
        assert "PREVIOUS HANDLER" not in lines
        assert no_traceback(child.stderr), child.stderr
        assert_eof(c)


def test_listen_without_signal_handling_leaves_sigterm_to_the_application(tmp_path):
    child, port = start_sigterm_script(tmp_path, "listen-unhandled")
    with child, connect(port) as c:
        child.signal(signal.SIGTERM)
        # The application's own handler ran and the server kept serving.
        child.wait_for_output(r"PREVIOUS HANDLER", stream="out")
        c.sendall(b"still\n")
        assert recv_exactly(c, 6) == b"still\n"
        child.signal(signal.SIGINT)
        child.wait(10)
        assert "RETURNED" not in child.stdout.splitlines()


def test_serve_without_signal_handling_leaves_sigterm_alone(tmp_path):
    child, _ = start_sigterm_script(tmp_path, "serve-unhandled")
    with child:
        child.signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        assert "RETURNED" not in child.stdout.splitlines()


def test_serve_leaves_a_loop_handler_of_the_application_in_place(tmp_path):
    child, port = start_sigterm_script(tmp_path, "serve-beside-the-loop-handler")
    with child, connect(port) as c:
        child.wait_for_output(r"SERVING", stream="out")
        child.signal(signal.SIGTERM)
        child.wait_for_output(r"LOOP HANDLER", stream="out")
        # The application's handler ran, and the server kept serving.
        c.sendall(b"still\n")
        assert recv_exactly(c, 6) == b"still\n"
        child.signal(signal.SIGINT)
        child.wait(10)


@pytest.mark.parametrize("mode", ["listen", "serve"])
def test_sigterm_at_the_ready_line_stops_gracefully(tmp_path, mode):
    script = tmp_path / "sigterm_script.py"
    script.write_text(SIGTERM_SCRIPT.format(mode=f"{mode}-signalled-at-start"))
    child = ChildProcess([sys.executable, str(script)], cwd=str(tmp_path))
    with child:
        assert child.wait(10) == 0, child.stderr
        lines = child.stdout.splitlines()
        assert lines[-3:] == ["SHUTDOWN", "RETURNED", "RESTORED True"], child.stdout
