"""What ``help()`` shows and what the type stubs promise, against the truth."""

from __future__ import annotations

import inspect
import pydoc
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
import rsepoll
import rsepoll.bench
import rsepoll.workers
from conftest import make_server, start, wait_until

pytestmark = pytest.mark.timeout(30)


def documented(module: ModuleType) -> Iterator[tuple[str, str]]:
    """(name, docstring) of the module and of its public classes, their
    methods and properties, and its functions."""
    yield module.__name__, module.__doc__ or ""
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) not in (
            module.__name__,
            "rsepoll._rsepoll",
            "rsepoll",
        ):
            continue
        yield f"{module.__name__}.{name}", inspect.getdoc(value) or ""
        if inspect.isclass(value):
            for attr, member in vars(value).items():
                if not attr.startswith("_") or attr == "__init__":
                    yield f"{module.__name__}.{name}.{attr}", inspect.getdoc(member) or ""


@pytest.mark.parametrize("module", [rsepoll, rsepoll.bench, rsepoll.workers])
def test_docstrings_hold_no_control_characters(module: ModuleType) -> None:
    """An escape such as ``\\n`` in a docstring that is not raw becomes a real
    line end (or carriage return) in help()."""
    for name, doc in documented(module):
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", doc), (name, doc)


def test_the_framing_paragraph_of_server_reads_as_one() -> None:
    text = pydoc.render_doc(rsepoll.Server, renderer=pydoc.plaintext)
    assert "\r" not in text
    start = text.index("framing: how the byte stream")
    paragraph = text[start : text.index("max_message_size:", start)]
    assert "\n\n" not in paragraph.strip(), paragraph
    words = " ".join(word for word in paragraph.split() if word != "|")  # pydoc's margin
    assert (
        "each call gets one line without its ``\\n`` or ``\\r\\n``, and ``send_message`` "
        "appends ``\\n``."
    ) in words, words


@pytest.mark.skipif(
    sys.platform != "linux",
    reason="Linux hands out a connection reset in the backlog; other systems may drop it",
)
def test_remote_address_is_none_when_the_client_reset_before_the_accept() -> None:
    """As the stub and the docstring say: the system no longer knows the peer."""
    seen: list[tuple[str, object]] = []

    class Watcher(rsepoll.Server):
        def on_connection_opened(self, conn: rsepoll.Connection) -> None:
            seen.append(("opened", conn.remote_address))

        def on_connection_closed(self, conn: rsepoll.Connection) -> None:
            seen.append(("closed", conn.close_reason))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        # Connected, then reset, while nobody accepts.
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        time.sleep(0.05)
        server = make_server(Watcher)
        server.register_listener_socket(listener)
        thread = start(server)
        try:
            assert wait_until(lambda: len(seen) == 2), seen
        finally:
            thread.stop()
    assert seen == [("opened", None), ("closed", "reset")]
