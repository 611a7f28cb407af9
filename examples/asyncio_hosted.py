"""An rsepoll server inside an asyncio program, beside an asyncio admin endpoint.

Shows ``await server.serve()``: the server runs in the running event loop,
and its callbacks and timers run on the loop's thread, between the loop's
other work, so they share state with the asyncio tasks without locks. Here:

- the rsepoll server (PORT) echoes every line, and a ``call_later`` timer sends
  every connection a line ``heartbeat N`` each second (``--heartbeat``);
- an ``asyncio.start_server`` endpoint (PORT+1, ``--admin-port``) answers each
  connection with one JSON line: the server's ``stats()`` and the heartbeat
  count, then closes it.

SIGTERM makes ``serve()`` return once the server has stopped; the admin
endpoint then closes and the program exits with status 0.

Try it:

    python examples/asyncio_hosted.py 9000
    nc 127.0.0.1 9000          # type lines; a heartbeat arrives every second
    nc 127.0.0.1 9001          # {"heartbeats": 7, "connections_open": 1, ...}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json

import rsepoll

#: Heartbeats skip a connection with this much output still queued (a client
#: that does not read): pushed data nobody asked for must not pile up.
MAX_PENDING = 64 * 1024


class HeartbeatServer(rsepoll.Server):
    #: "host:port" of the server and of the admin endpoint, for the line
    #: on_listen_success prints.
    address = admin_address = ""

    def __init__(self, interval: float, **kwargs) -> None:
        super().__init__(framing="line", **kwargs)
        self.interval = interval
        self.connections: set[rsepoll.Connection] = set()
        self.heartbeats = 0

    def on_listen_success(self) -> None:
        # Serving now (on the loop's thread), and SIGTERM stops the server
        # gracefully from here on.
        print(
            f"asyncio_hosted: listening on {self.address}, admin on {self.admin_address}",
            flush=True,
        )
        self.call_later(self.interval, self.heartbeat)

    def heartbeat(self) -> None:
        self.heartbeats += 1
        for conn in self.connections:
            if conn.pending_bytes < MAX_PENDING:
                self.send_message(conn, f"heartbeat {self.heartbeats}")
        self.call_later(self.interval, self.heartbeat)

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.connections.add(conn)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.connections.discard(conn)

    def on_message_received(self, conn: rsepoll.Connection, line: bytes) -> None:
        self.send_message(conn, line)


async def report_stats(
    server: HeartbeatServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The admin endpoint: one JSON line, then close."""
    report = {"heartbeats": server.heartbeats, **server.stats()}
    writer.write(json.dumps(report).encode() + b"\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    server = HeartbeatServer(args.heartbeat)
    with rsepoll.make_listener_socket(args.port, args.host) as listener:
        server.register_listener_socket(listener)
        host, port = listener.address
    admin_port = args.admin_port
    if admin_port is None:
        admin_port = port + 1 if args.port else 0
    admin = await asyncio.start_server(
        functools.partial(report_stats, server), args.host, admin_port
    )
    server.address = f"{host}:{port}"
    server.admin_address = "{}:{}".format(*admin.sockets[0].getsockname()[:2])
    async with admin:  # closes the admin endpoint once the server has stopped
        await server.serve()  # until SIGTERM (or Ctrl-C) has stopped the server


def main() -> None:
    parser = argparse.ArgumentParser(description="An rsepoll server under asyncio.")
    parser.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="port of the stats endpoint (default PORT+1, or a free one when PORT is 0)",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=1.0, help="seconds between heartbeats (default 1)"
    )
    args = parser.parse_args()
    # Ctrl-C cancels serve(), which stops the server gracefully; asyncio.run()
    # then raises KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
