"""TCP sockets that share one port with ``SO_REUSEPORT``.

On Linux, every listening socket bound with ``SO_REUSEPORT`` to the same
address (by the same user) gets its own accept queue, and the kernel spreads
incoming connections across them by a hash of each connection's addresses.
:mod:`rsepoll.workers` gives each worker process one such socket.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, NamedTuple

#: Python's form of a socket address: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
SockAddr = tuple[Any, ...]


class Address(NamedTuple):
    """Where to bind: an address family and a socket address."""

    family: socket.AddressFamily
    sockaddr: SockAddr

    @property
    def port(self) -> int:
        return int(self.sockaddr[1])

    def with_port(self, port: int) -> Address:
        """The same address on ``port``."""
        return Address(self.family, (self.sockaddr[0], port, *self.sockaddr[2:]))

    def __str__(self) -> str:
        host = self.sockaddr[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def resolve(host: str, port: int) -> Address:
    """The first address ``host`` resolves to for a listening TCP socket, as
    ``rsepoll.make_listener_socket`` picks it. Raises OSError if there is none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc}") from None
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Address(family, tuple(sockaddr))
    raise OSError(f"host {host!r} has no IPv4 or IPv6 address")


def bind_shared(address: Address, backlog: int | None) -> socket.socket:
    """A TCP socket bound to ``address`` with ``SO_REUSEPORT``, listening with
    ``backlog`` unless it is None.

    A socket that is bound but not listening holds the port (and, for port 0,
    picks it) without getting any connections: the kernel only balances
    across listening sockets. ``SO_REUSEADDR`` is set too, as
    ``make_listener_socket`` does, so that connections of an earlier server
    left in TIME_WAIT do not keep the port busy. An IPv6 wildcard address
    also accepts IPv4 connections. The socket is close-on-exec, as every
    socket Python makes.

    Raises OSError naming the address if it cannot be bound.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if (
            address.family == socket.AF_INET6
            and ipaddress.ip_address(address.sockaddr[0].split("%")[0]).is_unspecified
        ):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address.sockaddr)
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock
