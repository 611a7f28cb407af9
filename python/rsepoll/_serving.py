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
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import Server


async def serve(server: Server, timeout: int, handle_signals: bool) -> None:
    """The body of :meth:`rsepoll.Server.serve`."""
    loop = asyncio.get_running_loop()
    wake_r, wake_w = socket.socketpair()
    try:
        wake_w.setblocking(False)
        session = server._serve_session(wake_w.fileno(), timeout)
    except BaseException:
        wake_r.close()
        wake_w.close()
        raise
    driver = _Driver(loop, session, wake_r, wake_w)
    with _stop_on_sigterm(loop, server, handle_signals):
        driver.start()
        try:
            await asyncio.shield(driver.finished)
        except asyncio.CancelledError:
            # Cancelling the task that awaits serve() stops the server as
            # stop_server() does; the cancellation goes on once it has.
            server.stop_server()
            while not driver.finished.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(driver.finished)
            driver.finished.result()
            raise


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

    def start(self) -> None:
        try:
            self.wake_r.setblocking(False)
            self.loop.add_reader(self.wake_r, self.on_readable)
            self.reading = True
        except NotImplementedError:
            self.wake_r.setblocking(True)
            threading.Thread(target=self.watch, name="rsepoll-serve-wake", daemon=True).start()
        self.next_turn = self.loop.call_soon(self.turn)

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
        except BaseException as error:  # a bug: serve() raises it
            self.end(error)
            return
        if wait is None:
            self.end(None)
        elif wait <= 0:
            self.next_turn = self.loop.call_soon(self.turn)
        else:
            self.next_turn = self.loop.call_later(wait, self.turn)

    def end(self, error: BaseException | None) -> None:
        try:
            self.session.finish()
        except BaseException as raised:
            error = error or raised
        finally:
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
    loop: asyncio.AbstractEventLoop, server: Server, enabled: bool
) -> Iterator[None]:
    """SIGTERM calls ``server.stop_server()`` while the block runs; the previous
    handler is put back after."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, server.stop_server)
        through_loop = True
    except (NotImplementedError, RuntimeError, ValueError):
        signal.signal(signal.SIGTERM, lambda signum, frame: server.stop_server())
        through_loop = False
    try:
        yield
    finally:
        if through_loop:
            loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
