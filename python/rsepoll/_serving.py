"""How :meth:`rsepoll.Server.serve` runs a server inside an asyncio event loop.

The Rust side (``ServeSession``) does the work in turns and says, after each,
when it wants the next: soon, when the wake-up socket becomes readable or a
deadline passes, or never (the server has stopped). :class:`_Driver` makes the
loop keep those appointments. The I/O threads write a byte to the socket pair
only while the session sleeps, so an idle server costs the loop one timer
(the next ``call_later`` timer, or ``on_waiting_for_activity``'s pace).

Loops without ``add_reader`` (the Proactor loop, Windows' default) get a
thread that blocks on the socket and hands each wake-up to the loop with
``call_soon_threadsafe``.

Inline (``io_threads=0``), the loop's thread also does the network I/O: the
loop watches the engine's poller (its epoll or kqueue descriptor,
``ServeSession.io_fd()``) beside the socket, and each turn reads and writes
what is ready without waiting. A loop without ``add_reader``, or a poller
with no such descriptor (IOCP), cannot be told when sockets are ready: the
server then runs one I/O thread instead.

A stop asked for by this module (SIGTERM, a cancelled task) belongs to the
run: once the run has ended it is ignored, so it cannot stop the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import Server


async def serve(server: Server, timeout: int, handle_signals: bool) -> None:
    """The body of :meth:`rsepoll.Server.serve`."""
    loop = asyncio.get_running_loop()
    driver: _Driver | None = None

    def stop() -> None:
        if driver is None:
            server.stop_server()  # the run is starting: it stops at once
        else:
            driver.stop(server)

    # SIGTERM is handled from before the run starts: on_listen_success is
    # the signal a supervisor may act on.
    with _stop_on_sigterm(loop, stop, handle_signals):
        wake_r, wake_w = socket.socketpair()
        try:
            wake_w.setblocking(False)
            # Held by the driver alone, which lets it go on the loop's
            # thread once finished: the session is unsendable, and this
            # frame may end up in a cycle (an exception raised from here)
            # that the collector breaks on any thread.
            session = server._serve_session(wake_w.fileno(), timeout, _can_watch(loop, wake_r))
            driver = _Driver(loop, session, wake_r, wake_w)
            del session
        except BaseException:
            wake_r.close()
            wake_w.close()
            raise
        try:
            driver.start()
            try:
                await asyncio.shield(driver.finished)
            except asyncio.CancelledError:
                # Cancelling the task that awaits serve() stops the server as
                # stop_server() does; a second cancellation cuts the stop
                # short, as a second Ctrl-C does. The cancellation goes on
                # once the server has stopped.
                driver.interrupt(asyncio.CancelledError())
                while not driver.finished.done():
                    try:
                        await asyncio.shield(driver.finished)
                    except asyncio.CancelledError:
                        driver.interrupt(asyncio.CancelledError())
                driver.finished.result()
                raise
            driver.finished.result()
        finally:
            # Only if something above failed before the run ended: abandon
            # it rather than leave its I/O threads running.
            driver.abandon()


def _can_watch(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    """True if ``loop`` can watch descriptors (``add_reader``)."""
    try:
        loop.add_reader(sock, lambda: None)
    except NotImplementedError:
        return False
    loop.remove_reader(sock)
    return True


class _Driver:
    """Runs a ``ServeSession``'s turns on an event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        session: Any,
        wake_r: socket.socket,
        wake_w: socket.socket,
    ) -> None:
        self.loop = loop
        self.session = session
        self.wake_r = wake_r
        self.wake_w = wake_w
        self.finished: asyncio.Future[None] = loop.create_future()
        self.next_turn: asyncio.Handle | None = None
        self.reading = False
        #: The inline engine's poller, watched while the run lasts.
        self.io_fd: int | None = None

    def start(self) -> None:
        try:
            self.wake_r.setblocking(False)
            self.loop.add_reader(self.wake_r, self.on_readable)
            self.reading = True
        except NotImplementedError:
            self.wake_r.setblocking(True)
            threading.Thread(target=self.watch, name="rsepoll-serve-wake", daemon=True).start()
        io_fd = self.session.io_fd()
        if io_fd is not None:
            self.loop.add_reader(io_fd, self.turn)
            self.io_fd = io_fd
        self.next_turn = self.loop.call_soon(self.turn)

    def stop(self, server: Server) -> None:
        """``server.stop_server()``, while this run lasts."""
        if not self.finished.done():
            server.stop_server()

    def interrupt(self, error: BaseException) -> None:
        """Stops this run (a second call cuts the stop short), making ``serve()``
        raise ``error`` once stopped, and makes sure a turn comes to act on
        it; nothing once the run has ended."""
        if not self.finished.done():
            self.session.interrupt(error)
            self.loop.call_soon(self.turn)

    def abandon(self) -> None:
        """Ends the run now if it has not ended (see ``ServeSession.finish``)."""
        if not self.finished.done():
            self.end(None)
            # Nobody awaits it any more: retrieve what it holds.
            with contextlib.suppress(BaseException):
                self.finished.result()

    def on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.wake_r.recv(4096):
                pass
        self.turn()

    def watch(self) -> None:
        """Loops without ``add_reader``: forwards each wake-up from a thread,
        until ``end()`` closes the other end."""
        with self.wake_r:
            while True:
                try:
                    if not self.wake_r.recv(4096):
                        return
                    self.loop.call_soon_threadsafe(self.turn)
                except (OSError, RuntimeError):  # a closed socket or loop
                    return

    def turn(self) -> None:
        if self.finished.done():
            return
        if self.next_turn is not None:
            self.next_turn.cancel()
            self.next_turn = None
        try:
            wait = self.session.turn()
        except (KeyboardInterrupt, SystemExit) as error:
            # A signal's exception that landed here rather than in a
            # callback: it stops the run as it would have there.
            self.interrupt(error)
            return
        except BaseException as error:  # a bug in rsepoll: serve() raises it
            self.end(error)
            return
        if wait is None:
            self.end(None)
        elif wait <= 0:
            self.next_turn = self.loop.call_soon(self.turn)
        else:
            # Whole milliseconds, rounded up: uvloop rounds to the nearest
            # millisecond and would wake early, then spin until the deadline.
            self.next_turn = self.loop.call_later(math.ceil(wait * 1000) / 1000, self.turn)

    def end(self, error: BaseException | None) -> None:
        if self.io_fd is not None:
            # Before finish(), which closes the poller.
            self.loop.remove_reader(self.io_fd)
            self.io_fd = None
        try:
            self.session.finish()
        except BaseException as raised:
            if error is None:
                error = raised
            else:
                error.__context__ = raised
        finally:
            # The session is unsendable: let it go here, on the loop's thread,
            # not on the helper thread that may hold this driver last.
            self.session = None
            if self.reading:
                self.loop.remove_reader(self.wake_r)
                self.wake_r.close()
            # Without a reader, this ends the watching thread, which closes
            # its end itself.
            self.wake_w.close()
        if error is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)


@contextlib.contextmanager
def _stop_on_sigterm(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], enabled: bool
) -> Iterator[None]:
    """SIGTERM calls ``stop()`` while the block runs, and the previous handler is
    put back after: through the loop's signal handling where it has one. If
    the loop already handles SIGTERM for the application, it is left alone:
    a loop's handler cannot be read back to be restored."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # no signal handling in this loop: below, as for listen()
        else:
            try:
                yield
            finally:
                loop.remove_signal_handler(signal.SIGTERM)  # back to SIG_DFL
            return
    elif not callable(previous) or _is_loop_wakeup(previous):
        # Ignored on purpose, or the loop's own handler: the application's.
        yield
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _is_loop_wakeup(handler: Callable[..., Any]) -> bool:
    """True for the Python-level stand-in an event loop installs for the
    signals it handles itself (asyncio's and uvloop's)."""
    module = getattr(handler, "__module__", "") or ""
    return module.startswith(("asyncio", "uvloop"))
