r"""A tiny Redis: the RESP2 protocol over raw framing, enough for redis-cli and
redis-benchmark.

Shows how to speak a real binary-safe protocol with ``framing="raw"``: each
connection owns an incremental parser that is fed whatever bytes arrive and
yields every command they complete, so a command split across reads waits for
its rest, and many pipelined commands in one read (``redis-benchmark -P 16``)
are all answered with one ``send_message``. Both request forms are parsed:
RESP arrays (``*2\r\n$3\r\nGET\r\n$1\r\nk\r\n``) and inline commands
(``GET k\r\n``, what ``telnet`` and redis-benchmark's ``PING_INLINE`` send).

Commands: PING, ECHO, GET, SET, DEL, INCR, QUIT, and CONFIG GET (which
redis-benchmark asks at start-up: ``save`` and ``appendonly`` are answered as a
server without persistence would). The data lives in one dict; all callbacks
run on one thread, so it needs no lock.

Try it:

    python examples/resp_server.py 6380
    redis-cli -p 6380 set greeting hello        # OK
    redis-cli -p 6380 get greeting             # "hello"
    redis-cli -p 6380 incr visits              # (integer) 1
    redis-benchmark -p 6380 -q -t ping,set,get,incr -n 100000 -P 16
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import rsepoll

#: The longest inline command, and the largest bulk string, a client may send.
MAX_INLINE = 64 * 1024
MAX_BULK = 8 * 1024 * 1024
MAX_ARGS = 1024 * 1024


class ProtocolError(Exception):
    """The client broke RESP; it gets ``-ERR Protocol error: ...`` and is closed."""


class RespParser:
    """Cuts commands (lists of ``bytes``) out of a RESP2 byte stream.

    Incremental: ``feed`` bytes as they come, then iterate ``commands()``;
    a command that is not complete yet stays buffered, and no byte is parsed
    twice except the unfinished line it stopped in.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # the first byte not parsed yet
        self.args: list[bytes] = []  # the array being read
        self.missing = 0  # bulk strings the array still needs
        self.bulk_len = -1  # the length of the bulk string being read, if any

    def feed(self, data: bytes) -> None:
        self.buf += data

    def commands(self) -> Iterator[list[bytes]]:
        while True:
            command = self._next()
            if command is None:
                break
            if command:  # an empty inline line or ``*0`` is no command
                yield command
        del self.buf[: self.pos]  # forget what has been parsed
        self.pos = 0

    def _next(self) -> list[bytes] | None:
        """The next command, [] for an empty one, None if more bytes are needed."""
        buf = self.buf
        while True:
            if self.bulk_len >= 0:  # inside a bulk string: its bytes, then CRLF
                end = self.pos + self.bulk_len
                if len(buf) < end + 2:
                    return None
                if buf[end : end + 2] != b"\r\n":
                    raise ProtocolError("expected CRLF after a bulk string")
                self.args.append(bytes(buf[self.pos : end]))
                self.pos, self.bulk_len = end + 2, -1
                self.missing -= 1
                if self.missing == 0:
                    command, self.args = self.args, []
                    return command
                continue
            eol = buf.find(b"\n", self.pos)
            if eol < 0:
                if len(buf) - self.pos > MAX_INLINE:
                    raise ProtocolError("too big inline request")
                return None
            line = bytes(buf[self.pos : eol]).rstrip(b"\r")
            self.pos = eol + 1
            if self.missing:  # inside an array: a bulk string's header
                if not line.startswith(b"$"):
                    raise ProtocolError(f"expected '$', got {line[:1].decode('latin-1')!r}")
                self.bulk_len = _parse_length(line, 0, MAX_BULK, "invalid bulk length")
            elif line.startswith(b"*"):
                # ``*0`` and ``*-1`` (a null array) are no command.
                self.missing = max(0, _parse_length(line, -1, MAX_ARGS, "invalid multibulk length"))
                if self.missing == 0:
                    return []
            else:
                return line.split()  # an inline command


def _parse_length(line: bytes, low: int, high: int, message: str) -> int:
    try:
        n = int(line[1:])
    except ValueError:
        raise ProtocolError(message) from None
    if not low <= n <= high:
        raise ProtocolError(message)
    return n


# Encoding replies.


def simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def error(text: str) -> bytes:
    return b"-" + text.encode() + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(value: bytes | None) -> bytes:
    if value is None:
        return b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(items: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(bulk(item) for item in items)


OK = simple("OK")
PONG = simple("PONG")
NOT_AN_INTEGER = error("ERR value is not an integer or out of range")

#: What CONFIG GET answers: this server keeps nothing on disk.
CONFIG = {b"save": b"", b"appendonly": b"no"}

#: How many arguments each command takes (after its name): (at least, at most).
ARITY = {
    b"PING": (0, 1),
    b"ECHO": (1, 1),
    b"GET": (1, 1),
    b"SET": (2, 2),
    b"DEL": (1, 1 << 20),
    b"INCR": (1, 1),
    b"CONFIG": (2, 2),
}


class RespServer(rsepoll.Server):
    #: "host:port", for the line on_listen_success prints.
    address = ""

    def __init__(self, **kwargs) -> None:
        super().__init__(framing="raw", **kwargs)
        self.data: dict[bytes, bytes] = {}

    def on_listen_success(self) -> None:
        # Serving now, and SIGTERM stops the server gracefully from here on.
        print(f"resp_server: listening on {self.address}", flush=True)

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        conn.parser = RespParser()

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        conn.parser.feed(data)
        replies = []  # one send for every command this read completed
        closing = False
        try:
            for command in conn.parser.commands():
                if command[0].upper() == b"QUIT":
                    replies.append(OK)
                    closing = True
                    break
                replies.append(self.execute(command))
        except ProtocolError as exc:
            replies.append(error(f"ERR Protocol error: {exc}"))
            closing = True
        if replies:
            self.send_message(conn, b"".join(replies))
        if closing:
            self.close_connection(conn)  # once the replies have gone out

    def execute(self, command: list[bytes]) -> bytes:
        name, args = command[0].upper(), command[1:]
        arity = ARITY.get(name)
        if arity is None:
            shown = command[0].decode("utf-8", "replace")
            return error(f"ERR unknown command '{shown}'")
        if not arity[0] <= len(args) <= arity[1]:
            return error(f"ERR wrong number of arguments for '{name.decode().lower()}' command")
        if name == b"GET":
            return bulk(self.data.get(args[0]))
        if name == b"SET":
            self.data[args[0]] = args[1]
            return OK
        if name == b"INCR":
            try:
                value = int(self.data.get(args[0], b"0")) + 1
            except ValueError:
                return NOT_AN_INTEGER
            if not -(2**63) <= value < 2**63:
                return NOT_AN_INTEGER
            self.data[args[0]] = b"%d" % value
            return integer(value)
        if name == b"DEL":
            return integer(sum(self.data.pop(key, None) is not None for key in args))
        if name == b"PING":
            return bulk(args[0]) if args else PONG
        if name == b"ECHO":
            return bulk(args[0])
        # CONFIG
        if args[0].upper() != b"GET":
            return error("ERR only CONFIG GET <parameter> is supported")
        key = args[1].lower()
        return array([key, CONFIG[key]] if key in CONFIG else [])


def main() -> None:
    parser = argparse.ArgumentParser(description="A Redis-compatible (RESP2) key-value server.")
    parser.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    args = parser.parse_args()

    server = RespServer()
    with rsepoll.make_listener_socket(args.port, args.host) as listener:
        server.register_listener_socket(listener)
        server.address = "{}:{}".format(*listener.address)
    # SIGTERM stops the server gracefully and listen() returns; Ctrl-C stops
    # it the same way, then raises KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


if __name__ == "__main__":
    main()
