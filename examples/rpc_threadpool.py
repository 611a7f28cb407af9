r"""Requests answered from a thread pool, and a stop that finishes them first.

Shows blocking work kept off the listening thread: each request goes to a
``concurrent.futures.ThreadPoolExecutor``, and the worker thread sends the
reply itself (``send_message`` is thread-safe). Replies come back in the order
they finish, so each carries its request's id.

The protocol, with ``framing="length"`` (each message: a 4-byte big-endian
length, then that many bytes): a request is a 4-byte id chosen by the client,
then a method.

- ``ping``: answered ``pong`` at once, on the listening thread;
- ``hash DATA``: answered with the SHA-256 of DATA in hex, by a worker, after
  ``--work-time`` seconds (0.1 by default) of blocking work: a ``time.sleep``
  that stands in for a database query or a call to another service.

A reply is the request's id, then the answer (``error ...`` for a request the
server does not understand).

SIGTERM stops the server gracefully without cutting work in flight:
``stop_server(close_connections=False)`` stops accepting new connections and
calls ``on_stopping()``; the open connections are still served, and the
server closes each one once the replies to its requests have been sent. The
server stops when the last one has closed.

Try it (two requests, ids 1 and 2: the pong overtakes the hash):

    python examples/rpc_threadpool.py 9000
    printf '\0\0\0\x0b\0\0\0\x01hash hi\0\0\0\x08\0\0\0\x02ping' |
        nc -q1 127.0.0.1 9000 | od -c
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import rsepoll


class RpcServer(rsepoll.Server):
    #: "host:port", for the line on_listen_success prints.
    address = ""

    def __init__(self, pool: ThreadPoolExecutor, work_time: float, **kwargs) -> None:
        super().__init__(framing="length", **kwargs)
        self.pool = pool
        self.work_time = work_time
        self.connections: set[rsepoll.Connection] = set()
        self.stopping = False

    def on_listen_success(self) -> None:
        # Serving now, and SIGTERM stops the server gracefully from here on.
        print(f"rpc_threadpool: listening on {self.address}", flush=True)

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        conn.in_flight = 0  # requests handed to the pool, not yet answered
        conn.eof = False
        self.connections.add(conn)

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        self.connections.discard(conn)

    def on_message_received(self, conn: rsepoll.Connection, request: bytes) -> None:
        request_id, method = request[:4], request[4:]
        if method == b"ping":
            self.send_message(conn, request_id + b"pong")
        elif method.startswith(b"hash "):
            conn.in_flight += 1
            self.pool.submit(self.compute_hash, conn, request_id, method[5:])
        else:
            self.send_message(conn, request_id + b"error unknown method")

    def compute_hash(self, conn: rsepoll.Connection, request_id: bytes, data: bytes) -> None:
        """Runs on a worker thread."""
        time.sleep(self.work_time)  # the blocking part of the work
        self.send_message(conn, request_id + hashlib.sha256(data).hexdigest().encode())
        # The bookkeeping stays on the listening thread, so it needs no lock.
        self.call_soon_threadsafe(self.answered, conn)

    def answered(self, conn: rsepoll.Connection) -> None:
        conn.in_flight -= 1
        self.close_when_done(conn)

    def on_eof_received(self, conn: rsepoll.Connection) -> None:
        # The client sent its last request: close once it has every reply
        # (the default would close at once, refusing the replies still due).
        conn.eof = True
        self.close_when_done(conn)

    def on_stopping(self) -> None:
        # stop_server(close_connections=False): no new connections; close
        # each open one once its requests are answered.
        in_flight = sum(conn.in_flight for conn in self.connections)
        print(
            f"rpc_threadpool: stopping; {in_flight} requests in flight "
            f"on {len(self.connections)} connections",
            flush=True,
        )
        self.stopping = True
        for conn in list(self.connections):
            self.close_when_done(conn)

    def close_when_done(self, conn: rsepoll.Connection) -> None:
        if conn.in_flight == 0 and (conn.eof or self.stopping):
            self.close_connection(conn)  # after the replies already queued


def main() -> None:
    parser = argparse.ArgumentParser(description="Requests answered from a thread pool.")
    parser.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    parser.add_argument(
        "--work-time",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="how long each hash request blocks its worker (default 0.1)",
    )
    args = parser.parse_args()

    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        server = RpcServer(pool, args.work_time)
        with rsepoll.make_listener_socket(args.port, args.host) as listener:
            server.register_listener_socket(listener)
            server.address = "{}:{}".format(*listener.address)

        # SIGTERM: stop once the work in flight is answered (at most 60 s).
        def stop(signum: int, frame: object) -> None:
            server.stop_server(60.0, close_connections=False)

        signal.signal(signal.SIGTERM, stop)
        # Ctrl-C stops at once as stop_server() does (closing the
        # connections), then raises KeyboardInterrupt.
        with contextlib.suppress(KeyboardInterrupt):
            server.listen(handle_signals=False)


if __name__ == "__main__":
    main()
