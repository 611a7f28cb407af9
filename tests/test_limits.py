"""Protection from any client: idle and message timeouts, the connection cap,
and the counters that show what happened."""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time

import pytest
import rsepoll
from conftest import connect, recv_exactly, running, wait_until


class Tracker(rsepoll.Server):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reasons: dict[int, str | None] = {}
        self.opened = 0

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.opened += 1

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.reasons[conn.id] = conn.close_reason

    def on_exception_occurred(self, exc: BaseException) -> None:
        pass  # rejections are reported here; the tests read stats()


def test_an_idle_connection_is_closed_and_an_active_one_is_not() -> None:
    with running(Tracker, idle_timeout=0.5) as (server, port):
        idle = connect(port)
        active = connect(port)
        started = time.monotonic()
        while time.monotonic() - started < 1.2:
            active.sendall(b"tick")
            assert recv_exactly(active, 4) == b"tick"
            time.sleep(0.1)
        assert idle.recv(1) == b"", "the idle connection was not closed"
        assert wait_until(lambda: list(server.reasons.values()) == ["idle_timeout"], 5.0)
        active.sendall(b"still here")
        assert recv_exactly(active, 10) == b"still here"
        idle.close()
        active.close()


def test_idle_timeout_is_off_by_default() -> None:
    with running(Tracker) as (_server, port):
        client = connect(port)
        time.sleep(0.3)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        client.close()


@pytest.mark.timeout(60)
def test_slowloris_clients_are_closed_and_never_stop_a_normal_client() -> None:
    """200 clients announce a message and trickle it a byte at a time; a
    normal client keeps being served, and every trickler is closed by the
    message timeout."""
    tricklers = 200
    with running(Tracker, framing="length", message_timeout=1.5) as (server, port):
        slow = [connect(port) for _ in range(tricklers)]
        normal = connect(port)
        for sock in slow:
            sock.sendall(struct.pack(">I", 1000) + b"a")
        worst = 0.0
        started = time.monotonic()
        trickling = True
        while trickling:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"b")
            begin = time.monotonic()
            normal.sendall(struct.pack(">I", 5) + b"hello")
            assert recv_exactly(normal, 9) == struct.pack(">I", 5) + b"hello"
            worst = max(worst, time.monotonic() - begin)
            time.sleep(0.2)
            trickling = time.monotonic() - started < 2.5
        assert worst < 1.0, f"a normal request took {worst:.2f} s among tricklers"
        assert wait_until(lambda: len(server.reasons) == tricklers, 10.0)
        assert set(server.reasons.values()) == {"message_timeout"}
        for sock in slow:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
            sock.close()
        assert server.stats()["closes"]["message_timeout"] == tricklers
        normal.close()


def test_a_slow_but_steady_message_within_the_timeout_is_delivered() -> None:
    with running(Tracker, framing="line", message_timeout=2.0) as (_server, port):
        client = connect(port)
        for byte in b"slow line":
            client.send(bytes([byte]))
            time.sleep(0.05)
        client.sendall(b"\n")
        assert recv_exactly(client, 10) == b"slow line\n"
        client.close()


def test_connections_beyond_max_connections_are_turned_away() -> None:
    with running(Tracker, max_connections=3, expect_errors=True) as (server, port):
        kept = [connect(port) for _ in range(3)]
        for sock in kept:
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        extra = [connect(port) for _ in range(5)]
        for sock in extra:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
            sock.close()
        assert server.opened == 3
        # Counters are published once per I/O turn: a moment after the fact.
        assert wait_until(lambda: server.stats()["connections_rejected"] == 5, 5.0)
        assert server.stats()["closes"]["limit"] == 5
        # The server stays responsive, and takes new clients once some leave.
        kept[0].sendall(b"ok")
        assert recv_exactly(kept[0], 2) == b"ok"
        kept.pop().close()
        assert wait_until(lambda: server.stats()["connections_open"] == 2, 5.0)
        newcomer = connect(port)
        newcomer.sendall(b"in")
        assert recv_exactly(newcomer, 2) == b"in"
        for sock in [*kept, newcomer]:
            sock.close()


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        rsepoll.Server(max_connections=0)


NO_LIMIT = "RLIM_INFINITY"


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no RLIMIT_NOFILE")
@pytest.mark.parametrize(
    ("soft", "hard", "usable", "raised_to"),
    [
        # Already above max_fds: kept, and all of it usable.
        (20_000, 20_000, 20_000, None),
        # Below: raised to max_fds, or as far as the hard limit allows.
        (1024, NO_LIMIT, 8192, 8192),
        (1024, 4096, 4096, 4096),
        (1024, 1024, 1024, None),
        # No limit at all: max_fds is the budget.
        (NO_LIMIT, NO_LIMIT, 8192, None),
    ],
)
def test_the_fd_limit_is_raised_toward_max_fds_never_lowered(
    monkeypatch: pytest.MonkeyPatch, soft: object, hard: object, usable: int, raised_to: int | None
) -> None:
    import resource

    def limit(value: object) -> int:
        return resource.RLIM_INFINITY if value == NO_LIMIT else value  # type: ignore[return-value]

    soft, hard = limit(soft), limit(hard)
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: set_to.append(limits))
    assert rsepoll._raise_fd_limit(8192) == usable
    assert set_to == ([] if raised_to is None else [(raised_to, hard)])


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no RLIMIT_NOFILE")
def test_a_refused_raise_keeps_the_soft_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS refuses a soft limit above OPEN_MAX even under an infinite hard
    limit: the server keeps the limit it has and says so."""
    import resource

    def refuse(_which: int, _limits: tuple[int, int]) -> None:
        raise ValueError("current limit exceeds maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    warnings: list[str] = []
    monkeypatch.setattr(
        rsepoll.logger, "warning", lambda message, *args: warnings.append(message % args)
    )
    assert rsepoll._raise_fd_limit(20_000) == 256
    assert warnings == [
        "could not raise RLIMIT_NOFILE to 20000: current limit exceeds maximum limit"
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no RLIMIT_NOFILE")
def test_the_default_max_connections_follows_a_soft_limit_above_max_fds() -> None:
    """max_fds=40 alone would leave 40 - 32 = 8 connections; the process may
    open as many descriptors as its soft limit, and the default follows it."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients = 12
    assert soft == resource.RLIM_INFINITY or soft >= 32 + clients + 64, soft
    with running(Tracker, max_fds=40) as (server, port):
        socks = [connect(port) for _ in range(clients)]
        for i, sock in enumerate(socks):
            sock.sendall(b"%02d" % i)
            assert recv_exactly(sock, 2) == b"%02d" % i
        assert server.opened == clients
        assert server.stats()["connections_rejected"] == 0
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"message_timeout": 0}, "message_timeout"),
        # Beyond what a deadline can hold: it would overflow the I/O thread's clock.
        ({"idle_timeout": 1e19}, "idle_timeout"),
        ({"message_timeout": 2e9}, "message_timeout"),
        ({"idle_timeout": float("inf")}, "idle_timeout"),
        ({"idle_timeout": float("nan")}, "idle_timeout"),
        ({"message_timeout": 1e300}, r"message_timeout .*got 1e\+300$"),
        # Not a number of seconds: named too, not a bare TypeError.
        ({"idle_timeout": "5"}, r"idle_timeout .*got '5'$"),
        ({"message_timeout": True}, "message_timeout"),
    ],
)
def test_bad_timeouts_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rsepoll.Server(**kwargs)  # type: ignore[arg-type]


def test_the_longest_timeout_is_accepted() -> None:
    rsepoll.Server(idle_timeout=1e9, message_timeout=1e9)


#: Every option of rsepoll.Server that is a size or a count.
SIZE_AND_COUNT_OPTIONS = (
    "max_fds",
    "ring_slots",
    "slot_size",
    "write_buffer_high",
    "write_buffer_low",
    "max_message_size",
    "length_prefix",
    "max_connections",
    "io_threads",
)

#: Values no size or count may take, whatever its range.
BAD_SIZES: tuple[object, ...] = (-5, -(2**70), 2**64, 2**70, 1.5, "8", b"8", True, None)

#: Those some options accept: None asks for the default (but for max_fds);
#: io_threads takes its count as a string too (as $RSEPOLL_IO_THREADS gives
#: it); max_fds above the hard limit is lowered to it, with a warning.
ACCEPTED = {
    *((option, None) for option in SIZE_AND_COUNT_OPTIONS if option != "max_fds"),
    ("io_threads", "8"),
    ("max_fds", 2**64),
    ("max_fds", 2**70),
}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        (option, value)
        for option in SIZE_AND_COUNT_OPTIONS
        for value in BAD_SIZES
        if (option, value) not in ACCEPTED
    ],
)
def test_a_bad_size_or_count_is_a_value_error_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{option}\b") as info:
        rsepoll.Server(**{option: value})  # type: ignore[arg-type]
    assert type(info.value) is ValueError
    assert len(str(info.value)) < 200


def test_stats_count_traffic_and_closes() -> None:
    with running(Tracker, framing="line") as (server, port):
        before = server.stats()
        assert before["connections_open"] == 0
        clients = [connect(port) for _ in range(3)]
        for sock in clients:
            sock.sendall(b"one\ntwo\n")
            assert recv_exactly(sock, 8) == b"one\ntwo\n"
        # Counters are published once per I/O turn: a moment after the fact.
        assert wait_until(lambda: server.stats()["bytes_sent"] == 24, 5.0)
        stats = server.stats()
        assert stats["connections_open"] == 3
        assert stats["connections_accepted"] == 3
        assert stats["messages_received"] == 6
        assert stats["messages_sent"] == 6
        assert stats["bytes_received"] == 24
        assert stats["ring_high_water"] >= 1
        for sock in clients:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
            sock.close()
        assert wait_until(lambda: server.stats()["closes"]["peer"] == 3, 5.0)
        assert server.stats()["connections_open"] == 0
    # After listen() returns, stats() keeps the last run's counters.
    assert server.stats()["connections_closed"] == 3


def test_stats_can_be_read_from_another_thread_while_serving() -> None:
    seen: list[int] = []
    with running(Tracker) as (server, port):
        client = connect(port)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                seen.append(server.stats()["bytes_received"])
                time.sleep(0.001)

        poller = threading.Thread(target=poll)
        poller.start()
        for _ in range(50):
            client.sendall(b"12345678")
            assert recv_exactly(client, 8) == b"12345678"
        stop.set()
        poller.join(5)
        client.close()
    assert seen == sorted(seen), "a counter went backwards"
    assert seen[-1] <= 400
    assert server.stats()["bytes_received"] == 400
