"""Timers (call_later, call_at, time) and call_soon_threadsafe under listen()."""

from __future__ import annotations

import gc
import math
import threading
import time
import weakref

import pytest
import rsepoll
from conftest import connect, recv_exactly, running

pytestmark = pytest.mark.timeout(60)


class Recorder(rsepoll.Server):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log: list = []
        self.done = threading.Event()

    def note(self, item):
        self.log.append(item)

    def finish(self):
        self.done.set()


def test_due_timers_run_in_order_of_when_then_of_creation():
    with running(Recorder) as (server, _):
        order = []
        box = {}

        def schedule():
            base = server.time() + 0.05
            for name in ("c1", "c2", "c3"):
                server.call_at(base + 0.01, order.append, name)
            server.call_at(base, order.append, "first")
            server.call_later(-1, order.append, "now")
            box["late"] = server.call_at(base + 0.02, server.finish)

        assert server.call_soon_threadsafe(schedule)
        assert server.done.wait(5)
        assert order == ["now", "first", "c1", "c2", "c3"]


def test_a_cancelled_timer_never_runs_and_reports_itself():
    with running(Recorder) as (server, _):
        handles = {}

        def schedule():
            handles["doomed"] = server.call_later(0.02, server.note, "doomed")
            handles["kept"] = server.call_later(0.04, server.note, "kept")
            handles["doomed"].cancel()
            server.call_later(0.1, server.finish)

        server.call_soon_threadsafe(schedule)
        assert server.done.wait(5)
        assert server.log == ["kept"]
        doomed, kept = handles["doomed"], handles["kept"]
        assert doomed.cancelled() and not kept.cancelled()
        assert kept.when() < server.time()
        assert "cancelled" in repr(doomed) and "done" in repr(kept)
        kept.cancel()  # after it ran: nothing to do
        assert kept.cancelled()


def test_timers_on_an_idle_server_run_within_a_few_milliseconds():
    # listen(timeout=10 s): only the timers' own deadlines can end the sleeps
    # early (between them, listen() also wakes every 50 ms to look at signals:
    # a wait that ignored the timers would make them ~25 ms late on average).
    with running(Recorder, listen_timeout=10_000) as (server, _):
        lateness = []

        def next_timer(handle=None):
            if handle is not None:
                lateness.append(server.time() - handle.when())
            if len(lateness) == 20:
                server.finish()
                return
            box = []
            box.append(server.call_later(0.013, lambda: next_timer(box[0])))

        server.call_soon_threadsafe(next_timer)
        assert server.done.wait(10)
        lateness.sort()
        assert lateness[0] >= 0
        assert lateness[len(lateness) // 2] < 0.010, f"median late by {lateness[10]:.4f} s"


def test_a_raising_timer_goes_to_on_exception_occurred_and_the_others_run():
    with running(Recorder, expect_errors=True) as (server, _):

        def boom():
            raise ValueError("boom")

        def schedule():
            when = server.time() + 0.02
            server.call_at(when, server.note, "before")
            server.call_at(when, boom)
            server.call_at(when, server.note, "after")
            server.call_at(when + 0.01, server.finish)

        server.call_soon_threadsafe(schedule)
        assert server.done.wait(5)
        assert server.log == ["before", "after"]
        assert [type(e) for e in server.test_errors] == [ValueError]


def test_timers_made_before_listen_run_once_it_serves_and_the_rest_drop_at_stop():
    server = Recorder()

    class Callback:
        def __call__(self):
            server.note("never")

    pending = Callback()
    gone = weakref.ref(pending)
    server.call_later(0.0, server.note, "early")
    handle = server.call_later(3600, pending)
    del pending
    server.call_later(0.05, server.stop_server)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    server.listen(handle_signals=False)
    listener.close()
    assert server.log == ["early"]
    gc.collect()
    assert gone() is None, "a pending timer's callback outlived the server's stop"
    assert not handle.cancelled()


def test_a_timer_infinitely_far_off_leaves_the_server_idle():
    with running(Recorder, listen_timeout=10_000) as (server, _):
        server.call_soon_threadsafe(server.call_later, math.inf, server.note, "never")
        server.call_soon_threadsafe(server.call_at, 1e300, server.note, "never")
        time.sleep(0.1)
        cpu = time.process_time()
        time.sleep(0.5)
        used = time.process_time() - cpu
        assert used < 0.05, f"the idle server used {used:.3f} s of CPU in 0.5 s"
        assert server.log == []


def test_call_later_rejects_what_it_cannot_run():
    server = rsepoll.Server()
    with pytest.raises(TypeError):
        server.call_later(1, "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        server.call_later(float("nan"), print)
    with pytest.raises(TypeError):
        server.call_at("soon", print)  # type: ignore[arg-type]


def test_call_soon_threadsafe_runs_on_the_listening_thread_in_order_per_thread():
    with running(Recorder) as (server, port):
        seen: dict[int, list[int]] = {}
        threads_seen = set()
        count = 2000

        def record(sender, i):
            threads_seen.add(threading.get_ident())
            seen.setdefault(sender, []).append(i)
            if sum(len(v) for v in seen.values()) == 4 * count:
                server.finish()

        def hammer(sender):
            for i in range(count):
                assert server.call_soon_threadsafe(record, sender, i)

        workers = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        assert server.done.wait(10)
        assert threads_seen == {server.test_listen_ident}
        assert {k: v == list(range(count)) for k, v in seen.items()} == dict.fromkeys(
            range(4), True
        )
        # Meanwhile the server still serves.
        with connect(port) as c:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"


@pytest.mark.parametrize("attempt", range(3))
def test_every_call_accepted_runs_even_at_the_end_of_the_run(attempt):
    # A thread calls until refused, across the run's end: whatever was
    # accepted ran, including calls that came as the run was finishing.
    server = rsepoll.Server()
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    accepted = 0
    ran = []
    started = threading.Event()

    def caller():
        nonlocal accepted
        started.set()
        while server.call_soon_threadsafe(ran.append, 1):
            accepted += 1

    thread = threading.Thread(target=caller)
    thread.start()
    started.wait()
    server.call_later(0.05, server.stop_server)
    server.listen(handle_signals=False)
    thread.join(10)
    listener.close()
    assert accepted > 0
    assert len(ran) == accepted


def test_call_soon_threadsafe_refuses_once_the_server_has_stopped():
    server = Recorder()
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    ran = []

    def on_shutdown_success():
        # Accepted while the run was ending: run before on_shutdown_success.
        ran.append("shutdown")

    server.on_shutdown_success = on_shutdown_success  # type: ignore[method-assign]

    def late_caller():
        server.stop_server()
        server.call_soon_threadsafe(ran.append, "accepted")

    assert server.call_soon_threadsafe(late_caller)
    server.listen(handle_signals=False)
    listener.close()
    assert ran == ["accepted", "shutdown"]
    assert server.call_soon_threadsafe(ran.append, "refused") is False
    time.sleep(0.01)
    assert ran == ["accepted", "shutdown"]


def test_a_raising_call_goes_to_on_exception_occurred():
    with running(Recorder, expect_errors=True) as (server, _):

        def boom():
            raise KeyError("x")

        server.call_soon_threadsafe(boom)
        server.call_soon_threadsafe(server.finish)
        assert server.done.wait(5)
        assert [type(e) for e in server.test_errors] == [KeyError]


def test_a_server_left_with_pending_timers_and_calls_is_collected():
    # The callbacks refer back to the server: a cycle only the collector
    # can break, through the timers and the call queue.
    server = Recorder()
    server.call_later(3600, server.note, "never")
    server.call_soon_threadsafe(server.note, "never")
    gone = weakref.ref(server)
    del server
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("close_connections", [True, False])
def test_on_stopping_runs_once_even_with_no_connection_open(close_connections):
    class Stopping(Recorder):
        def on_stopping(self):
            self.note("stopping")

    server = Stopping()
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    server.call_later(0.05, lambda: server.stop_server(close_connections=close_connections))
    server.listen(handle_signals=False)
    listener.close()
    assert server.log == ["stopping"]
