r"""HTTP/1.1 "Hello, World!" with keep-alive, for curl, wrk and ab.

Shows incremental request parsing over ``framing="raw"``: each connection
buffers what arrives until a request's head is complete (up to the blank line,
``\r\n\r\n``), answers every complete request in the buffer (pipelined
requests get their responses in order, in one ``send_message``), and keeps the
rest for the next read. Persistence follows RFC 9112: an HTTP/1.1 connection
stays open unless the request says ``Connection: close``; an HTTP/1.0 one
closes after the response unless it asked for ``Connection: keep-alive``
(what ``ab -k`` sends). A request body announced by ``Content-Length`` is
skipped. Every path answers ``Hello, World!``.

Try it:

    python examples/http_hello.py 8080
    curl -v http://127.0.0.1:8080/ http://127.0.0.1:8080/again    # one connection
    wrk -t1 -c50 -d5s http://127.0.0.1:8080/
    ab -k -n 100000 -c 50 http://127.0.0.1:8080/
"""

from __future__ import annotations

import argparse
import contextlib
import time
from email.utils import formatdate

import rsepoll

BODY = b"Hello, World!"
#: The largest request head (request line and headers) a client may send.
MAX_HEAD = 16 * 1024


class HttpServer(rsepoll.Server):
    #: "host:port", for the line on_listen_success prints.
    address = ""

    def __init__(self, **kwargs) -> None:
        super().__init__(framing="raw", **kwargs)
        self.date_second = 0
        self.date = b""

    def on_listen_success(self) -> None:
        # Serving now, and SIGTERM stops the server gracefully from here on.
        print(f"http_hello: listening on http://{self.address}/", flush=True)

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        conn.buffer = bytearray()
        conn.skip = 0  # bytes of a request body still to be skipped
        conn.closing = False

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        if conn.closing:
            return  # input after a response that closes the connection
        if conn.skip:
            skipped = min(conn.skip, len(data))
            conn.skip -= skipped
            data = data[skipped:]
        buffer = conn.buffer
        buffer += data
        responses = []
        start = 0
        while not conn.closing and not conn.skip:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buffer) - start > MAX_HEAD:
                    responses.append(self.error(conn, b"431 Request Header Fields Too Large"))
                break
            responses.append(self.respond(conn, bytes(buffer[start:end])))
            start = end + 4
            if conn.skip:  # the body follows the head: skip what is here
                skipped = min(conn.skip, len(buffer) - start)
                conn.skip -= skipped
                start += skipped
        del buffer[:start]
        if responses:
            self.send_message(conn, b"".join(responses))
        if conn.closing:
            self.close_connection(conn)  # once the responses have gone out

    def respond(self, conn: rsepoll.Connection, head: bytes) -> bytes:
        """The response to one request, whose head (without the blank line) is ``head``."""
        request_line, *header_lines = head.split(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3:
            return self.error(conn, b"400 Bad Request")
        method, _target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            return self.error(conn, b"505 HTTP Version Not Supported")
        headers = {}
        for line in header_lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return self.error(conn, b"400 Bad Request")
            headers[name.lower()] = value.strip()
        if b"transfer-encoding" in headers:
            return self.error(conn, b"501 Not Implemented")  # no chunked bodies here
        try:
            conn.skip = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return self.error(conn, b"400 Bad Request")
        if conn.skip < 0:
            return self.error(conn, b"400 Bad Request")

        tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        # HTTP/1.1 keeps the connection unless told to close it; HTTP/1.0 closes
        # it unless told to keep it.
        keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        conn.closing = not keep_alive
        if method not in (b"GET", b"HEAD"):
            status, body, extra = b"405 Method Not Allowed", b"", b"Allow: GET, HEAD\r\n"
        else:
            status, body, extra = b"200 OK", BODY, b"Content-Type: text/plain\r\n"
        if version == b"HTTP/1.0" and keep_alive:
            extra += b"Connection: keep-alive\r\n"
        elif not keep_alive:
            extra += b"Connection: close\r\n"
        response = b"HTTP/1.1 %s\r\nDate: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            self.http_date(),
            len(body),
            extra,
        )
        return response if method == b"HEAD" else response + body

    def error(self, conn: rsepoll.Connection, status: bytes) -> bytes:
        """A response that ends the connection: what follows cannot be trusted."""
        conn.closing = True
        return b"HTTP/1.1 %s\r\nDate: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (
            status,
            self.http_date(),
        )

    def http_date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if now != self.date_second:
            self.date_second = now
            self.date = formatdate(now, usegmt=True).encode()
        return self.date


def main() -> None:
    parser = argparse.ArgumentParser(description="HTTP/1.1 Hello, World! with keep-alive.")
    parser.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    args = parser.parse_args()

    server = HttpServer()
    with rsepoll.make_listener_socket(args.port, args.host) as listener:
        server.register_listener_socket(listener)
        server.address = "{}:{}".format(*listener.address)
    # SIGTERM stops the server gracefully and listen() returns; Ctrl-C stops
    # it the same way, then raises KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


if __name__ == "__main__":
    main()
