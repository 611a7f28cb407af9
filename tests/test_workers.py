"""Several worker processes on one port: ``rsepoll.workers`` and ``--workers``.

Everything runs in subprocesses on loopback. Every process a test starts, and
every worker it learns of, is killed by pid when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import rsepoll.workers
from conftest import (
    ChildProcess,
    LineReader,
    assert_eof,
    connect,
    no_traceback,
    recv_exactly,
    rsepoll_cli,
    wait_listening,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="worker processes need Linux (SO_REUSEPORT balancing, PR_SET_PDEATHSIG, /proc)",
)

#: A program serving with serve_workers: each connection first gets the pid
#: of the worker that accepted it. argv: mode, workers, port, a scratch path.
SCRIPT = textwrap.dedent(
    """
    import os
    import socket
    import sys
    import time

    import rsepoll
    from rsepoll.workers import WorkerError, WorkerStartupError, serve_workers

    mode, workers, port, scratch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


    class PidServer(rsepoll.Server):
        def on_connection_opened(self, conn):
            self.send_message(conn, b"%d\\n" % os.getpid())

        def on_message_received(self, conn, data):
            if data.startswith(b"hang"):
                print("HANGING", os.getpid(), flush=True)
                time.sleep(60)  # a callback that holds the worker past any stop
            else:
                self.send_message(conn, data)


    def make_server():
        if mode == "block":
            # A socket without SO_REUSEPORT on the port: the worker's own bind fails.
            global blocker
            blocker = socket.create_server(("127.0.0.1", port))
        if mode == "second-fails":
            try:
                os.close(os.open(scratch, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                raise ValueError("the second worker refuses to start") from None
        print("BUILT", os.getpid(), flush=True)
        server = PidServer()
        if mode == "crash":
            server.on_listen_success = lambda: os._exit(7)
        return server


    def ready(info):
        print("READY", info.address[1], *info.pids, flush=True)


    try:
        serve_workers(
            make_server,
            port,
            workers=workers,
            on_ready=ready,
            stop_timeout=float(os.environ.get("STOP_TIMEOUT", "10")),
        )
    except WorkerStartupError as exc:
        print("STARTUP_ERROR", exc, flush=True)
        sys.exit(3)
    except WorkerError as exc:
        print("WORKER_ERROR", exc, flush=True)
        sys.exit(4)
    print("RETURNED", flush=True)
    """
)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter in /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def is_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever adopted it."""
    return proc_state(pid) in (None, "Z")


def children_of(ppid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == ppid and fields[0] != "Z":
            found.add(int(entry))
    return found


class Tracker:
    """Pids a test started or learned of, all killed at its end."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.children: list[ChildProcess] = []

    def child(self, child: ChildProcess) -> ChildProcess:
        self.children.append(child)
        self.pids.add(child.proc.pid)
        return child

    def add(self, pids: Iterator[int] | set[int] | list[int]) -> None:
        self.pids.update(pids)

    def kill_all(self) -> None:
        for pid in self.pids:
            if not is_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for child in self.children:
            child.__exit__(None, None, None)  # kills it if need be, closes its pipes


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    t = Tracker()
    try:
        yield t
    finally:
        t.kill_all()


def run_script(tracker: Tracker, tmp_path, mode: str, workers: int, port: int = 0, **env: str):
    script = tmp_path / "workers_script.py"
    script.write_text(SCRIPT)
    argv = [sys.executable, str(script), mode, str(workers), str(port), str(tmp_path / "scratch")]
    return tracker.child(ChildProcess(argv, cwd=str(tmp_path), **env))


def wait_ready(child: ChildProcess, tracker: Tracker) -> tuple[int, list[int]]:
    """The port and worker pids from the script's READY line."""
    words = child.wait_for_output(r"READY [\d ]+\n", stream="out").group(0).split()
    port, pids = int(words[1]), [int(w) for w in words[2:]]
    tracker.add(pids)
    return port, pids


def cli_workers(tracker: Tracker, *args: str) -> tuple[ChildProcess, int, list[int]]:
    """``python -m rsepoll 0 --quiet ARGS``, once it has announced its workers."""
    child = tracker.child(rsepoll_cli("0", "--quiet", *args))
    port = wait_listening(child)
    line = child.wait_for_output(r"listening on .*", stream="out").group(0)
    m = re.search(r"(\d+) workers \(pids ([\d, ]+)\)", line)
    assert m, line
    threads = r"(\d+ I/O threads?|inline \(no I/O thread\))"
    assert re.search(rf" framing, {threads} per worker, \d+ workers ", line), line
    pids = [int(p) for p in m.group(2).split(", ")]
    assert len(pids) == int(m.group(1))
    tracker.add(pids)
    return child, port, pids


def worker_pid_of_connection(port: int) -> int:
    with connect(port) as c:
        return int(LineReader(c).readline())


def pids_serving(port: int, want: set[int], tries: int = 64) -> set[int]:
    """Worker pids seen over up to ``tries`` connections, stopping once all of
    ``want`` have been seen. The kernel picks a worker by a hash of each
    connection's addresses, so with 2 workers 64 tries miss one with odds 2**-63."""
    seen: set[int] = set()
    for _ in range(tries):
        seen.add(worker_pid_of_connection(port))
        if want <= seen:
            break
    return seen


def assert_all_gone(pids: list[int] | set[int], timeout: float = 5.0) -> None:
    assert wait_until(lambda: all(is_gone(p) for p in pids), timeout), {
        p: proc_state(p) for p in pids
    }


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


@linux_only
def test_cli_workers_share_one_port_and_stop_on_sigterm(tracker):
    child, port, pids = cli_workers(tracker, "--workers", "2")
    assert len(set(pids)) == 2
    assert children_of(child.proc.pid) == set(pids)
    readers = []
    for i in range(8):
        c = connect(port)
        readers.append(c)
        msg = b"line %d" % i
        c.sendall(msg + b"\n")
        assert recv_exactly(c, len(msg) + 1) == msg[::-1] + b"\n"
    try:
        child.signal(signal.SIGTERM)
        assert child.wait(10) == 0, child.stderr
        for c in readers:
            assert_eof(c)  # a clean close (FIN) from whichever worker held it
    finally:
        for c in readers:
            c.close()
    assert_all_gone(pids)
    assert "rsepoll: stopped" in child.stderr
    assert no_traceback(child.stderr), child.stderr


@linux_only
@pytest.mark.parametrize("to", ["parent", "group"])
def test_cli_workers_stop_on_sigint(tracker, to):
    """SIGINT to the parent alone (kill -INT), or to every process as Ctrl-C
    in a terminal sends it to the whole foreground process group."""
    child, port, pids = cli_workers(tracker, "--workers", "3")
    with connect(port) as c:
        c.sendall(b"abc\n")
        assert recv_exactly(c, 4) == b"cba\n"
        if to == "group":
            for pid in pids:
                os.kill(pid, signal.SIGINT)
        child.signal(signal.SIGINT)
        assert child.wait(10) == 0, child.stderr
        assert_eof(c)
    assert_all_gone(pids)
    assert no_traceback(child.stderr), child.stderr


@linux_only
def test_sigkill_to_the_parent_leaves_no_orphan(tracker):
    child, _port, pids = cli_workers(tracker, "--workers", "2")
    child.proc.kill()
    child.proc.wait(5)
    # Each worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops.
    assert_all_gone(pids, timeout=2.0)


@linux_only
def test_a_worker_that_stops_its_server_stops_the_pool(tracker):
    child, port, pids = cli_workers(tracker, "--workers", "2", "--exit-stops-server")
    with connect(port) as c:
        c.sendall(b"exit\n")
        assert child.wait(10) == 0, child.stderr
    assert_all_gone(pids)
    assert no_traceback(child.stderr), child.stderr


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_cli_workers_must_be_a_positive_integer(tracker, count):
    child = tracker.child(rsepoll_cli("0", "--workers", count))
    assert child.wait(10) == 2
    assert "usage:" in child.stderr
    assert "argument --workers" in child.stderr, child.stderr
    assert "listening on" not in child.stdout


@linux_only
def test_cli_workers_on_a_busy_port_fail_before_forking(tracker):
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        port = blocker.getsockname()[1]
        child = tracker.child(rsepoll_cli(str(port), "--workers", "2"))
        assert child.wait(10) == 2
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, child.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert children_of(child.proc.pid) == set()


def test_cli_help_mentions_workers():
    with rsepoll_cli("--help") as child:
        assert child.wait(10) == 0
        assert "--workers" in child.stdout


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------


@linux_only
def test_connections_spread_across_the_workers_of_port_0(tracker, tmp_path):
    child = run_script(tracker, tmp_path, "serve", 2)
    port, pids = wait_ready(child, tracker)
    assert port > 0
    assert pids_serving(port, set(pids)) == set(pids)
    child.signal(signal.SIGTERM)
    assert child.wait(10) == 0, child.stderr
    assert "RETURNED" in child.stdout
    assert_all_gone(pids)


@linux_only
def test_a_killed_worker_is_reported_and_replaced(tracker, tmp_path):
    child = run_script(tracker, tmp_path, "serve", 2)
    port, pids = wait_ready(child, tracker)
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)
    child.wait_for_output(
        rf"rsepoll worker 1 \(pid {victim}\) was killed by signal 9 \(SIGKILL\); restarting it",
        stream="err",
    )
    assert wait_until(lambda: len(children_of(child.proc.pid) - {survivor}) == 1, 5.0)
    (replacement,) = children_of(child.proc.pid) - {survivor}
    tracker.add([replacement])
    assert pids_serving(port, {replacement, survivor}) == {replacement, survivor}
    child.signal(signal.SIGTERM)
    assert child.wait(10) == 0, child.stderr
    assert_all_gone([survivor, replacement])


@linux_only
def test_a_worker_that_cannot_bind_fails_the_start(tracker, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = run_script(tracker, tmp_path, "block", 1, port)
    assert child.wait(15) == 3, child.stdout + child.stderr
    built = [int(p) for p in re.findall(r"BUILT (\d+)", child.stdout)]
    tracker.add(built)
    m = re.search(r"STARTUP_ERROR (.*)", child.stdout)
    assert m, child.stdout
    assert re.fullmatch(
        rf"rsepoll worker 1 \(pid {built[0]}\) failed to start: "
        rf"\[Errno \d+\] cannot listen on 127\.0\.0\.1:{port}: .*",
        m.group(1),
    ), m.group(1)
    assert "READY" not in child.stdout
    assert_all_gone(built)


@linux_only
def test_one_worker_failing_to_start_stops_the_others(tracker, tmp_path):
    child = run_script(tracker, tmp_path, "second-fails", 2)
    assert child.wait(15) == 3, child.stdout + child.stderr
    built = [int(p) for p in re.findall(r"BUILT (\d+)", child.stdout)]
    tracker.add(built)
    assert len(built) == 1, child.stdout  # the one that started
    assert "failed to start: make_server() raised ValueError: the second worker refuses" in (
        child.stdout
    )
    assert "Traceback" in child.stderr  # the worker's own, for the application's error
    assert "READY" not in child.stdout
    assert_all_gone(built)


@linux_only
def test_a_crash_loop_gives_up_after_backing_off(tracker, tmp_path):
    t0 = time.monotonic()
    child = run_script(tracker, tmp_path, "crash", 1)
    assert child.wait(30) == 4, child.stdout + child.stderr
    elapsed = time.monotonic() - t0
    tracker.add(int(p) for p in re.findall(r"BUILT (\d+)", child.stdout))
    restarts = re.findall(r"exited with status 7; restarting it(?: in ([\d.]+) s)?", child.stderr)
    assert [delay or "0" for delay in restarts] == ["0", "0.5", "1", "2"], child.stderr
    assert re.search(r"WORKER_ERROR .*exited with status 7; it crashed 5 times", child.stdout)
    assert 3.5 <= elapsed < 25
    assert_all_gone(tracker.pids - {child.proc.pid})


@linux_only
def test_a_worker_that_does_not_stop_in_time_is_killed(tracker, tmp_path):
    child = run_script(tracker, tmp_path, "serve", 2, STOP_TIMEOUT="1")
    port, pids = wait_ready(child, tracker)
    with connect(port) as c:
        stuck = int(LineReader(c).readline())
        c.sendall(b"hang\n")
        child.wait_for_output(rf"HANGING {stuck}", stream="out")
        t0 = time.monotonic()
        child.signal(signal.SIGTERM)
        assert child.wait(10) == 0, child.stderr
        assert time.monotonic() - t0 < 5
    assert re.search(rf"\(pid {stuck}\) did not stop within 1 s; killing it", child.stderr)
    assert "RETURNED" in child.stdout
    assert_all_gone(pids)


def test_bad_arguments_raise_before_anything_starts():
    server = rsepoll.Server
    for kwargs in ({"workers": 0}, {"workers": True}, {"workers": 2, "backlog": 0}):
        with pytest.raises(ValueError):
            rsepoll.workers.serve_workers(server, 0, **kwargs)
    with pytest.raises(ValueError, match="port"):
        rsepoll.workers.serve_workers(server, 70000, workers=2)


def test_other_platforms_get_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(NotImplementedError, match=r"need Linux.*SO_REUSEPORT"):
        rsepoll.workers.serve_workers(rsepoll.Server, 0, workers=2)
