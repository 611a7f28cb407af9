"""examples/: each example runs as a child process, talks with real clients over
loopback, and stops with exit status 0 on SIGTERM.

The real tools (redis-cli, redis-benchmark, curl, wrk, ab) are used where
installed; .ci/run installs them. Every load is bounded in count and time.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import (
    TESTS_DIR,
    UNDER_WINE,
    ChildProcess,
    LineReader,
    Workers,
    connect,
    no_traceback,
    recv_exactly,
    recv_until_eof,
    wait_listening,
    wait_until,
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
    "resp_server.py",
    "http_hello.py",
    "asyncio_hosted.py",
    "chat.py",
    "rpc_threadpool.py",
]


def test_every_example_is_tested_here():
    assert sorted(f for f in os.listdir(EXAMPLES_DIR) if f.endswith(".py")) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_each_example_says_what_it_shows_and_how_to_try_it(name):
    with open(os.path.join(EXAMPLES_DIR, name), encoding="utf-8") as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    assert docstring, f"{name} has no docstring"
    assert "Try it" in docstring
    assert f"python examples/{name} " in docstring


#: For each example: extra arguments, and a request with the end of its reply.
PROBES = {
    "reverse.py": ([], b"ab\n", b"ba\n"),
    "resp_server.py": ([], b"PING\r\n", b"+PONG\r\n"),
    "http_hello.py": ([], b"GET / HTTP/1.1\r\n\r\n", b"Hello, World!"),
    "asyncio_hosted.py": (["--heartbeat", "60"], b"x\n", b"x\n"),
    "chat.py": ([], b"", b"\n"),  # the welcome line
    "rpc_threadpool.py": ([], b"\0\0\0\x08\0\0\0\x01ping", b"pong"),
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


#: serve() makes its session, which runs on_listen_success, before it arms its
#: SIGTERM handler (python/rsepoll/_serving.py): a SIGTERM in between kills
#: the process (exit status -15 in about a third of the runs here).
SERVE_ARMS_SIGTERM_LATE = pytest.mark.skip(
    reason="serve() runs on_listen_success before it handles SIGTERM (a bug in serve())"
)


@pytest.mark.skipif(not HAS_SIGTERM, reason=NO_SIGTERM)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=SERVE_ARMS_SIGTERM_LATE) if name == "asyncio_hosted.py" else name
        for name in ALL
    ],
)
def test_stops_on_sigterm_as_soon_as_it_says_it_listens(name):
    with example(name) as (child, _):
        child.signal(signal.SIGTERM)
        assert child.wait(10) == 0, child.stderr
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
            # Only "exit" exactly ends the connection; replies queued before
            # it still arrive, then EOF; what follows it is not answered.
            a.sendall(b" exit\nlast\nexit\r\nignored\n")
            assert recv_until_eof(a) == b"tixe \ntsal\n"
            b.sendall(b"still here\n")
            assert recv_exactly(b, 11) == b"ereh llits\n"
        stop(child)


# ---------------------------------------------------------------------------
# resp_server.py
# ---------------------------------------------------------------------------


def resp_command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_resp_pipelined_arrays_and_inline_commands_split_anywhere():
    with example("resp_server.py") as (child, port):
        with connect(port) as c:
            value = bytes(range(256)) * 4  # binary-safe, CRLFs inside
            request = (
                resp_command(b"SET", b"k", value)
                + b"PING\r\n"
                + resp_command(b"GET", b"k")
                + b"incr n\r\n\r\n"  # an empty inline line is no command
                + resp_command(b"INCR", b"n")
                + resp_command(b"ECHO", b"")
                + b"DEL k n missing\n"  # inline, LF only
                + resp_command(b"GET", b"k")
                + resp_command(b"ping", b"hi")
            )
            expected = (
                b"+OK\r\n+PONG\r\n"
                + b"$%d\r\n%s\r\n" % (len(value), value)
                + b":1\r\n:2\r\n$0\r\n\r\n:2\r\n$-1\r\n$2\r\nhi\r\n"
            )
            # All of it in one send, then again one byte at a time.
            c.sendall(request)
            assert recv_exactly(c, len(expected)) == expected
            for i in range(len(request)):
                c.sendall(request[i : i + 1])
            assert recv_exactly(c, len(expected)) == expected
            # Errors answer without closing.
            c.sendall(resp_command(b"SET", b"s", b"abc") + b"INCR s\r\nGET\r\nNOPE x\r\n")
            expected = (
                b"+OK\r\n"
                b"-ERR value is not an integer or out of range\r\n"
                b"-ERR wrong number of arguments for 'get' command\r\n"
                b"-ERR unknown command 'NOPE'\r\n"
            )
            assert recv_exactly(c, len(expected)) == expected
            c.sendall(b"QUIT\r\nPING\r\n")
            assert recv_until_eof(c) == b"+OK\r\n"
        with connect(port) as c:
            c.sendall(b"PING\r\n*1\r\n+PING\r\n")
            assert recv_until_eof(c) == b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n"
        stop(child)


def test_resp_with_redis_cli():
    redis_cli = tool("redis-cli")
    with example("resp_server.py") as (child, port):

        def cli(*args: str) -> str:
            done = run_tool(redis_cli, "--no-raw", "-p", str(port), *args)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert cli("PING") == "PONG\n"
        assert cli("SET", "greeting", "hello world") == "OK\n"
        assert cli("GET", "greeting") == '"hello world"\n'
        assert cli("INCR", "visits") == "(integer) 1\n"
        assert cli("INCR", "visits") == "(integer) 2\n"
        assert cli("GET", "visits") == '"2"\n'
        assert cli("INCR", "greeting") == "(error) ERR value is not an integer or out of range\n"
        assert cli("DEL", "greeting", "visits", "absent") == "(integer) 2\n"
        assert cli("GET", "greeting") == "(nil)\n"
        assert cli("ECHO", "bye") == '"bye"\n'
        assert cli("CONFIG", "GET", "appendonly") == '1) "appendonly"\n2) "no"\n'
        stop(child)


def redis_benchmark(port: int, *extra: str) -> dict[str, float]:
    """Runs a bounded redis-benchmark; returns requests per second by test."""
    done = run_tool(
        tool("redis-benchmark"),
        "-p", str(port), "-q", "-n", "2000", "-c", "10", "-t", "ping,set,get,incr",
        *extra,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "error" not in output.lower() and "warning" not in output.lower(), output
    rates = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"([A-Z_]+): ([\d.]+) requests per second", output)
    }
    assert set(rates) == {"PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"}, output
    assert all(rate > 0 for rate in rates.values()), output
    return rates


def test_resp_with_redis_benchmark_plain_and_pipelined():
    tool("redis-benchmark")
    with example("resp_server.py") as (child, port):
        redis_benchmark(port)
        redis_benchmark(port, "-P", "16")
        # Every INCR ran exactly once: 2000 per run on one key.
        with connect(port) as c:
            c.sendall(b"GET counter:__rand_int__\r\nGET key:__rand_int__\r\n")
            assert recv_exactly(c, 10) == b"$4\r\n4000\r\n"
            assert recv_exactly(c, 9)[:4] == b"$3\r\n"  # SET's 3-byte value
        stop(child)


# ---------------------------------------------------------------------------
# http_hello.py
# ---------------------------------------------------------------------------


def read_response(
    reader: LineReader, head: bool = False
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response: its status line, headers (names lowercased) and body."""
    status = reader.readline()
    assert status.endswith(b"\r"), status
    headers = {}
    while True:
        line = reader.readline()
        assert line.endswith(b"\r"), line
        if line == b"\r":
            break
        name, _, value = line[:-1].partition(b":")
        headers[name.lower()] = value.strip()
    body = b"" if head else reader.read_exactly(int(headers[b"content-length"]))
    return status[:-1], headers, body


def test_http_keep_alive_pipelining_and_closes():
    with example("http_hello.py") as (child, port):
        with connect(port) as c:
            reader = LineReader(c)
            # Three pipelined requests in one send, a POST's body skipped.
            c.sendall(
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nGET / HTTP/"
                b"HEAD /any HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            status, headers, body = read_response(reader)
            assert (status, body) == (b"HTTP/1.1 200 OK", b"Hello, World!")
            assert headers[b"content-length"] == b"13" and b"date" in headers
            assert b"connection" not in headers
            status, headers, body = read_response(reader)
            assert (status, body, headers[b"allow"]) == (
                b"HTTP/1.1 405 Method Not Allowed",
                b"",
                b"GET, HEAD",
            )
            status, headers, _ = read_response(reader, head=True)
            assert (status, headers[b"content-length"]) == (b"HTTP/1.1 200 OK", b"13")
            # One request a byte at a time, then one that closes.
            for byte in b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n":
                c.sendall(bytes([byte]))
            assert read_response(reader)[2] == b"Hello, World!"
            c.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            status, headers, body = read_response(reader)
            assert (headers[b"connection"], body) == (b"close", b"Hello, World!")
            assert bytes(reader.buf) + recv_until_eof(c) == b""
        with connect(port) as c:  # HTTP/1.0 closes by default
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reader = LineReader(c)
            assert read_response(reader)[2] == b"Hello, World!"
            assert bytes(reader.buf) + recv_until_eof(c) == b""
        with connect(port) as c:  # ... unless it asks to keep alive, as ab -k does
            reader = LineReader(c)
            for _ in range(2):
                c.sendall(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                _, headers, body = read_response(reader)
                assert (headers[b"connection"], body) == (b"keep-alive", b"Hello, World!")
        with connect(port) as c:
            c.sendall(b"nonsense\r\n\r\n")
            reader = LineReader(c)
            assert read_response(reader)[0] == b"HTTP/1.1 400 Bad Request"
            assert bytes(reader.buf) + recv_until_eof(c) == b""
        stop(child)


def test_http_curl_reuses_the_connection():
    curl = tool("curl")
    with example("http_hello.py") as (child, port):
        url = f"http://127.0.0.1:{port}"
        done = run_tool(curl, "-sS", "-v", "--max-time", "10", f"{url}/", f"{url}/again")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "Hello, World!Hello, World!"
        assert "Re-using existing connection" in done.stderr, done.stderr
        assert done.stderr.count("Connected to") == 1, done.stderr
        stop(child)


def test_http_wrk_sees_only_2xx():
    wrk = tool("wrk")
    with example("http_hello.py") as (child, port):
        # --timeout: a reply slower than wrk's default 2 s on a loaded machine
        # is not a socket error of the server's.
        url = f"http://127.0.0.1:{port}/"
        done = run_tool(wrk, "-t1", "-c10", "-d1s", "--timeout", "10s", url)
        assert done.returncode == 0, done.stdout + done.stderr
        requests = re.search(r"(\d+) requests in", done.stdout)
        assert requests and int(requests.group(1)) > 0, done.stdout
        assert "Non-2xx" not in done.stdout and "Socket errors" not in done.stdout, done.stdout
        stop(child)


def test_http_ab_keep_alive_and_not():
    ab = tool("ab")
    with example("http_hello.py") as (child, port):
        url = f"http://127.0.0.1:{port}/"
        # -k: HTTP/1.0 with Connection: Keep-Alive; without it, a connection a request.
        for keep_alive, requests in ((True, 2000), (False, 500)):
            argv = ["-k"] if keep_alive else []
            done = run_tool(ab, "-q", *argv, "-n", str(requests), "-c", "10", "-s", "10", url)
            assert done.returncode == 0, done.stdout + done.stderr
            out = done.stdout
            assert re.search(rf"Complete requests:\s+{requests}\n", out), out
            assert re.search(r"Failed requests:\s+0\n", out), out
            assert "Non-2xx" not in out, out
            if keep_alive:
                assert re.search(rf"Keep-Alive requests:\s+{requests}\n", out), out
        stop(child)


# ---------------------------------------------------------------------------
# asyncio_hosted.py
# ---------------------------------------------------------------------------


def test_asyncio_hosted_echoes_beats_and_reports_stats():
    with example("asyncio_hosted.py", "--admin-port", "0", "--heartbeat", "0.2") as (child, port):
        admin_port = int(re.search(r"admin on [\d.]+:(\d+)", child.stdout).group(1))

        def admin() -> dict:
            with connect(admin_port) as c:
                return json.loads(recv_until_eof(c))

        with connect(port) as a, connect(port) as b:
            a.sendall(b"hello\n")
            lines = LineReader(a)
            echoed, beats = 0, []
            while not echoed or len(beats) < 3:
                line = lines.readline()
                if line == b"hello":
                    echoed += 1
                    continue
                m = re.fullmatch(rb"heartbeat (\d+)", line)
                assert m, line
                beats.append(int(m.group(1)))
            assert echoed == 1
            assert beats == list(range(beats[0], beats[0] + len(beats)))  # every beat
            assert re.fullmatch(rb"heartbeat \d+", LineReader(b).readline())
            assert wait_until(lambda: admin()["connections_open"] == 2)
            report = admin()
            assert report["heartbeats"] >= beats[-1]
            assert report["messages_received"] == 1
        assert wait_until(lambda: admin()["connections_closed"] == 2)
        stop(child)


# ---------------------------------------------------------------------------
# chat.py
# ---------------------------------------------------------------------------


class ChatClient:
    """A chat member that has read its welcome line."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.lines = LineReader(self.sock)
        welcome = self.hear()
        m = re.fullmatch(r"\* welcome, you are (user\d+)", welcome)
        assert m, welcome
        self.name = m.group(1)

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def hear(self) -> str:
        return self.lines.readline().decode()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_chat_broadcasts_each_line_to_the_others_in_order():
    with example("chat.py") as (child, port):
        with ChatClient(port) as a, ChatClient(port) as b:
            assert a.hear() == f"* {b.name} joined"
            with ChatClient(port) as c:
                assert a.hear() == b.hear() == f"* {c.name} joined"
                a.say("hi")
                assert b.hear() == c.hear() == f"{a.name}: hi"
                # Two lines in one send, a third in pieces, CRLF too.
                b.sock.sendall(b"one\ntwo\r\nthr")
                b.sock.sendall(b"ee\n")
                for line in ("one", "two", "three"):
                    assert a.hear() == c.hear() == f"{b.name}: {line}"
            assert a.hear() == b.hear() == f"* {c.name} left"
            b.say("bye")
            # a's next line is b's: a heard nothing of its own "hi".
            assert a.hear() == f"{b.name}: bye"
            a.sock.close()
            assert b.hear() == f"* {a.name} left"
        stop(child)


def test_chat_drops_a_reader_that_stays_behind_and_keeps_a_fast_one():
    with example("chat.py") as (child, port), ChatClient(port) as fast:
        slow = connect(port, rcvbuf=4096)  # reads nothing until it is dropped
        slow_name = re.fullmatch(r"\* (user\d+) joined", fast.hear()).group(1)
        with slow, ChatClient(port) as talker:
            assert fast.hear() == f"* {talker.name} joined"
            dropped = f"* {slow_name} was dropped (too slow)"
            heard: list[tuple[float, str]] = []  # what fast reads, and when

            def read_fast() -> None:
                last = f"{talker.name}: last"
                pending = bytes(fast.lines.buf)
                while not heard or heard[-1][1] != last:
                    chunk = fast.sock.recv(1 << 16)
                    assert chunk, "fast was disconnected"
                    *lines, pending = (pending + chunk).split(b"\n")
                    now = time.monotonic()
                    heard.extend((now, line.decode()) for line in lines)

            reader = Workers()
            reader.spawn(read_fast)
            # The kernel buffers up to 4 MiB (Linux's tcp_wmem) for slow before
            # the server's queue grows: a burst of 6 MiB, then 32 KiB every
            # 0.1 s until slow is dropped. Lines of 8 KiB keep the callbacks few.
            started = time.monotonic()
            sent = [f"{i} {'x' * 8186}" for i in range(768)]
            talker.sock.sendall("".join(line + "\n" for line in sent).encode())
            while not any(line == dropped for _, line in heard):
                assert time.monotonic() < started + 15, "the slow reader was not dropped"
                more = [f"{len(sent) + i} {'y' * 8186}" for i in range(4)]
                talker.sock.sendall("".join(line + "\n" for line in more).encode())
                sent += more
                time.sleep(0.1)
            sent.append("last")
            talker.say("last")
            reader.join(15)

            lines = [line for _, line in heard]
            assert lines.count(dropped) == 1
            dropped_at = next(t for t, line in heard if line == dropped)
            assert dropped_at - started >= 2.0, "dropped before --drop-after (2 s) had passed"
            # The fast reader got every line, in order, and is still in the room.
            assert [line for line in lines if line != dropped] == [
                f"{talker.name}: {line}" for line in sent
            ]
            assert talker.hear() == dropped
            # What slow received before the reset is the start of its stream.
            expected = "".join(
                [f"* welcome, you are {slow_name}\n", f"* {talker.name} joined\n"]
                + [f"{talker.name}: {line}\n" for line in sent]
            ).encode()
            got = bytearray()
            try:
                while chunk := slow.recv(65536):
                    got += chunk
                # Wine reads a reset as EOF (see conftest.needs_visible_resets).
                assert UNDER_WINE, "slow was closed, not reset"
            except ConnectionResetError:
                pass
            assert len(got) < len(expected) and expected.startswith(bytes(got))
        stop(child)


# ---------------------------------------------------------------------------
# rpc_threadpool.py
# ---------------------------------------------------------------------------


def rpc(request_id: int, method: bytes) -> bytes:
    body = struct.pack(">I", request_id) + method
    return struct.pack(">I", len(body)) + body


def rpc_reply(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    body = recv_exactly(sock, length)
    return struct.unpack(">I", body[:4])[0], body[4:]


def hash_requests(count: int) -> tuple[bytes, dict[int, bytes]]:
    """``count`` hash requests (ids 1 to count) and the replies they expect."""
    data = {i: os.urandom(8).hex().encode() for i in range(1, count + 1)}
    requests = b"".join(rpc(i, b"hash " + d) for i, d in data.items())
    return requests, {i: hashlib.sha256(d).hexdigest().encode() for i, d in data.items()}


def test_rpc_replies_carry_their_request_ids():
    with example("rpc_threadpool.py", "--work-time", "0.2") as (child, port):
        with connect(port) as c:
            requests, expected = hash_requests(16)
            c.sendall(requests + rpc(99, b"ping") + rpc(100, b"nonsense"))
            # Answered on the listening thread, before any hash is done.
            assert rpc_reply(c) == (99, b"pong")
            assert rpc_reply(c) == (100, b"error unknown method")
            assert dict(rpc_reply(c) for _ in range(16)) == expected
            c.sendall(rpc(101, b"ping"))
            assert rpc_reply(c) == (101, b"pong")
        with connect(port) as c:
            # EOF right after the requests: the connection closes once all
            # their replies have gone out.
            requests, expected = hash_requests(4)
            c.sendall(requests)
            c.shutdown(socket.SHUT_WR)
            assert dict(rpc_reply(c) for _ in range(4)) == expected
            assert recv_until_eof(c) == b""
        stop(child)


@pytest.mark.skipif(not HAS_SIGTERM, reason=NO_SIGTERM)
def test_rpc_sigterm_answers_the_requests_in_flight_then_stops():
    # 2 s of work: the stop surely begins while all 16 are still in flight.
    args = ("--work-time", "2.0", "--threads", "16")
    with example("rpc_threadpool.py", *args) as (child, port):
        with connect(port) as busy, connect(port) as idle:
            idle.sendall(rpc(1, b"ping"))
            assert rpc_reply(idle) == (1, b"pong")
            requests, expected = hash_requests(16)
            busy.sendall(requests + rpc(99, b"ping"))
            # The pong comes after the 16 requests were handed to the pool.
            assert rpc_reply(busy) == (99, b"pong")
            child.signal(signal.SIGTERM)
            child.wait_for_output(r"stopping; 16 requests in flight on 2 connections")
            assert recv_until_eof(idle) == b""  # nothing in flight: closed at once
            with pytest.raises(ConnectionRefusedError):
                connect(port).close()  # no new connections
            assert dict(rpc_reply(busy) for _ in range(16)) == expected
            assert recv_until_eof(busy) == b""
        assert child.wait(10) == 0, child.stderr
        assert no_traceback(child.stderr), child.stderr
