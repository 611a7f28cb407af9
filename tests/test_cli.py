"""``python -m rsepoll``: the reverse server command line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
import types

import pytest
import rsepoll
from conftest import (
    CTRL_C_ON_WINDOWS,
    UNDER_WINE,
    ChildProcess,
    assert_eof,
    connect,
    no_traceback,
    recv_exactly,
    recv_until_eof,
    rsepoll_cli,
    wait_listening,
)

pytestmark = pytest.mark.timeout(60)

#: Tests that stop the CLI with SIGTERM, which Windows does not have;
#: test_exit_stops_server_option covers the CLI there.
stops_with_sigterm = pytest.mark.skipif(
    sys.platform == "win32",
    reason="stops the CLI with SIGTERM; test_exit_stops_server_option covers Windows",
)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def reverse_round_trip(port: int, msg: bytes) -> None:
    """One line, reversed (the default line framing)."""
    with connect(port) as c:
        c.sendall(msg + b"\n")
        assert recv_exactly(c, len(msg) + 1) == msg[::-1] + b"\n"


@stops_with_sigterm
def test_reverse_round_trip_and_prints_received_lines():
    with rsepoll_cli("0") as child:
        port = wait_listening(child)
        assert port > 0
        output = child.stdout + "\n" + child.stderr
        listening = next(line for line in output.splitlines() if "listening on" in line)
        assert f"127.0.0.1:{port}" in listening
        assert "line framing" in listening
        threads = int(os.environ.get("RSEPOLL_IO_THREADS") or 1)
        if threads == 0:
            assert ", inline (no I/O thread) " in listening, listening
        else:
            assert f", {threads} I/O thread{'s' if threads > 1 else ''} " in listening, listening
        with connect(port) as c:
            # Two lines in one read, a third split across reads.
            c.sendall(b"hello\nworld\nzyx_to")
            time.sleep(0.05)
            c.sendall(b"ken_42\r\n")
            assert recv_exactly(c, 25) == b"olleh\ndlrow\n24_nekot_xyz\n"
        child.wait_for_output(r"hello", stream="out")
        child.wait_for_output(r"zyx_token_42", stream="out")
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0
        assert no_traceback(child.stderr), child.stderr


@stops_with_sigterm
def test_raw_framing_reverses_each_read():
    with rsepoll_cli("0", "--framing", "raw", "--quiet") as child:
        port = wait_listening(child)
        with connect(port) as c:
            c.sendall(b"hello\n")
            assert recv_exactly(c, 6) == b"\nolleh"
            c.sendall(b"exit\n")
            recv_until_eof(c, limit=1 << 16)
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


@stops_with_sigterm
def test_printf_piped_into_nc_gets_every_line_back():
    """printf 'hello\nworld\n' | nc -q1 localhost PORT: the client sends and
    half-closes; every reply arrives before the close."""
    with rsepoll_cli("0", "--quiet") as child:
        port = wait_listening(child)
        with connect(port) as c:
            c.sendall(b"hello\nworld\n")
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b"olleh\ndlrow\n"
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


@stops_with_sigterm
def test_exit_line_anywhere_in_a_read_ends_the_connection():
    with rsepoll_cli("0", "--quiet") as child:
        port = wait_listening(child)
        with connect(port) as c:
            c.sendall(b"abc\nexit\nnever answered\n")
            assert recv_until_eof(c, limit=1 << 16) == b"cba\n"
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


@stops_with_sigterm
def test_length_framing_and_limits_options():
    args = ["--framing", "length", "--max-message-size", "100", "--quiet"]
    with rsepoll_cli("0", *args, "--max-connections", "5", "--idle-timeout", "30") as child:
        port = wait_listening(child)
        with connect(port) as c:
            c.sendall(b"\x00\x00\x00\x03abc")
            assert recv_exactly(c, 7) == b"\x00\x00\x00\x03cba"
            c.sendall(b"\x00\x00\x01\x00")  # 256 bytes: over the limit
            assert recv_until_eof(c, limit=1 << 16) == b""
        child.wait_for_output(r"MessageTooLarge", stream="err")
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


@stops_with_sigterm
def test_io_threads_option_serves_with_several_io_threads():
    with rsepoll_cli("0", "--io-threads", "2", "--quiet") as child:
        port = wait_listening(child)
        assert "line framing, 2 I/O threads (Ctrl-C to stop)" in child.stdout, child.stdout
        for i in range(4):  # dealt to both I/O threads in turn
            reverse_round_trip(port, b"abc%d" % i)
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


def test_bad_option_values_fail_with_status_2():
    for args in (
        ["--idle-timeout", "0"],
        ["--max-connections", "0"],
        ["--max-message-size", "0"],
        ["--max-message-size", "-5"],
        ["--io-threads", "-1"],
        ["--io-threads", "many"],
    ):
        with rsepoll_cli("0", *args) as child:
            assert child.wait(10) == 2
            lines = error_lines(child.stderr)
            assert len(lines) == 1 and lines[0].startswith("rsepoll: error:"), child.stderr


#: 2**64 + 1: more than any size or count the server could hold.
HUGE = str(2**64 + 1)


@pytest.mark.parametrize(
    "argv,option",
    [
        (["-5"], "port"),
        ([HUGE], "port"),
        (["0", "--max-fds", "0"], "max-fds"),
        (["0", "--max-fds", "-1"], "max-fds"),
        (["0", "--max-message-size", "-5"], "max_message_size"),
        (["0", "--max-message-size", "0"], "max_message_size"),
        (["0", "--max-message-size", HUGE], "max_message_size"),
        (["0", "--max-connections", "-3"], "max_connections"),
        (["0", "--max-connections", "0"], "max_connections"),
        (["0", "--max-connections", HUGE], "max_connections"),
        (["0", "--idle-timeout", "-1"], "idle_timeout"),
        (["0", "--idle-timeout", "0"], "idle_timeout"),
        (["0", "--idle-timeout", "nan"], "idle_timeout"),
        (["0", "--idle-timeout", "inf"], "idle_timeout"),
        (["0", "--idle-timeout", "1e19"], "idle_timeout"),
        (["0", "--idle-timeout", "1e300"], "idle_timeout"),
        (["0", "--io-threads", "-2"], "io_threads"),
        (["0", "--io-threads", "300"], "io_threads"),
        (["0", "--io-threads", HUGE], "io_threads"),
    ],
)
def test_every_numeric_option_rejects_a_bad_value_in_one_line(argv, option, capsys, monkeypatch):
    """In this process, for speed: main() must refuse before it listens."""
    from rsepoll import __main__ as cli

    def must_not_listen(*args: object) -> None:
        raise AssertionError(f"{argv} was accepted")

    monkeypatch.setattr(cli, "make_listener_socket", must_not_listen)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("rsepoll: error: "), err
    assert re.search(option.replace("_", "[-_]"), lines[0]), err
    assert len(lines[0]) < 200, err


@pytest.mark.parametrize(
    "args",
    [["--max-message-size", "big"], ["--idle-timeout", "soon"], ["--workers", "0"], ["x"]],
)
def test_non_numbers_are_usage_errors(args, capsys):
    from rsepoll import __main__ as cli

    port = [] if args == ["x"] else ["0"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*port, *args])
    assert exit_info.value.code == 2
    _, err = capsys.readouterr()
    assert error_lines(err)[-1].startswith("rsepoll: error: "), err


def test_version(capsys):
    from rsepoll import __main__ as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"rsepoll {rsepoll.__version__}\n"


@stops_with_sigterm
def test_quiet_does_not_print_messages():
    with rsepoll_cli("0", "--quiet") as child:
        port = wait_listening(child)
        reverse_round_trip(port, b"quiet_token_77")
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0
        assert "quiet_token_77" not in child.stdout
        assert "quiet_token_77" not in child.stderr
        assert no_traceback(child.stderr), child.stderr


@stops_with_sigterm
def test_host_and_max_fds_options():
    with rsepoll_cli("0", "--host", "127.0.0.1", "--max-fds", "2048", "--quiet") as child:
        port = wait_listening(child)
        reverse_round_trip(port, b"options")
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


@stops_with_sigterm
def test_exit_ends_only_that_connection():
    with rsepoll_cli("0") as child:
        port = wait_listening(child)
        with connect(port) as leaver, connect(port) as stayer:
            reverse_round_trip(port, b"warm-up")
            stayer.sendall(b"before\n")
            assert recv_exactly(stayer, 7) == b"erofeb\n"
            # Only the exact word ends it: this one is an ordinary line.
            leaver.sendall(b"  exit \r\n")
            assert recv_exactly(leaver, 8) == b" tixe  \n"
            leaver.sendall(b"exit\r\n")
            assert recv_until_eof(leaver, limit=1 << 16) == b""
            stayer.sendall(b"after\n")
            assert recv_exactly(stayer, 6) == b"retfa\n"
            # A new client is still welcome.
            reverse_round_trip(port, b"newcomer")
        assert child.proc.poll() is None
        child.signal(signal.SIGTERM)
        assert child.wait(5) == 0


@pytest.mark.parametrize("framing", ["line", "length", "raw"])
def test_only_the_exact_line_exit_ends_a_connection(framing):
    """As docs/cli.md says: the line ``exit`` (ended by ``\\n`` or ``\\r\\n``), not
    one with spaces around the word or in capitals."""
    from rsepoll.__main__ import ReverseServer

    server = ReverseServer(quiet=True, exit_stops_server=False, framing=framing)

    def is_exit(message: bytes, ending: bytes = b"\r\n") -> bool:
        """Whether the line ``message`` ends the connection; in raw mode it
        arrives with its line end, in the framed modes without."""
        data = message + ending if framing == "raw" else message
        return server._is_exit(types.SimpleNamespace(line_tail=b""), data)

    assert is_exit(b"exit")
    assert is_exit(b"exit", b"\n")
    for other in (b" exit", b"exit ", b"  exit ", b"\texit", b"EXIT", b"exit\r", b"exi"):
        assert not is_exit(other), other


def test_exit_stops_server_option():
    with rsepoll_cli("0", "--exit-stops-server") as child:
        port = wait_listening(child)
        with connect(port) as other, connect(port) as c:
            reverse_round_trip(port, b"abc")
            c.sendall(b"exit\n")
            assert child.wait(5) == 0
            recv_until_eof(c, limit=1 << 16)
            # Everybody was disconnected when the server stopped.
            assert_eof(other)
        assert no_traceback(child.stderr), child.stderr


@pytest.mark.skipif(sys.platform == "win32", reason=CTRL_C_ON_WINDOWS)
@pytest.mark.parametrize("with_client", [False, True])
def test_sigint_stops_cleanly(with_client):
    with rsepoll_cli("0") as child:
        port = wait_listening(child)
        c = connect(port) if with_client else None
        try:
            if c is not None:
                c.sendall(b"ping\n")
                assert recv_exactly(c, 5) == b"gnip\n"
            t0 = time.monotonic()
            child.signal(signal.SIGINT)
            rc = child.wait(5)
            assert time.monotonic() - t0 < 5
            assert rc == 0, rc
            assert no_traceback(child.stderr), child.stderr
            if c is not None:
                assert_eof(c)
        finally:
            if c is not None:
                c.close()


@stops_with_sigterm
def test_sigterm_exits_zero_without_traceback():
    with rsepoll_cli("0") as child:
        port = wait_listening(child)
        with connect(port) as c:
            c.sendall(b"xy\n")
            assert recv_exactly(c, 3) == b"yx\n"
            child.signal(signal.SIGTERM)
            assert child.wait(5) == 0
            assert_eof(c)
        assert no_traceback(child.stderr), child.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_port_out_of_range(port):
    with rsepoll_cli(port) as child:
        assert child.wait(10) == 2
        lines = error_lines(child.stderr)
        assert len(lines) == 1, child.stderr
        assert no_traceback(child.stderr)


def test_port_in_use():
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with rsepoll_cli(str(port)) as child:
            assert child.wait(10) == 2
            lines = error_lines(child.stderr)
            assert len(lines) == 1, child.stderr
            assert no_traceback(child.stderr)
            assert "listening on" not in child.stdout
        # One clean line, the error number said once.
        pattern = rf"rsepoll: error: \[Errno (\d+)\] cannot listen on 127\.0\.0\.1:{port}: (.+)"
        m = re.fullmatch(pattern, lines[0])
        assert m, lines[0]
        assert "os error" not in m.group(2), lines[0]
        # Wine has no system message table: FormatMessageW fails, and the
        # only text Windows' error then has is its number.
        if not UNDER_WINE:
            assert m.group(1) not in m.group(2), lines[0]
    finally:
        blocker.close()


def test_help():
    with rsepoll_cli("--help") as child:
        assert child.wait(10) == 0
        text = child.stdout
        for option in ("--host", "--quiet", "--max-fds", "--exit-stops-server"):
            assert option in text, text
        assert "port" in text.lower()


def test_console_script_help():
    exe = shutil.which("rsepoll", path=os.path.dirname(sys.executable)) or shutil.which("rsepoll")
    if exe is None:
        pytest.skip("console script 'rsepoll' not on PATH")
    with ChildProcess([exe, "--help"]) as child:
        assert child.wait(10) == 0
        assert "--exit-stops-server" in child.stdout
