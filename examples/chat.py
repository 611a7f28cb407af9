"""A line chat room: every line a client sends goes to everyone else.

Shows broadcasting, and what to do about a client that reads slower than the
room talks. ``send_message`` never blocks and never refuses, so what a slow
reader cannot take piles up in its output queue. The server tells us when a
connection's queue rises above ``write_buffer_high`` (``on_writing_paused``)
and when it falls back to ``write_buffer_low`` (``on_writing_resumed``). A
reader that falls behind for a moment (a burst, a slow network) catches up
and resumes; one that stays paused for ``--drop-after`` seconds (2 by
default) is dropped, so that its queue stops growing. A fast reader is never
dropped, and gets every line in order.

Lines to the room read ``user7: hello``; notices start with ``*``.

Try it, in three terminals:

    python examples/chat.py 9000
    nc 127.0.0.1 9000         # * welcome, you are user1
    nc 127.0.0.1 9000         # type here, read it in the other one
"""

from __future__ import annotations

import argparse
import contextlib

import rsepoll


class ChatRoom(rsepoll.Server):
    #: "host:port", for the line on_listen_success prints.
    address = ""

    def __init__(self, drop_after: float, **kwargs) -> None:
        # A chat line is short: 256 KiB queued for one reader is far behind.
        super().__init__(
            framing="line", write_buffer_high=256 * 1024, write_buffer_low=64 * 1024, **kwargs
        )
        self.drop_after = drop_after
        self.members: set[rsepoll.Connection] = set()

    def on_listen_success(self) -> None:
        # Serving now, and SIGTERM stops the server gracefully from here on.
        print(f"chat: listening on {self.address}", flush=True)

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        conn.name = f"user{conn.id}"
        conn.drop_timer = None
        self.send_message(conn, f"* welcome, you are {conn.name}")
        self.broadcast(f"* {conn.name} joined")
        self.members.add(conn)

    def on_message_received(self, conn: rsepoll.Connection, line: bytes) -> None:
        self.broadcast(conn.name.encode() + b": " + line, sender=conn)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        if conn.drop_timer is not None:
            conn.drop_timer.cancel()
        if conn in self.members:  # not dropped already
            self.members.remove(conn)
            self.broadcast(f"* {conn.name} left")

    def broadcast(self, line: bytes | str, sender: rsepoll.Connection | None = None) -> None:
        for member in self.members:
            if member is not sender:
                self.send_message(member, line)

    # Back-pressure: a reader whose queue stays above the high watermark for
    # drop_after seconds is dropped.

    def on_writing_paused(self, conn: rsepoll.Connection) -> None:
        if conn.drop_timer is None:
            conn.drop_timer = self.call_later(self.drop_after, self.drop, conn)

    def on_writing_resumed(self, conn: rsepoll.Connection) -> None:
        if conn.drop_timer is not None:
            conn.drop_timer.cancel()
            conn.drop_timer = None

    def drop(self, conn: rsepoll.Connection) -> None:
        conn.drop_timer = None
        self.members.discard(conn)
        # abort: a graceful close would wait for the queue this reader is not
        # reading; a reset frees it at once.
        self.close_connection(conn, abort=True)
        self.broadcast(f"* {conn.name} was dropped (too slow)")


def main() -> None:
    parser = argparse.ArgumentParser(description="A line chat room.")
    parser.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument(
        "--drop-after",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="drop a reader that stays this long behind (default 2)",
    )
    args = parser.parse_args()

    server = ChatRoom(args.drop_after)
    with rsepoll.make_listener_socket(args.port, args.host) as listener:
        server.register_listener_socket(listener)
        server.address = "{}:{}".format(*listener.address)
    # SIGTERM stops the server gracefully and listen() returns; Ctrl-C stops
    # it the same way, then raises KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


if __name__ == "__main__":
    main()
