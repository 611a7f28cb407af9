"""examples/: each example runs as a child process, talks with real clients over
loopback, and stops with exit status 0 on SIGTERM.

The real tools (redis-cli, redis-benchmark, curl, wrk, ab) are used where
installed; .ci/run installs them. Every load is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import (
    TESTS_DIR,
    ChildProcess,
    connect,
    no_traceback,
    recv_exactly,
    recv_until_eof,
    wait_listening,
)

pytestmark = pytest.mark.timeout(60)

EXAMPLES_DIR = os.path.join(os.path.dirname(TESTS_DIR), "examples")

#: Windows has no SIGTERM (``send_signal`` terminates the process outright).
HAS_SIGTERM = sys.platform != "win32"
NO_SIGTERM = "Windows has no SIGTERM: Popen.send_signal(SIGTERM) is TerminateProcess"


@contextlib.contextmanager
def example(name: str, *args: str) -> Iterator[tuple[ChildProcess, int]]:
    """Runs ``examples/<name> 0 *args``; yields the child and the port it serves."""
    argv = [sys.executable, os.path.join(EXAMPLES_DIR, name), "0", *args]
    with ChildProcess(argv) as child:
        yield child, wait_listening(child)


def stop(child: ChildProcess) -> None:
    """SIGTERM: the example must stop gracefully, with exit status 0 and no
    traceback. On Windows (no SIGTERM; test_stops_on_sigterm is skipped there)
    it is killed."""
    if not HAS_SIGTERM:
        child.kill()
        return
    child.signal(signal.SIGTERM)
    assert child.wait(10) == 0, child.stderr
    assert no_traceback(child.stderr), child.stderr


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run_tool(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------
# Every example
# ---------------------------------------------------------------------------

ALL = [
    "reverse.py",
]


def test_every_example_is_tested_here():
    assert sorted(f for f in os.listdir(EXAMPLES_DIR) if f.endswith(".py")) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_each_example_says_what_it_shows_and_how_to_try_it(name):
    with open(os.path.join(EXAMPLES_DIR, name), encoding="utf-8") as f:
        source = f.read()
    assert source.startswith('"""'), f"{name} starts with no docstring"
    docstring = source.split('"""')[1]
    assert "Try it:" in docstring
    assert f"python examples/{name} " in docstring


#: For each example: extra arguments, and a request with the end of its reply.
PROBES = {
    "reverse.py": ([], b"ab\n", b"ba\n"),
}


def recv_until(sock: socket.socket, suffix: bytes, limit: int = 1 << 16) -> bytes:
    data = b""
    while not data.endswith(suffix):
        chunk = sock.recv(4096)
        assert chunk, f"EOF before {suffix!r}: {data!r}"
        data += chunk
        assert len(data) <= limit, data
    return data


@pytest.mark.skipif(not HAS_SIGTERM, reason=NO_SIGTERM)
@pytest.mark.parametrize("name", ALL)
def test_stops_on_sigterm_closing_an_open_connection(name):
    args, request, reply_end = PROBES[name]
    with example(name, *args) as (child, port):
        listening = next(line for line in child.stdout.splitlines() if "listening on" in line)
        assert f"127.0.0.1:{port}" in listening  # loopback unless told otherwise
        with connect(port) as client:
            client.sendall(request)
            recv_until(client, reply_end)
            child.signal(signal.SIGTERM)
            assert child.wait(10) == 0, child.stderr
            assert recv_until_eof(client) == b""  # a graceful close: FIN
        assert no_traceback(child.stderr), child.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is loopback only on Linux")
def test_host_option_serves_another_address():
    with example("reverse.py", "--host", "127.0.0.2") as (child, port):
        assert f"127.0.0.2:{port}" in child.stdout
        with connect(port, host="127.0.0.2") as c:
            c.sendall(b"abc\n")
            assert recv_exactly(c, 4) == b"cba\n"
        stop(child)


# ---------------------------------------------------------------------------
# reverse.py
# ---------------------------------------------------------------------------


def test_reverse_answers_each_line_in_order_and_exit_closes():
    with example("reverse.py") as (child, port):
        with connect(port) as a, connect(port) as b:
            # Two lines in one send, a third split across sends, CRLF too.
            a.sendall(b"hello\nworld\nstre")
            b.sendall(b"b's line\r\n")
            assert recv_exactly(b, 9) == b"enil s'b\n"
            a.sendall(b"am\r\n")
            assert recv_exactly(a, 19) == b"olleh\ndlrow\nmaerts\n"
            # Replies queued before "exit" still arrive, then EOF; what
            # follows "exit" is not answered.
            a.sendall(b"last\nexit\nignored\n")
            assert recv_until_eof(a) == b"tsal\n"
            b.sendall(b"still here\n")
            assert recv_exactly(b, 11) == b"ereh llits\n"
        stop(child)
