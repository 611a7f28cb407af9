"""A small chat server, fully typed: ``.ci/run`` checks it with ``mypy
--strict`` against rsepoll's stubs, and ``test_chat.py`` runs it.

Each client's first line is its name, kept on its connection (``conn.name``:
a ``Connection`` carries the application's own attributes); every later line
goes to everyone, after that name.
"""

from __future__ import annotations

import sys

import rsepoll


class NamedChat(rsepoll.Server):
    def __init__(self) -> None:
        super().__init__(framing="line")
        #: The connections that have given their name.
        self.members: set[rsepoll.Connection] = set()

    def on_connection_opened(self, conn: rsepoll.Connection) -> None:
        self.send_message(conn, "name?")

    def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        if conn in self.members:
            self.broadcast(f"{conn.name}: {text}")
            return
        conn.name = text
        self.members.add(conn)
        self.broadcast(f"{conn.name} joined")

    def on_connection_closed(self, conn: rsepoll.Connection) -> None:
        if conn in self.members:
            self.members.discard(conn)
            self.broadcast(f"{conn.name} left")

    def broadcast(self, text: str) -> None:
        for member in self.members:
            self.send_message(member, text)


def main(port: int) -> None:
    server = NamedChat()
    server.register_listener_socket(rsepoll.make_listener_socket(port, "127.0.0.1"))
    server.listen()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9090)
