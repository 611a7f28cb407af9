"""Peak memory of a 64 MiB reply stream to a slow reader, sent as large
`bytes` objects that are lent to the I/O thread (issue 13, item 8).

Usage::

    python benchmarks/lent_reply_memory.py [--total-mib 64] [--chunk-kib 1024]
        [--pace-ms 2] [--backend epoll|portable] [--io-threads N] [--rsepoll-from DIR]

An rsepoll server runs in a subprocess (this script with ``--serve``), so
that its peak RSS (``VmHWM``) can be read from ``/proc``. When a client's
request arrives, the callback hands the reply to a worker thread and waits
for it, as an application that computes replies in a pool does: the worker
sends ``--total-mib`` MiB as fresh ``bytes`` objects of ``--chunk-kib`` KiB
(each at least 4 KiB, so each is lent to the I/O thread rather than copied
into the command ring) and drops each one once sent. Each chunk takes
``--pace-ms`` to compute (a sleep stands in for the work); with 0, the
worker makes chunks faster than the I/O thread copies them into the
connection's queue, so they wait in the command ring, lent, whatever the
server does (see benchmarks/README.md). The client reads slowly
(64 KiB every 5 ms), so nearly all of the reply waits in the connection's
output queue: that copy is the memory the reply must cost. Reported: the
server's peak RSS above its baseline, next to the reply's size; every byte is
checked. Linux only (it reads ``/proc``).

``--rsepoll-from DIR`` puts DIR first on the server's ``PYTHONPATH``, to
measure another build of the package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time


def chunk(index: int, size: int) -> bytes:
    # Written byte by byte (not calloc'ed zeros), so its pages count in RSS.
    return bytes([index % 251]) * size


def serve(backend: str, io_threads: int, total: int, size: int, pace: float) -> None:
    import rsepoll

    class Replier(rsepoll.Server):
        def on_listen_success(self) -> None:
            print(f"ready {self.port} {rsepoll.__file__}", flush=True)

        def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
            def reply() -> None:
                for index in range(total // size):
                    if pace:
                        time.sleep(pace)
                    self.send_message(conn, chunk(index, size))

            worker = threading.Thread(target=reply)
            worker.start()
            worker.join()

    server = Replier(backend=backend, io_threads=io_threads)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.port = listener.port  # type: ignore[attr-defined]
    server.register_listener_socket(listener)
    listener.close()
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        backend, io_threads, total, size, pace = sys.argv[2:7]
        serve(backend, int(io_threads), int(total), int(size), float(pace))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mib", type=int, default=64)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--pace-ms", type=float, default=2.0)
    parser.add_argument("--backend", default="epoll")
    parser.add_argument("--io-threads", type=int, default=1)
    parser.add_argument("--rsepoll-from", default=None)
    args = parser.parse_args()
    total, size = args.total_mib << 20, args.chunk_kib << 10
    if size < 4096 or total % size:
        parser.error("--chunk-kib must be at least 4 and divide the total")

    env = dict(os.environ)
    if args.rsepoll_from:
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.abspath(args.rsepoll_from), *filter(None, [env.get("PYTHONPATH")])]
        )
    argv = [sys.executable, __file__, "--serve", args.backend, str(args.io_threads)]
    argv += [str(total), str(size), str(args.pace_ms / 1000)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"server did not start: {line!r}")
        _, port, module = line.split(maxsplit=2)
        print(f"server: {module.strip()} ({args.backend}, io_threads={args.io_threads})")
        time.sleep(0.5)
        baseline = status(proc.pid, "VmRSS")
        started = time.monotonic()
        received = 0
        with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            sock.sendall(b"go")
            expected = b""
            while received < total:
                data = sock.recv(64 << 10)
                if not data:
                    raise RuntimeError(f"the reply ended after {received} bytes")
                # Check every byte against the chunk it belongs to.
                offset = 0
                while offset < len(data):
                    index, within = divmod(received + offset, size)
                    if not within or not expected:
                        expected = chunk(index, size)
                    n = min(len(data) - offset, size - within)
                    if data[offset : offset + n] != expected[within : within + n]:
                        raise RuntimeError(f"wrong bytes at offset {received + offset}")
                    offset += n
                received += len(data)
                time.sleep(0.005)
        elapsed = time.monotonic() - started
        peak = status(proc.pid, "VmHWM")
        print(
            f"{total >> 20} MiB reply in {size >> 10} KiB bytes objects, one per "
            f"{args.pace_ms:g} ms, read slowly in {elapsed:.1f} s, every byte checked"
        )
        print(f"server VmRSS before:        {baseline / 2**20:.1f} MiB")
        print(f"server VmHWM (peak):        {peak / 2**20:.1f} MiB")
        print(f"peak above baseline:        {(peak - baseline) / 2**20:+.1f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
