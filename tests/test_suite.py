"""``benchmarks/suite.py``, the comparison suite, and its native echo server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the suite reads /proc: Linux only"),
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "suite.py"
HAVE_CC = shutil.which("cc") is not None


def suite(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One ``--quick`` run with the contenders every test machine has."""
    path = tmp_path_factory.mktemp("suite") / "results.json"
    contenders = "rsepoll,asyncio" + (",native" if HAVE_CC else "")
    began = time.monotonic()
    done = suite("--quick", "--contenders", contenders, "--json", str(path))
    took = time.monotonic() - began
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"suite --quick took {took:.1f} s")
    return json.loads(path.read_text()), done.stdout, path


def test_quick_run_has_sane_numbers_and_no_errors(quick):
    doc, out, _ = quick
    expected = ["rsepoll", "asyncio"] + (["native"] if HAVE_CC else [])
    assert doc["contenders"] == expected
    assert [c["name"] for c in doc["cells"]] == ["rr-1k-c10"]
    assert list(doc["settings"]["placements"]) == ["unpinned"]
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["kernel"]
    assert doc["versions"]["python"] and doc["versions"]["rsepoll"] != "not installed"
    assert len(doc["runs"]) == len(expected)
    settings = doc["settings"]
    assert settings["first_connection"] is True
    assert (settings["warmup"], settings["warmup_max"]) == (0.5, 2.0)
    for run in doc["runs"]:
        who = run["contender"]
        assert run["ok"], (who, run["note"])
        # Warmed up until steady: at least 0.5 s, at most 2 s (and the
        # watcher's last sample), and the report says whether it settled.
        assert run["client"]["warmup_until_steady"] is True, who
        assert 0.5 <= run["summary"]["warmup_s"] < 2.5, who
        assert run["summary"]["warmup_steady"] in (True, False), who
        assert run["client"]["warmup_rates"], who
        assert run["client"]["errors"] == 0 and run["client"]["stalled"] == 0, who
        assert run["client"]["connected"] == run["client"]["held"] == 10, who
        # The CPU window is the load tool's window, give or take scheduling.
        assert abs(run["window_s"] - run["client"]["duration_s"]) < 0.15, who
        s = run["summary"]
        assert s["throughput"] > 0 and s["requests_per_s"] > 0, who
        assert 0 < s["p50_us"] <= s["p99_us"], who
        assert s["errors"] == 0, who
        assert 0 < s["cpu_us_per_request"] < 10_000, who
        assert s["server_cpu_frac"] > 0, who
        threads = s["thread_us_per_request"]
        assert threads.get("main", 0) > 0, (who, threads)
        # The threads add up to the process (both from /proc, at the same marks).
        assert sum(threads.values()) == pytest.approx(s["cpu_us_per_request"], rel=0.1)
    rsepoll_threads = next(r for r in doc["runs"] if r["contender"] == "rsepoll")
    # "rsepoll-io", or "rsepoll-io-0", "rsepoll-io-1", ... with io_threads > 1.
    io_threads = {
        name: cost
        for name, cost in rsepoll_threads["summary"]["thread_us_per_request"].items()
        if name.startswith("rsepoll-io")
    }
    if os.environ.get("RSEPOLL_IO_THREADS") == "0":
        # Inline: the listening thread does the I/O; there is no I/O thread.
        assert not io_threads, io_threads
    else:
        assert io_threads and all(cost > 0 for cost in io_threads.values()), io_threads
    for entry in doc["medians"]:
        assert entry["ok_rounds"] == entry["rounds"] == 1
        if HAVE_CC:
            assert entry["vs_native"] > 0
    native = [m for m in doc["medians"] if m["contender"] == "native"]
    assert all(m["vs_native"] == 1.0 for m in native)
    for row in ("rsepoll", "asyncio", "req/s", "CPU µs/req"):
        assert row in out, out


def test_chart_is_redrawn_from_saved_json(quick, tmp_path):
    _, _, path = quick
    png = tmp_path / "chart.png"
    done = suite("--from-json", str(path), "--chart", str(png), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "rr 1 KiB x10" in done.stdout  # the tables again
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in done.stdout
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cell_that_cannot_run_here_is_skipped_with_the_reason(tmp_path):
    import resource  # POSIX only: imported here so that collection works anywhere

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard > 10_000_000:
        pytest.skip("this machine allows 10 million descriptors")
    path = tmp_path / "results.json"
    done = suite(
        "--idle",
        "10000,10000000",
        "--cells",
        "idle-c10000000",
        "--contenders",
        "rsepoll",
        "--json",
        str(path),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(path.read_text())
    assert doc["runs"] == [] and doc["cells"] == []
    (skip,) = doc["skipped"]
    assert skip["cell"] == "idle-c10000000"
    assert "RLIMIT_NOFILE" in skip["reason"]
    assert "skipped: idle-c10000000" in done.stdout


@pytest.mark.skipif(not HAVE_CC, reason="the native server is built with cc")
def test_native_server_loses_no_bytes_when_the_client_reads_late():
    # 16 MiB sent before a byte is read: the server's sends go partial, it
    # queues, stops reading at its high-water mark, and after our EOF it
    # must still send everything queued before it closes.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import suite as suite_module
    finally:
        sys.path.pop(0)
    assert suite_module.ensure_native() == ""
    server = subprocess.Popen([str(suite_module.NATIVE_BINARY)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        data = os.urandom(16 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

            def send() -> None:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(0.5)
            received = bytearray()
            while chunk := sock.recv(1 << 20):
                received += chunk
            sender.join(10)
        assert len(received) == len(data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.parametrize("framing", ["raw", "line", "length"])
def test_the_first_connection_is_echoed_in_every_framing(framing):
    # benchmarks/echo.py's first_connection, which the suite and echo.py run
    # against every fresh server before the load.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import echo
    finally:
        sys.path.pop(0)
    argv = [sys.executable, str(ROOT / "benchmarks" / "echo.py")]
    argv += ["--serve", "rsepoll-epoll", "--framing", framing]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        began = time.monotonic()
        echo.first_connection(port, 700, framing)
        assert 0.1 <= time.monotonic() - began < 5
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.parametrize("kind", ["rsepoll-inline", "rsepoll-threaded", "asyncio"])
def test_callback_us_spends_that_long_in_every_callback(kind):
    # suite.py --callback-us: each server's callback first spins that long, as
    # an application's own work would, so no reply can come back sooner.
    argv = [sys.executable, str(ROOT / "benchmarks" / "echo.py")]
    argv += ["--serve", kind, "--callback-us", "20000"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            for i in range(5):
                message = b"%04d" % i
                began = time.perf_counter()
                conn.sendall(message)
                reply = b""
                while len(reply) < len(message):
                    chunk = conn.recv(16)
                    assert chunk, "the server closed the connection"
                    reply += chunk
                took = time.perf_counter() - began
                assert reply == message
                assert took >= 0.020, f"round trip {i} took {took * 1000:.1f} ms"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.parametrize("value", ["-1", "1000001"])
def test_callback_us_out_of_range_is_refused(value):
    done = suite("--quick", "--callback-us", value)
    assert done.returncode == 2
    assert "--callback-us must be from 0 to 1,000,000" in done.stderr


def test_callback_us_reaches_every_python_server_and_skips_native(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import suite as suite_module
    finally:
        sys.path.pop(0)
    cell = suite_module.Cell("rr", 1024, 10)
    for contender in ("rsepoll-inline", "rsepoll-threaded", "uvloop", "asyncio"):
        assert suite_module.server_argv(contender, cell, 5)[-2:] == ["--callback-us", "5"]
        assert "--callback-us" not in suite_module.server_argv(contender, cell)
    assert suite_module.server_argv("native", cell, 5) == [str(suite_module.NATIVE_BINARY)]
    # With nothing but native asked for, nothing runs: it is skipped, and why.
    path = tmp_path / "results.json"
    done = suite("--quick", "--contenders", "native", "--callback-us", "5", "--json", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(path.read_text())
    assert doc["contenders"] == [] and doc["runs"] == []
    assert doc["skipped"] == [
        {"contender": "native", "reason": "--callback-us: it has no Python callback"}
    ]
    assert doc["settings"]["callback_us"] == 5
    assert "every callback spins 5 µs first" in done.stdout
