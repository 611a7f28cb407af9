r"""The reverse server of ``python -m rsepoll``, in a page.

Shows the smallest useful server: with ``framing="line"`` the Rust core cuts
the byte stream into lines, so each ``on_message_received`` gets one whole line
(without its ``\n`` or ``\r\n``) however TCP chunked it, and ``send_message``
adds the ``\n``. Every line comes back reversed; the line ``exit`` closes the
connection. SIGTERM or Ctrl-C stops the server gracefully.

Try it:

    python examples/reverse.py 9000
    printf 'hello\nworld\nexit\n' | nc 127.0.0.1 9000     # prints olleh, dlrow
"""

from __future__ import annotations

import argparse
import contextlib

import rsepoll


class Reverser(rsepoll.Server):
    #: "host:port", for the line on_listen_success prints.
    address = ""

    def on_listen_success(self) -> None:
        # Serving now, and SIGTERM stops the server gracefully from here on.
        print(f"reverse: listening on {self.address}", flush=True)

    def on_message_received(self, conn: rsepoll.Connection, line: bytes) -> None:
        if line == b"exit":
            self.close_connection(conn)  # after the replies already queued
        else:
            self.send_message(conn, line[::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Reverses every line a client sends.")
    parser.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    args = parser.parse_args()

    server = Reverser(framing="line")
    with rsepoll.make_listener_socket(args.port, args.host) as listener:
        server.register_listener_socket(listener)  # the server keeps a duplicate
        server.address = "{}:{}".format(*listener.address)
    # SIGTERM stops the server gracefully and listen() returns; Ctrl-C stops
    # it the same way, then raises KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


if __name__ == "__main__":
    main()
