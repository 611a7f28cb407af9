"""The inline mode (``io_threads=0``) and ``io_threads="auto"``.

The whole suite also runs inline (``RSEPOLL_IO_THREADS=0`` in ``.ci/run``);
these tests are about what is particular to it: the listening thread waits
in the poller itself, so whatever would wake it (a send or a call from
another thread) must wake the poller, and a callback that takes long holds
up reading, without losing a byte. And ``"auto"``, which picks the inline
mode when the process may use one CPU only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import pytest
import rsepoll
from conftest import (
    connect,
    io_thread_names,
    recv_exactly,
    running,
    subprocess_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


class Remember(rsepoll.Server):
    """Keeps the last connection opened; echoes what it receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = None

    def on_connection_opened(self, conn):
        self.conn = conn

    def on_message_received(self, conn, data):
        self.send_message(conn, data)


def test_io_threads_zero_is_the_inline_mode():
    assert Remember(io_threads=0).io_threads == 0
    assert Remember(io_threads="0").io_threads == 0
    for bad in (-1, "-1", "two", 1.5, True):
        with pytest.raises(ValueError, match="io_threads must be 0 \\(inline\\)"):
            Remember(io_threads=bad)


@pytest.mark.skipif(io_thread_names() is None, reason="threads cannot be listed here")
@pytest.mark.parametrize("io_threads", [0, 1])
def test_listen_inline_runs_no_io_thread(io_threads):
    # listen() turns the engine on its own thread, on every backend (IOCP
    # too: only serve() needs a poller another loop can watch).
    expected = {"rsepoll-io"} if io_threads else set()
    with running(Remember, io_threads=io_threads) as (_server, port), connect(port) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        assert io_thread_names() == expected


@pytest.mark.parametrize("how", ["send_message", "call_soon_threadsafe"])
def test_another_thread_wakes_an_inline_server_blocked_in_the_poller(how):
    # Idle, the listening thread sleeps in the poller for up to 50 ms at a
    # time (to look at signals). A send from another thread must wake it at
    # once: without the wake-up a reply would wait 25 ms on average.
    with running(Remember, io_threads=0) as (server, port), connect(port) as client:
        assert wait_until(lambda: server.conn is not None)
        latencies = []
        for i in range(20):
            payload = bytes([65 + i])
            time.sleep(0.02)  # let the server go back to sleep
            started = time.perf_counter()
            if how == "send_message":
                assert server.send_message(server.conn, payload) is True
            else:
                assert server.call_soon_threadsafe(server.send_message, server.conn, payload)
            assert recv_exactly(client, 1) == payload
            latencies.append(time.perf_counter() - started)
    assert statistics.median(latencies) < 0.005, latencies


class Sleepy(rsepoll.Server):
    """Echoes; the first message's callback sleeps half a second first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, float, int]] = []
        self.first_started = threading.Event()

    def on_message_received(self, conn, data):
        started = time.monotonic()
        if not self.calls:
            self.first_started.set()
            time.sleep(0.5)
        self.calls.append((started, time.monotonic(), len(data)))
        self.send_message(conn, data)


def test_a_long_callback_in_inline_mode_delays_reading_but_loses_nothing():
    payload = bytes(i * 7 % 251 for i in range(4 << 20))
    with running(Sleepy, io_threads=0) as (server, port), connect(port, timeout=30) as client:
        echoed = bytearray()

        def read_all():
            while len(echoed) < len(payload):
                echoed.extend(client.recv(1 << 20))

        reader = threading.Thread(target=read_all)
        reader.start()
        client.sendall(payload[:1])
        assert server.first_started.wait(10)
        # The first callback sleeps: meanwhile 4 MiB come in.
        client.sendall(payload[1:])
        reader.join(30)
        assert not reader.is_alive()
    assert bytes(echoed) == payload
    first_end = server.calls[0][1]
    # Nothing was read and handed over while the first callback ran: the
    # thread that reads is the one that was sleeping.
    assert all(started >= first_end for started, _, _ in server.calls[1:])
    assert sum(size for _, _, size in server.calls) == len(payload)


class LendingEcho(rsepoll.Server):
    """Echoes length-framed messages. Keeps the last message received and
    a copy of it that was never sent, and notes, as each callback begins,
    how many more references the kept message has than its copy: any the
    server still holds for the reply lent from it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, framing="length", **kwargs)
        self.kept: bytes | None = None
        self.copy: bytes | None = None
        self.extra_references: list[int] = []

    def on_message_received(self, conn, data):
        if self.kept is not None:
            extra = sys.getrefcount(self.kept) - sys.getrefcount(self.copy)
            self.extra_references.append(extra)
        self.kept, self.copy = data, bytes(bytearray(data))
        self.send_message(conn, data)  # a large bytes object: lent, not copied


def test_inline_a_lent_reply_is_let_go_before_the_next_callback():
    # Inline, a reply lent to send_message is written as its callback
    # returns, and its object let go, rather than with the whole turn's
    # (see the docs of src/python/loans.rs). Four 8 KiB messages in one
    # write arrive together and are dispatched in one batch: as each
    # callback begins, the server holds nothing more of the message before.
    size, count = 8192, 4
    messages = [bytes([65 + i]) * size for i in range(count)]
    framed = b"".join(len(m).to_bytes(4, "big") + m for m in messages)
    with running(LendingEcho, io_threads=0) as (server, port), connect(port) as client:
        client.sendall(framed)
        assert recv_exactly(client, len(framed)) == framed
    assert server.extra_references == [0] * (count - 1)


def test_auto_is_inline_on_one_usable_cpu_and_threaded_on_more():
    cpus = rsepoll.usable_cpus()
    expected = 0 if cpus == 1 else cpus - 1
    assert rsepoll.Server(io_threads="auto").io_threads == min(expected, 256)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are Linux's")
def test_auto_and_the_default_read_the_affinity_mask():
    # A process pinned to one CPU (taskset, a container's cpuset) gets the
    # inline mode, asked for ("auto") or by default; the child is pinned
    # before it starts, as taskset does.
    code = (
        "import rsepoll; print(rsepoll.usable_cpus(), "
        "rsepoll.Server(io_threads='auto').io_threads, rsepoll.Server().io_threads)"
    )
    env = subprocess_env()
    env.pop("RSEPOLL_IO_THREADS", None)
    child = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        check=True,
    )
    assert child.stdout.split() == ["1", "0", "0"]


CGROUP_ROOT = "/sys/fs/cgroup"


def _cpu_quota_group() -> tuple[str, dict[str, str]] | str:
    """Where a child cgroup with a quota of one CPU can be made, and the
    files that set the quota: cgroup v2's ``cpu.max``, else v1's CFS pair.
    A string says why none can."""
    if not sys.platform.startswith("linux"):
        return "cgroups are Linux's"
    v2_controllers = os.path.join(CGROUP_ROOT, "cgroup.subtree_control")
    if os.path.exists(v2_controllers):
        with open(v2_controllers) as f:
            if "cpu" in f.read().split() and os.access(CGROUP_ROOT, os.W_OK):
                return CGROUP_ROOT, {"cpu.max": "100000 100000"}
    v1 = os.path.join(CGROUP_ROOT, "cpu")
    if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")) and os.access(v1, os.W_OK):
        return v1, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}
    return "no writable cgroup with the cpu controller (not root, or a read-only mount)"


def test_auto_reads_the_cgroup_cpu_quota():
    # A Kubernetes CPU limit of 1 is a quota of one CPU (cpu.max "100000
    # 100000"): one CPU, even on a host with more. The child moves itself
    # into such a cgroup before asking.
    where = _cpu_quota_group()
    if isinstance(where, str):
        pytest.skip(where)
    root, quota = where
    group = os.path.join(root, f"rsepoll-test-{os.getpid()}")
    os.mkdir(group)
    try:
        for name, value in quota.items():
            with open(os.path.join(group, name), "w") as f:
                f.write(value)
        code = (
            "import os, rsepoll\n"
            f"open({os.path.join(group, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "print(rsepoll.usable_cpus(), rsepoll.Server(io_threads='auto').io_threads)\n"
        )
        child = subprocess.run(
            [sys.executable, "-c", code],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert child.stdout.split() == ["1", "0"]
    finally:
        os.rmdir(group)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_the_cli_under_taskset_serves_inline():
    with subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "rsepoll", "0", "--io-threads", "auto"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as child:
        try:
            line = child.stdout.readline()
            assert "inline (no I/O thread)" in line, line
        finally:
            child.terminate()
            child.wait(10)


LOOPS = ["asyncio"] if sys.platform == "win32" else ["asyncio", "uvloop"]


def serve_and_ping(run, probe=None) -> dict[str, object]:
    """Runs an inline ``Remember`` server under ``serve()`` in the loop that
    ``run`` drives; a client pings it, then ``await probe(server, reader,
    seen)`` if given. Returns what was seen: the echo, the I/O threads
    while serving, and what the probe adds."""
    server = Remember(io_threads=0)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    seen: dict[str, object] = {}

    async def main():
        task = asyncio.ensure_future(server.serve(timeout=1000, handle_signals=False))
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"ping")
        seen["echo"] = await asyncio.wait_for(reader.readexactly(4), 5)
        seen["threads"] = io_thread_names()
        if probe is not None:
            await probe(server, reader, seen)
        writer.close()
        server.stop_server()
        await asyncio.wait_for(task, 10)

    try:
        run(main())
    finally:
        listener.close()
    return seen


async def wake_ups(server, reader, seen):
    """Sends from other threads, directly and through call_soon_threadsafe,
    and notes how long each took to reach the client."""
    latencies = []
    for i in range(20):
        await asyncio.sleep(0.02)
        payload = bytes([65 + i])
        started = time.perf_counter()
        if i % 2:
            threading.Thread(target=server.send_message, args=(server.conn, payload)).start()
        else:
            threading.Thread(
                target=server.call_soon_threadsafe,
                args=(server.send_message, server.conn, payload),
            ).start()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == payload
        latencies.append(time.perf_counter() - started)
    seen["latencies"] = latencies


@pytest.mark.parametrize("loop", LOOPS)
def test_serve_runs_inline_in_the_loops_thread(loop):
    # Under serve(), the loop watches the inline engine's poller: no I/O
    # thread (except on Windows, where no loop can watch it), and a send
    # from another thread, or a call_soon_threadsafe, wakes the loop at
    # once (the loop's own timer is 1 s away here).
    if loop == "uvloop":
        run = pytest.importorskip("uvloop", reason="uvloop is not installed").run
    else:
        run = asyncio.run
    seen = serve_and_ping(run, wake_ups)
    assert seen["echo"] == b"ping"
    if seen["threads"] is not None:
        # IOCP has no descriptor the loop could watch: there the engine
        # gets one I/O thread (docs/limitations.md).
        expected = {"rsepoll-io"} if sys.platform == "win32" else set()
        assert seen["threads"] == expected
    assert statistics.median(seen["latencies"]) < 0.005, seen["latencies"]


@pytest.mark.skipif(sys.platform != "win32", reason="IOCP, which no loop can watch, is Windows'")
def test_serve_under_a_selector_loop_on_windows_gives_the_engine_an_io_thread():
    # asyncio's selector loop has add_reader, but IOCP has no descriptor
    # for it to watch: an inline server gets one I/O thread there, as
    # under the default Proactor loop (docs/limitations.md).
    def run(main):
        selector_loop = asyncio.SelectorEventLoop()
        try:
            selector_loop.run_until_complete(main)
        finally:
            selector_loop.close()

    assert serve_and_ping(run) == {"echo": b"ping", "threads": {"rsepoll-io"}}
