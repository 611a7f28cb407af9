"""No file descriptors or threads left behind; RLIMIT_NOFILE handling."""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading

import pytest
import rsepoll
from conftest import connect, make_server, recv_exactly, start, wait_until

if sys.platform != "win32":
    import resource

pytestmark = pytest.mark.timeout(60)


def fd_count() -> int:
    """Open fds (Linux), or open handles (Windows)."""
    if sys.platform == "win32":
        import psutil

        return psutil.Process().num_handles()
    return len(os.listdir("/proc/self/fd"))


def native_thread_count() -> int:
    if sys.platform == "win32":
        import psutil

        return psutil.Process().num_threads()
    return len(os.listdir("/proc/self/task"))


def snapshot() -> tuple[int, int, int]:
    return fd_count(), threading.active_count(), native_thread_count()


def one_server_cycle(backend: str | None) -> None:
    kwargs = {} if backend is None else {"backend": backend}
    server = make_server(rsepoll.Server, **kwargs)
    ls = rsepoll.make_listener_socket(0, "127.0.0.1")
    st = None
    try:
        assert server.register_listener_socket(ls) is True
        st = start(server)
        clients = [connect(ls.port) for _ in range(5)]
        try:
            for i, c in enumerate(clients):
                msg = b"resource check %d" % i
                c.sendall(msg)
                assert recv_exactly(c, len(msg)) == msg
        finally:
            # Some closed by the client before stop, some left for stop_server().
            for c in clients[:2]:
                c.close()
        st.stop()
        for c in clients[2:]:
            assert c.recv(16) == b""
            c.close()
        st.raise_if_failed()
        assert server.test_errors == []
    finally:
        if st is not None and st.is_alive():
            server.stop_server()
            st.join(5)
        ls.close()
    del server, st, ls
    gc.collect()


@pytest.mark.skipif(
    sys.platform != "win32" and not os.path.isdir("/proc/self/fd"), reason="needs /proc"
)
@pytest.mark.parametrize(
    "backend",
    [
        None,
        pytest.param(
            "epoll",
            marks=pytest.mark.skipif(sys.platform != "linux", reason="epoll is Linux-only"),
        ),
        "portable",
    ],
)
def test_no_fd_or_thread_left_behind(backend):
    base = snapshot()
    # Warm-up: one-time, process-wide initialisation is not a leak, so the
    # baseline is whatever remains after a first complete cycle.
    one_server_cycle(backend)
    wait_until(lambda: snapshot() == base, timeout=2)
    before = snapshot()
    for _ in range(3):
        one_server_cycle(backend)
    ok = wait_until(lambda: snapshot() == before, timeout=5)
    assert ok, f"before (fds, py threads, native threads)={before} after={snapshot()}"


def test_unstarted_server_releases_resources():
    gc.collect()
    rsepoll.Server()  # warm-up
    gc.collect()
    before = snapshot()
    for _ in range(5):
        server = rsepoll.Server()
        ls = rsepoll.make_listener_socket(0, "127.0.0.1")
        server.register_listener_socket(ls)
        ls.close()
        del server, ls
    gc.collect()
    assert wait_until(lambda: snapshot() == before, timeout=5), (before, snapshot())


@pytest.fixture
def restore_nofile():
    original = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield original
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, original)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX; Windows has none")
def test_max_fds_raises_soft_limit(restore_nofile):
    _soft, hard = restore_nofile
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if limit < 1024:
        pytest.skip(f"hard RLIMIT_NOFILE too small ({hard})")
    target = min(limit, 4096)
    lowered = 512
    assert fd_count() < lowered - 64, "too many fds open to lower the soft limit"
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    rsepoll.Server(max_fds=target)
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert new_soft >= target
    assert new_hard >= new_soft


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX; Windows has none")
def test_max_fds_below_soft_limit_does_not_lower_it(restore_nofile):
    soft, _hard = restore_nofile
    rsepoll.Server(max_fds=64)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX; Windows has none")
def test_max_fds_beyond_what_is_possible_warns_instead_of_failing(restore_nofile, caplog):
    soft, hard = restore_nofile
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except OSError:
        pytest.skip("cannot read /proc/sys/fs/nr_open")
    impossible = max(nr_open, 0 if hard == resource.RLIM_INFINITY else hard) + 1000
    caplog.set_level(logging.DEBUG, logger="rsepoll")
    server = rsepoll.Server(max_fds=impossible)
    assert isinstance(server, rsepoll.Server)
    new_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert new_soft >= soft
    # Raised as far as it could go: at least to the old hard limit.
    if hard != resource.RLIM_INFINITY:
        assert new_soft >= hard
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and (r.name == "rsepoll" or r.name.startswith("rsepoll."))
    ]
    assert warnings, caplog.text
