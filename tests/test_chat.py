"""The chat server from the seed, ported to rsepoll (line based)."""

from __future__ import annotations

import socket

import pytest
import rsepoll
from conftest import LineReader, connect, running, wait_until

pytestmark = pytest.mark.timeout(30)

PROMPT = b"Enter username: "


class ChatServer(rsepoll.Server):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.usernames = {}  # conn -> name, for users that picked a name
        self.buffers = {}  # conn -> partial line

    def on_connection_opened(self, conn):
        self.buffers[conn] = b""
        self.send_message(conn, PROMPT)

    def on_message_received(self, conn, data):
        buf = self.buffers[conn] + data
        *lines, self.buffers[conn] = buf.split(b"\n")
        for raw in lines:
            msg = raw.decode("utf-8").strip()
            if conn not in self.usernames:
                self.usernames[conn] = msg
                self.broadcast(f"{msg} joined the chat")
            else:
                self.broadcast(f"{self.usernames[conn]}: {msg}")

    def on_connection_closed(self, conn):
        self.buffers.pop(conn, None)
        name = self.usernames.pop(conn, None)
        if name is not None:
            self.broadcast(f"{name} left the chat")

    def broadcast(self, message):
        for conn in list(self.usernames):
            self.send_message(conn, message + "\n")


class User:
    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.lines = LineReader(self.sock)
        assert self.lines.read_exactly(len(PROMPT)) == PROMPT

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def hear(self) -> str:
        return self.lines.readline().decode()

    def close(self) -> None:
        self.sock.close()


def test_chat_three_users():
    with running(ChatServer) as (server, port):
        alice = User(port)
        bob = carol = None
        try:
            alice.say("  alice ")
            assert alice.hear() == "alice joined the chat"

            bob = User(port)
            bob.say("bob")
            assert alice.hear() == "bob joined the chat"
            assert bob.hear() == "bob joined the chat"

            carol = User(port)
            # The name arrives in two pieces: the server reassembles the line.
            carol.sock.sendall(b"car")
            carol.sock.sendall(b"ol\n")
            for u in (alice, bob, carol):
                assert u.hear() == "carol joined the chat"

            alice.say("hello all")
            for u in (alice, bob, carol):
                assert u.hear() == "alice: hello all"

            # Two lines in one send are two messages.
            carol.sock.sendall(b"one\ntwo\n")
            for u in (alice, bob, carol):
                assert u.hear() == "carol: one"
                assert u.hear() == "carol: two"

            assert sorted(server.usernames.values()) == ["alice", "bob", "carol"]

            bob.close()
            bob = None
            assert alice.hear() == "bob left the chat"
            assert carol.hear() == "bob left the chat"

            carol.sock.shutdown(socket.SHUT_WR)
            assert alice.hear() == "carol left the chat"
            assert wait_until(lambda: sorted(server.usernames.values()) == ["alice"])

            alice.say("anyone?")
            assert alice.hear() == "alice: anyone?"
        finally:
            for u in (alice, bob, carol):
                if u is not None:
                    u.close()
        assert wait_until(lambda: server.usernames == {} and server.buffers == {})


def test_the_typed_chat_sample_keeps_names_on_connections():
    """tests/typed_chat.py, which .ci/run checks with mypy --strict, works."""
    from typed_chat import NamedChat

    with running(NamedChat) as (server, port), connect(port) as a, connect(port) as b:
        ra, rb = LineReader(a), LineReader(b)
        assert ra.readline() == rb.readline() == b"name?"
        a.sendall(b"alice\n")
        assert ra.readline() == b"alice joined"
        b.sendall(b"bob\n")
        assert ra.readline() == rb.readline() == b"bob joined"
        a.sendall(b"hi\n")
        assert ra.readline() == rb.readline() == b"alice: hi"
        assert sorted(conn.name for conn in server.members) == ["alice", "bob"]
