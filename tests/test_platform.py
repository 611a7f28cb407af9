"""What differs between platforms: backend choice, handle inheritance, urgent data."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest
import rsepoll
from conftest import connect, recv_exactly, running

pytestmark = pytest.mark.timeout(30)

NATIVE = "epoll" if sys.platform == "linux" else "portable"


def test_auto_backend_is_the_platform_best_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("RSEPOLL_BACKEND", raising=False)
    assert rsepoll.Server().backend == NATIVE
    assert rsepoll.Server(backend="auto").backend == NATIVE
    assert rsepoll.Server(backend=None).backend == NATIVE
    assert rsepoll.Server(backend="portable").backend == "portable"
    monkeypatch.setenv("RSEPOLL_BACKEND", "portable")
    assert rsepoll.Server().backend == "portable"
    assert rsepoll.Server(backend="auto").backend == "portable"
    # An explicit choice wins over the environment.
    monkeypatch.setenv("RSEPOLL_BACKEND", "bogus")
    assert rsepoll.Server(backend="portable").backend == "portable"


@pytest.mark.skipif(sys.platform == "linux", reason="epoll exists on Linux")
def test_epoll_where_it_does_not_exist_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"only on Linux.*'auto' or 'portable'"):
        rsepoll.Server(backend="epoll")


@pytest.mark.parametrize(
    ("backend", "match"),
    [
        ("kqueue", r"""unknown backend "kqueue": expected 'auto', 'epoll' or 'portable'"""),
        (5, "backend must be a string, got 5"),
    ],
)
def test_a_backend_that_is_not_one_is_a_value_error_naming_it(backend, match):
    with pytest.raises(ValueError, match=match):
        rsepoll.Server(backend=backend)


def is_inheritable(handle: int) -> bool:
    if sys.platform == "win32":
        return os.get_handle_inheritable(handle)
    return os.get_inheritable(handle)


def test_sockets_are_not_inheritable():
    """Close-on-exec on POSIX, no HANDLE_FLAG_INHERIT on Windows (where there
    is no accept4: the accepted socket must be made so afterwards)."""
    seen: dict[str, bool] = {}

    class Recorder(rsepoll.Server):
        def on_connection_opened(self, conn):
            seen["connection"] = is_inheritable(conn.fd)

    with running(Recorder) as (server, port), connect(port) as c:
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        seen["listener"] = is_inheritable(server.test_listener.fileno())
    assert seen == {"connection": False, "listener": False}


def test_urgent_data_neither_spins_nor_loses_the_bytes_around_it():
    """An urgent (out-of-band) byte is not part of the stream, as on Unix
    without SO_OOBINLINE. Windows' AFD reports it until it is read with
    MSG_OOB, which would spin a one-shot loop; the process must go idle."""
    received = bytearray()
    got = threading.Condition()

    class Collector(rsepoll.Server):
        def on_message_received(self, conn, data):
            with got:
                received.extend(data)
                got.notify_all()

    def wait_for(n: int) -> bytes:
        with got:
            got.wait_for(lambda: len(received) >= n, timeout=10)
            return bytes(received)

    with running(Collector) as (_server, port), connect(port) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(b"abc")
        c.send(b"!", socket.MSG_OOB)
        c.sendall(b"def")
        assert wait_for(6) == b"abcdef"
        time.sleep(0.2)  # let the I/O thread see whatever is left
        before = time.process_time()
        time.sleep(1.0)
        used = time.process_time() - before
        # A spinning thread would use ~1 s; the listening thread's 50 ms
        # wake-ups cost a few milliseconds.
        assert used < 0.1, f"{used:.3f} s of CPU in 1 s after urgent data"
        c.sendall(b"ghi")
        assert wait_for(9) == b"abcdefghi"
