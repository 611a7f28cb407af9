"""``python -m rsepoll.bench``: the load generator, against rsepoll servers."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import rsepoll
from conftest import (
    CTRL_C_ON_WINDOWS,
    ChildProcess,
    no_traceback,
    rsepoll_cli,
    running,
    wait_listening,
)

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
LOADGEN_DIR = ROOT / "benchmarks" / "loadgen"
#: Fields the JSON report must have.
FIELDS = ("requests_per_s", "mb_per_s", "p50_us", "p99_us", "p999_us", "errors")


def bench(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Runs ``python -m rsepoll.bench ARGS``; returns (status, stdout, stderr)."""
    with ChildProcess([sys.executable, "-m", "rsepoll.bench", *args]) as child:
        status = child.wait(timeout)
        return status, child.stdout, child.stderr


def bench_json(port: int, *args: str) -> tuple[int, dict[str, Any], str]:
    status, out, err = bench(f"127.0.0.1:{port}", "--json", "--threads", "1", *args)
    assert out.strip(), f"no report (status {status}); stderr={err!r}"
    return status, json.loads(out), err


def assert_clean(status: int, report: dict[str, Any], err: str, connections: int) -> None:
    for field in FIELDS:
        assert isinstance(report[field], (int, float)), field
    assert report["errors"] == 0, report["error_samples"]
    assert report["stalled"] == 0, report["error_samples"]
    assert status == 0, err
    assert report["connected"] == report["held"] == connections
    assert report["requests"] > 0
    assert report["requests_per_s"] > 0
    assert report["mb_per_s"] > 0
    assert 0 < report["p50_us"] <= report["p99_us"] <= report["p999_us"] <= report["max_us"]
    assert no_traceback(err), err


class Closer(rsepoll.Server):
    """Closes every connection on its first message, unanswered."""

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        self.close_connection(conn)


@pytest.mark.parametrize(
    "mode,framing",
    [
        ("rr", "raw"),
        ("rr", "line"),
        ("rr", "length"),
        ("stream", "raw"),
        ("stream", "length"),
        ("idle", "raw"),
        ("idle", "line"),
    ],
)
def test_modes_against_an_echo_server(mode, framing):
    with running(framing=framing) as (_, port):
        args = ["--mode", mode, "--framing", framing, "--connections", "4", "--duration", "1"]
        status, report, err = bench_json(port, *args, "--size", "700")
    assert_clean(status, report, err, 4)
    assert (report["mode"], report["framing"], report["size"]) == (mode, framing, 700)
    assert 0.9 <= report["duration_s"] <= 1.1
    if mode == "idle":
        assert report["requests"] == 8  # two checks of 4 connections
    if mode == "stream":
        assert report["mb_per_s_out"] > 0 and report["mb_per_s_in"] > 0


@pytest.mark.parametrize("mode", ["rr", "stream", "idle"])
def test_modes_against_the_reverse_cli(mode):
    # The CLI reverses whole lines; the payload before "\n" comes back reversed.
    with rsepoll_cli("0", "--quiet") as server:
        port = wait_listening(server)
        args = ["--mode", mode, "--framing", "line", "--verify", "reverse", "--connections", "3"]
        status, report, err = bench_json(port, *args, "--duration", "1")
    assert_clean(status, report, err, 3)


def test_the_first_try_against_the_cli_says_in_one_line_what_to_use():
    """``python -m rsepoll.bench HOST:PORT`` against ``python -m rsepoll``:
    the defaults expect an echo, the server reverses lines. Every mode stops
    at the first replies, long before --duration, with one line that says
    what to use instead of a table of errors."""
    with rsepoll_cli("0", "--quiet") as server:
        port = wait_listening(server)
        for mode in ("rr", "stream", "idle"):
            t0 = time.monotonic()
            args = ["--mode", mode, "--connections", "3", "--duration", "10"]
            status, out, err = bench(f"127.0.0.1:{port}", *args)
            assert time.monotonic() - t0 < 5, mode
            assert status == 1, (mode, err)
            assert out == "", (mode, out)
            lines = err.strip().splitlines()
            assert len(lines) == 1, (mode, err)
            assert lines[0].startswith(
                "python -m rsepoll.bench: error: the server does not echo:"
            ), err
            assert "--framing line --verify reverse" in lines[0], err
        # With --json the report still comes, with the one line on stderr.
        status, report, err = bench_json(port, "--connections", "3")
    assert status == 1
    assert report["wrong_first_replies"] == report["connected"] == 3
    assert report["duration_s"] < 1.0, report
    assert len(err.strip().splitlines()) == 1 and "does not echo" in err, err


def test_help_says_how_to_load_the_reverse_cli():
    status, out, _ = bench("--help")
    assert status == 0
    assert "--framing line --verify reverse" in " ".join(out.split()), out


def test_version(capsys):
    from rsepoll import bench as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"rsepoll {rsepoll.__version__}\n"


def test_raw_reverse_against_the_reverse_cli():
    # In raw framing the CLI reverses each read: a small request is one read.
    with rsepoll_cli("0", "--quiet", "--framing", "raw") as server:
        port = wait_listening(server)
        args = ["--verify", "reverse", "--connections", "2", "--size", "200", "--duration", "1"]
        status, report, err = bench_json(port, *args)
    assert_clean(status, report, err, 2)


def test_marks_bracket_the_measured_time():
    # benchmarks/suite.py samples the server's CPU time when these lines come:
    # they must arrive in order, about --duration apart, and after the warmup.
    with running() as (_, port):
        argv = [sys.executable, "-m", "rsepoll.bench", f"127.0.0.1:{port}", "--marks", "--json"]
        argv += ["--connections", "2", "--warmup", "0.5", "--duration", "1"]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child:
            try:
                began = time.monotonic()
                assert child.stderr is not None and child.stdout is not None
                marks = [(line.strip(), time.monotonic() - began) for line in child.stderr]
                report = json.loads(child.stdout.read())
                status = child.wait(10)
            finally:
                child.kill()
    assert status == 0, marks
    assert [name for name, _ in marks] == ["measure-start", "measure-end"], marks
    (_, start), (_, end) = marks
    assert start >= 0.5, marks
    assert 0.9 <= end - start <= 1.2, marks
    assert report["duration_s"] == 1.0 and report["errors"] == 0


def test_a_warmup_until_steady_is_reported_and_marked():
    # A loose tolerance, so that it settles on a loaded machine too: the
    # test is of the mechanism, not of this machine's steadiness.
    with running() as (_, port):
        argv = [sys.executable, "-m", "rsepoll.bench", f"127.0.0.1:{port}", "--marks", "--json"]
        argv += ["--connections", "2", "--threads", "1", "--duration", "0.5"]
        argv += ["--warmup", "0.3", "--warmup-until-steady", "--warmup-max", "3"]
        argv += ["--steady-tolerance", "100"]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child:
            try:
                began = time.monotonic()
                assert child.stderr is not None and child.stdout is not None
                marks = [(line.strip(), time.monotonic() - began) for line in child.stderr]
                report = json.loads(child.stdout.read())
                status = child.wait(10)
            finally:
                child.kill()
    assert status == 0, marks
    assert report["warmup_until_steady"] is True
    assert report["warmup_steady"] is True, report["warmup_rates"]
    # Sampled every 0.25 s; four samples must agree, after at least 0.3 s.
    assert 1.0 <= report["warmup_s"] < 3.0, report["warmup_s"]
    assert len(report["warmup_rates"]) >= 4
    assert all(rate > 0 for rate in report["warmup_rates"]), report["warmup_rates"]
    assert [name for name, _ in marks] == ["measure-start", "measure-end"], marks
    (_, start), (_, end) = marks
    assert start >= report["warmup_s"], marks
    assert 0.4 <= end - start <= 0.7, marks
    assert report["duration_s"] == 0.5 and report["errors"] == 0


def test_the_table_is_printed_without_json():
    with running() as (_, port):
        status, out, err = bench(f"127.0.0.1:{port}", "--connections", "2", "--duration", "0.5")
    assert status == 0, err
    for row in ("requests/s", "MB/s", "p50", "p99", "p99.9", "errors       0", "warm-up"):
        assert row in out, out
    # Not a terminal: no progress line.
    assert err == "", err


@pytest.mark.parametrize("mode", ["rr", "stream", "idle"])
def test_a_wrong_verify_counts_errors(mode):
    # An echo server is not a reverse server.
    with running(framing="line") as (_, port):
        args = ["--mode", mode, "--framing", "line", "--verify", "reverse"]
        status, report, err = bench_json(port, *args, "--connections", "3", "--duration", "1")
    assert status == 1
    assert report["errors"] == 3
    assert report["wrong_first_replies"] == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m rsepoll.bench: error: the server does not reverse:"), err
    assert "payload reversed" in lines[0] and "--verify echo" in lines[0], err


def test_a_server_that_closes_counts_errors():
    with running(Closer) as (_, port):
        t0 = time.monotonic()
        status, report, err = bench_json(port, "--connections", "3", "--duration", "1")
    assert time.monotonic() - t0 < 10
    assert status == 1
    assert report["errors"] == 3 and report["requests"] == 0
    assert "closed the connection" in err, err


def test_a_refused_port_is_a_clear_error():
    with running() as (_, port):
        pass  # now nothing listens on port
    t0 = time.monotonic()
    status, out, err = bench(f"127.0.0.1:{port}", "--duration", "5", "--connections", "3")
    assert time.monotonic() - t0 < 10
    assert status == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m rsepoll.bench: error: no connection could be made"), err
    assert f"connect to 127.0.0.1:{port}" in lines[0], err


@pytest.mark.parametrize(
    "args,message",
    [
        (["127.0.0.1:9", "--connections", "0"], "--connections must be positive"),
        (["127.0.0.1:9", "--size", "-1"], "--size must be positive"),
        (["127.0.0.1:9", "--duration", "0"], "--duration must be positive"),
        (["127.0.0.1:9", "--framing", "length", "--size", "4"], "at least 5"),
        (["127.0.0.1:9", "--mode", "stream", "--verify", "reverse"], "needs --framing"),
        (
            ["127.0.0.1:9", "--warmup-until-steady", "--warmup", "2", "--warmup-max", "1"],
            "--warmup-max (1.0) must be at least --warmup (2.0)",
        ),
        (
            ["127.0.0.1:9", "--warmup-until-steady", "--steady-tolerance", "-1"],
            "--steady-tolerance must not be negative",
        ),
        (["nonsense"], "expected HOST:PORT"),
        (["127.0.0.1:70000"], "port must be from 1 to 65535"),
        (["127.0.0.1:x"], "bad port"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    status, out, err = bench(*args)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert err.startswith("python -m rsepoll.bench: error: "), err


def test_unknown_options_exit_2():
    status, _, err = bench("127.0.0.1:9", "--mode", "nope")
    assert status == 2 and "invalid choice" in err, err


@pytest.mark.skipif(sys.platform == "win32", reason=CTRL_C_ON_WINDOWS)
@pytest.mark.parametrize("json_report", [False, True])
def test_ctrl_c_stops_a_run_and_reports_what_was_measured(json_report):
    with running() as (_, port):
        cmd = [sys.executable, "-m", "rsepoll.bench", f"127.0.0.1:{port}", "--duration", "60"]
        cmd += ["--connections", "4", *(["--json"] if json_report else [])]
        with ChildProcess(cmd) as child:
            time.sleep(1.0)
            t0 = time.monotonic()
            child.signal(signal.SIGINT)
            status = child.wait(5)
            assert time.monotonic() - t0 < 3
    assert status == 130, child.stderr
    assert "interrupted" in child.stderr and no_traceback(child.stderr), child.stderr
    if json_report:
        report = json.loads(child.stdout)
        assert report["requests"] > 0 and report["errors"] == 0, report
        assert 0 < report["duration_s"] < 10, report
    else:
        for row in ("requests/s", "latency", "errors       0"):
            assert row in child.stdout, child.stdout


def _loadgen() -> Path:
    """benchmarks/loadgen, built (release) into its own target directory."""
    target = LOADGEN_DIR / "target"
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--target-dir", str(target)],
        cwd=LOADGEN_DIR,
        check=True,
        timeout=240,
    )
    return target / "release" / "echo-loadgen"


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("cargo") is None, reason="benchmarks/loadgen needs cargo")
@pytest.mark.skipif(sys.platform == "win32", reason="benchmarks/loadgen is built on the host")
def test_rr_rate_agrees_with_benchmarks_loadgen():
    """Both clients, one thread each, on the same server, alternately; the
    medians of their req/s agree within 2x (on a quiet machine they agree
    within a few percent)."""
    loadgen = _loadgen()
    ours: list[float] = []
    theirs: list[float] = []
    with running() as (_, port):
        common = ["--connections", "10", "--size", "1024", "--warmup", "0.5", "--duration", "1.5"]
        for _ in range(3):
            argv = [str(loadgen), "--port", str(port), "--threads", "1", *common]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
            line = next(x for x in out.stdout.splitlines() if x.startswith("result "))
            result = json.loads(line[len("result ") :])
            assert result["errors"] == 0
            theirs.append(result["requests"] / result["seconds"])
            status, report, err = bench_json(port, *common)
            assert_clean(status, report, err, 10)
            ours.append(report["requests_per_s"])
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"rr req/s: rsepoll.bench {ours}, loadgen {theirs}, ratio {ratio:.3f}")
    assert 0.5 <= ratio <= 2.0, (ours, theirs)


class _FlippingEcho:
    """A blocking echo server, one thread per connection, that returns every
    byte it reads except the one at stream offset `FLIP`, which it changes."""

    FLIP = 70_000

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _echo(self, conn: socket.socket) -> None:
        offset = 0
        # The client resets its connections when it exits.
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(1 << 16):
                if offset <= self.FLIP < offset + len(data):
                    flipped = bytearray(data)
                    flipped[self.FLIP - offset] ^= 1
                    data = bytes(flipped)
                offset += len(data)
                conn.sendall(data)

    def close(self) -> None:
        # Wakes the accepting thread (closing alone does not, on Linux).
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.accepting.join(5)
        for thread in self.threads:
            thread.join(5)


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("cargo") is None, reason="benchmarks/loadgen needs cargo")
@pytest.mark.skipif(sys.platform == "win32", reason="benchmarks/loadgen is built on the host")
def test_loadgen_stream_mode_checks_every_echoed_byte():
    """loadgen's stream client compares what comes back with what it sent:
    against rsepoll it reports no error; against a server that changes one
    byte, it names that byte and exits with status 1."""
    loadgen = _loadgen()
    common = ["--mode", "stream", "--size", "65536", "--connections", "2"]
    common += ["--warmup", "0.2", "--duration", "0.5"]
    with running() as (_, port):
        out = subprocess.run(
            [str(loadgen), "--port", str(port), *common],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("result "))
    result = json.loads(line[len("result ") :])
    assert result["errors"] == 0 and result["bytes_in"] > 0, result
    flipping = _FlippingEcho()
    try:
        out = subprocess.run(
            [str(loadgen), "--port", str(flipping.port), *common],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        flipping.close()
    assert out.returncode == 1, (out.stdout, out.stderr)
    wrong = f"byte {_FlippingEcho.FLIP} of the echo is not the byte sent there"
    assert out.stderr.count(wrong) == 2, out.stderr


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("cargo") is None, reason="benchmarks/loadgen needs cargo")
@pytest.mark.skipif(sys.platform == "win32", reason="benchmarks/loadgen is built on the host")
def test_loadgen_rate_paces_stream_mode():
    """`--rate` holds stream mode's writes to the rate asked for (within the
    credit one burst adds), where the same run unpaced writes far more; it
    is refused in rr mode."""
    loadgen = _loadgen()
    rate = 20.0  # MB/s
    common = ["--mode", "stream", "--size", "16384", "--connections", "4"]
    common += ["--warmup", "0.3", "--duration", "1"]

    def result(*extra: str) -> dict:
        out = subprocess.run(
            [str(loadgen), "--port", str(port), *common, *extra],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        line = next(x for x in out.stdout.splitlines() if x.startswith("result "))
        return json.loads(line[len("result ") :])

    with running() as (_, port):
        paced = result("--rate", str(rate))
        unpaced = result()
        refused = subprocess.run(
            [str(loadgen), "--port", str(port), "--rate", "5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert paced["errors"] == 0 and paced["rate_mb_per_s"] == rate, paced
    # Two writes' worth of credit per connection, over the 1 s window.
    burst = 4 * 2 * 16384 / 1e6
    assert rate * 0.75 <= paced["mb_per_s_out"] <= rate + burst, paced
    assert unpaced["rate_mb_per_s"] is None and unpaced["mb_per_s_out"] > 2 * rate, unpaced
    assert refused.returncode == 2 and "--rate paces --mode stream only" in refused.stderr
