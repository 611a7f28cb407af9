"""Out of file descriptors: the server neither spins nor stalls for good.

Under edge triggering, a listener whose accept failed with EMFILE is never
reported again while its queued connections wait. The server turns those
clients away at once with a descriptor it keeps in reserve, instead of
leaving them hanging, and accepts again once descriptors free up.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time

import pytest
from conftest import ChildProcess, connect

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        sys.platform == "win32",
        reason="RLIMIT_NOFILE and EMFILE are POSIX; Windows has no per-process limit to hit",
    ),
]

SERVER = textwrap.dedent(
    """
    import resource
    import rsepoll

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))

    class Holder(rsepoll.Server):
        held = []

        def on_listen_success(self):
            print("PORT", listener.port, flush=True)

        def on_connection_opened(self, conn):
            self.held.append(conn)

        def on_message_received(self, conn, data):
            if data == b"release":
                for held in self.held:
                    if held is not conn:
                        self.close_connection(held)
                self.held = [conn]
            self.send_message(conn, data)

        def on_exception_occurred(self, exc):
            print("EXC", type(exc).__name__, exc, flush=True)

    # The connection limit above the descriptor limit, so that accepting
    # runs out of descriptors first.
    server = Holder(max_fds=48, max_connections=1000)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    listener.close()
    try:
        server.listen()
    except KeyboardInterrupt:
        pass
    """
)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def outcome(sock: socket.socket) -> bytes:
    """What a client gets for b"ping": the echo, or b"" when the server closed
    it (then the client closes too, as real clients do, which lets the server
    release the fd of its lingering close)."""
    data = b""
    try:
        sock.sendall(b"ping")
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        data = b""
    if data != b"ping":
        sock.close()
    return data


def test_accept_under_emfile_neither_spins_nor_stalls(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    child = ChildProcess([sys.executable, str(script)], cwd=str(tmp_path))
    clients: list[socket.socket] = []
    with child:
        try:
            port = int(child.wait_for_output(r"PORT (\d+)", stream="out").group(1))
            # More clients than the server has fds: the last ones stay queued in the
            # kernel's accept backlog.
            for _ in range(60):
                clients.append(connect(port))
            child.wait_for_output(r"EXC OSError .*accepting", stream="out")
            started = time.monotonic()
            cpu_before = cpu_seconds(child.proc.pid)
            time.sleep(1.5)
            cpu_used = cpu_seconds(child.proc.pid) - cpu_before
            assert cpu_used < 0.1, f"server used {cpu_used:.2f} s of CPU in 1.5 s at EMFILE"
            reports = child.stdout.count("EXC OSError")
            elapsed = time.monotonic() - started
            assert reports <= elapsed + 2, f"{reports} accept errors reported in {elapsed:.1f} s"

            # Every client was either served or turned away promptly (EOF or
            # reset); none was left waiting in the backlog.
            results = []
            for c in clients[1:]:
                c.settimeout(2.0)
                results.append(outcome(c))
            assert all(r in (b"", b"ping") for r in results), results
            assert results.count(b"") > 0, "no client was turned away"

            # Free fds: new clients are served again.
            assert outcome(clients[0]) == b"ping"
            clients[0].sendall(b"release")
            assert clients[0].recv(7) == b"release"
            # The held clients see their close and close too, as real clients
            # do, which ends the server's lingering close.
            for c, result in zip(clients[1:], results):
                if result == b"ping":
                    assert c.recv(16) == b""
                    c.close()
            deadline = time.monotonic() + 5
            served = False
            while not served and time.monotonic() < deadline:
                newcomer = connect(port)
                clients.append(newcomer)
                newcomer.settimeout(2.0)
                served = outcome(newcomer) == b"ping"
                if not served:
                    time.sleep(0.1)
            assert served, "no new client was served after fds were freed"
        finally:
            for c in clients:
                c.close()
            child.signal(2)
            child.wait(10)
