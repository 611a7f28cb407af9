"""Server.serve(): the server inside a running asyncio event loop."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time

import pytest
import rsepoll

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio", "no-add-reader"]
if sys.platform != "win32":
    LOOPS.append("uvloop")


class NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop without ``add_reader``, as the Proactor loop (Windows' default):
    serve() must then be woken through its helper thread."""

    def add_reader(self, *args, **kwargs):
        raise NotImplementedError


@pytest.fixture(params=LOOPS)
def run(request):
    """Runs a coroutine to completion on a fresh loop of the kind asked for."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        return uvloop.run
    if request.param == "no-add-reader":

        def run_without_add_reader(coro):
            loop = NoReaderLoop()
            try:
                return loop.run_until_complete(coro)
            finally:
                loop.close()

        return run_without_add_reader
    return asyncio.run


class LoopServer(rsepoll.Server):
    """Reverses lines, and records what the loop looked like from callbacks."""

    def __init__(self, **kwargs):
        super().__init__(framing="line", **kwargs)
        self.events: list[str] = []
        self.loop_threads: set[int] = set()
        self.tasks_done = 0

    def on_listen_success(self):
        self.events.append("listening")

    def on_connection_opened(self, conn):
        asyncio.get_running_loop()  # raises outside a running loop
        self.loop_threads.add(threading.get_ident())

    def on_message_received(self, conn, data):
        self.loop_threads.add(threading.get_ident())
        if data == b"task":
            asyncio.get_running_loop().create_task(self.reply_later(conn))
        else:
            self.send_message(conn, data[::-1])

    async def reply_later(self, conn):
        await asyncio.sleep(0.01)
        self.send_message(conn, b"from a task")

    def on_connection_closed(self, conn):
        self.events.append("closed")

    def on_shutdown_success(self):
        self.events.append("shutdown")


def listening(server):
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.register_listener_socket(listener)
    return listener


async def exchange(port, lines):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    for line in lines:
        writer.write(line + b"\n")
        await writer.drain()
        replies.append(await asyncio.wait_for(reader.readline(), 5))
    return reader, writer, replies


def test_serve_runs_callbacks_on_the_loop_and_returns_after_stop_server(run):
    server = LoopServer()
    listener = listening(server)

    async def main():
        task = asyncio.ensure_future(server.serve(handle_signals=False))
        await asyncio.sleep(0)
        assert server.events == ["listening"]
        reader, writer, replies = await exchange(listener.port, [b"abc", b"task", b"xyz"])
        assert replies == [b"cba\n", b"from a task\n", b"zyx\n"]
        assert server.is_running
        server.stop_server()
        await asyncio.wait_for(task, 10)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        return threading.get_ident()

    loop_thread = run(main())
    listener.close()
    assert server.loop_threads == {loop_thread}
    assert server.events == ["listening", "closed", "shutdown"]
    assert not server.is_running


def test_cancelling_the_serving_task_stops_the_server(run):
    server = LoopServer()
    listener = listening(server)

    async def main():
        task = asyncio.ensure_future(server.serve(handle_signals=False))
        reader, writer, replies = await exchange(listener.port, [b"hello"])
        assert replies == [b"olleh\n"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    run(main())
    listener.close()
    assert server.events == ["listening", "closed", "shutdown"]


def test_timers_and_calls_from_threads_run_on_the_loop(run):
    server = LoopServer(max_fds=64)
    listener = listening(server)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(server.serve(timeout=60_000, handle_signals=False))
        await asyncio.sleep(0.01)
        fired = loop.create_future()
        start = server.time()
        server.call_later(0.05, lambda: fired.set_result(server.time()))
        when = await asyncio.wait_for(fired, 5)
        assert when >= start + 0.05
        # With a 60 s pace and no timer, only the wake-up socket can bring
        # the call in from another thread.
        called = loop.create_future()
        sent_at = []

        def from_thread():
            sent_at.append(time.monotonic())
            server.call_soon_threadsafe(lambda: called.set_result(time.monotonic()))

        await asyncio.sleep(0.05)
        threading.Thread(target=from_thread).start()
        arrived = await asyncio.wait_for(called, 5)
        assert arrived - sent_at[0] < 1.0
        server.stop_server()
        await asyncio.wait_for(task, 10)

    run(main())
    listener.close()


@pytest.fixture
def turns(monkeypatch):
    """Counts the turns serve() asks of the server."""
    from rsepoll import _serving

    count = [0]
    turn = _serving._Driver.turn

    def counted(self):
        count[0] += 1
        turn(self)

    monkeypatch.setattr(_serving._Driver, "turn", counted)
    return count


def test_an_idle_served_server_leaves_the_loop_idle(run, turns):
    server = LoopServer()
    listener = listening(server)
    counted = []

    async def main():
        task = asyncio.ensure_future(server.serve(timeout=60_000, handle_signals=False))
        # A timer that will never be due leaves it idle too.
        server.call_later(math.inf, print)
        await asyncio.sleep(0.1)
        before = turns[0]
        await asyncio.sleep(1.0)
        counted.append(turns[0] - before)
        server.stop_server()
        await asyncio.wait_for(task, 10)

    run(main())
    listener.close()
    assert counted[0] <= 2, f"{counted[0]} turns in 1 s of idleness"


@pytest.mark.parametrize("sender", ["callback", "loop-task", "thread"])
def test_a_lent_reply_is_let_go_while_the_session_sleeps_whatever_the_pace(run, turns, sender):
    """A ``bytes`` reply of 4 KiB or more is lent to ``send_message``, and let
    go when a turn finds it written: a session that holds one comes back
    within 50 ms, as ``listen()`` does, not at the pace (60 s here), whether
    a callback sent it or code that runs while the session sleeps (a
    callback of the loop's own, another thread); once it has let go, it is
    idle again."""
    reply = bytes([7]) * 100_000
    base = sys.getrefcount(reply)
    outcome = {}

    class Lender(rsepoll.Server):
        def on_message_received(self, conn, data):
            def send():
                assert self.send_message(conn, reply)

            if sender == "callback":
                send()
            elif sender == "loop-task":
                # Runs on the loop's thread, between the session's turns.
                asyncio.get_running_loop().call_later(0.2, send)
            else:
                threading.Timer(0.2, send).start()

    server = Lender()
    listener = listening(server)

    async def main():
        task = asyncio.ensure_future(server.serve(timeout=60_000, handle_signals=False))
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"go")
        assert await asyncio.wait_for(reader.readexactly(len(reply)), 5) == reply
        deadline = time.monotonic() + 1.0
        while sys.getrefcount(reply) > base and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        outcome["held"] = sys.getrefcount(reply) - base
        if sender == "callback":  # the sleep after is the same whoever sent
            await asyncio.sleep(0.1)
            before = turns[0]
            await asyncio.sleep(1.0)
            outcome["idle turns"] = turns[0] - before
        writer.close()
        server.stop_server()
        await asyncio.wait_for(task, 10)

    run(main())
    listener.close()
    assert outcome["held"] == 0, "the reply was still held 1 s after it arrived"
    if sender == "callback":
        assert outcome["idle turns"] <= 2, f"{outcome['idle turns']} turns in 1 s after letting go"


def test_a_second_cancellation_cuts_the_stop_short(run):
    class Flooder(LoopServer):
        def on_message_received(self, conn, data):
            for _ in range(128):
                self.send_message(conn, b"x" * 65535)

    server = Flooder()
    listener = listening(server)

    async def main():
        task = asyncio.ensure_future(server.serve(handle_signals=False))
        _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"flood\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # 8 MiB queued for a client that reads nothing
        task.cancel()
        await asyncio.sleep(0.3)
        assert not task.done(), "the first cancellation did not wait for the output"
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        writer.close()
        return time.monotonic() - start

    took = run(main())
    listener.close()
    assert took < 2.0, f"the second cancellation took {took:.2f} s (the stop's timeout is 5 s)"
    assert server.events == ["listening", "closed", "shutdown"]


def test_serve_while_running_is_refused(run):
    server = LoopServer()
    listener = listening(server)

    async def main():
        task = asyncio.ensure_future(server.serve(handle_signals=False))
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already running"):
            await server.serve(handle_signals=False)
        server.stop_server()
        await asyncio.wait_for(task, 10)

    run(main())
    listener.close()


def test_stop_server_under_serve_stops_at_once_whatever_the_pace(run):
    server = LoopServer()
    listener = listening(server)

    async def main():
        # A 60 s pace: only the stop request itself can wake the sleeping
        # session to begin the stop.
        task = asyncio.ensure_future(server.serve(timeout=60_000, handle_signals=False))
        reader, writer, replies = await exchange(listener.port, [b"abc"])
        assert replies == [b"cba\n"]
        await asyncio.sleep(0.1)
        start = time.monotonic()
        server.stop_server()
        await asyncio.wait_for(task, 10)
        took = time.monotonic() - start
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        return took

    took = run(main())
    listener.close()
    assert took < 1.0, f"serve() took {took:.2f} s to stop"
