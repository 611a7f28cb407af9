"""Connection churn with a long idle timeout: does the server's memory follow
the connections that are open, or every connection it ever had (issue 13,
item 5)?

Usage::

    python benchmarks/churn_memory.py [--connections 100000] [--idle-timeout 3600]
        [--backend epoll|portable] [--io-threads N] [--rsepoll-from DIR]

An rsepoll echo server with ``idle_timeout`` runs in a subprocess (this
script with ``--serve``), so that its RSS can be read from ``/proc``. Client
threads in this process then open connections one after the other, each
making one round trip (so that the server has opened it and armed its idle
timer) and ending with a reset (``SO_LINGER`` 0, so that loopback ports do not
pile up in ``TIME_WAIT``); at most ``--clients`` are open at once. The
server's ``VmRSS`` is read after a warm-up of 2,000 connections and again
after the churn. Linux only (it reads ``/proc``).

``--rsepoll-from DIR`` puts DIR first on the server's ``PYTHONPATH``, to
measure another build of the package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

WARMUP = 2000


def serve(backend: str, idle_timeout: float, io_threads: int) -> None:
    import rsepoll

    class Echo(rsepoll.Server):
        def on_listen_success(self) -> None:
            print(f"ready {self.port} {rsepoll.__file__}", flush=True)

        def on_exception_occurred(self, exc: BaseException) -> None:
            pass

    server = Echo(backend=backend, idle_timeout=idle_timeout, io_threads=io_threads)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.port = listener.port  # type: ignore[attr-defined]
    server.register_listener_socket(listener)
    listener.close()
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


def rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def churn(port: int, count: int, clients: int) -> None:
    """Opens `count` connections, `clients` at a time, each one round trip."""
    remaining = [count]
    lock = threading.Lock()
    errors: list[BaseException] = []
    reset = struct.pack("ii", 1, 0)

    def client() -> None:
        try:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"x")
                    if sock.recv(1) != b"x":
                        raise RuntimeError("no echo")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--idle-timeout", type=float, default=3600.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--backend", default="epoll")
    parser.add_argument("--io-threads", type=int, default=1)
    parser.add_argument("--rsepoll-from", default=None)
    args = parser.parse_args()

    env = dict(os.environ)
    if args.rsepoll_from:
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.abspath(args.rsepoll_from), *filter(None, [env.get("PYTHONPATH")])]
        )
    argv = [
        sys.executable,
        __file__,
        "--serve",
        args.backend,
        str(args.idle_timeout),
        str(args.io_threads),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"server did not start: {line!r}")
        _, port, module = line.split(maxsplit=2)
        print(f"server: {module.strip()} ({args.backend}, io_threads={args.io_threads})")
        churn(int(port), WARMUP, args.clients)
        time.sleep(0.5)
        before = rss(proc.pid)
        started = time.monotonic()
        churn(int(port), args.connections, args.clients)
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        after = rss(proc.pid)
        print(
            f"churned {args.connections} connections in {elapsed:.1f} s "
            f"({args.connections / elapsed:.0f}/s), idle_timeout={args.idle_timeout:g} s"
        )
        print(f"server VmRSS after warm-up: {before / 2**20:.1f} MiB")
        print(f"server VmRSS after churn:   {after / 2**20:.1f} MiB")
        print(f"growth:                     {(after - before) / 2**20:+.1f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
