"""What the protections cost and what they hold: a slow reader's memory, a
small client's latency beside a flood, and slowloris clients.

Usage::

    python benchmarks/protection.py [--rounds 5] [--backend epoll|portable] [--json FILE]

Each scenario runs an rsepoll echo server in a subprocess (this script with
``--serve``), so that the server's own peak RSS (``VmHWM``) and CPU can be
read from ``/proc``; the clients run in this process, on loopback, bounded in
bytes and time. Linux only (it reads ``/proc``).

- **slow reader**: a client sends 64 MiB without reading the echoes. The
  server stops reading it once its output queue passes ``write_buffer_high``
  (1 MiB), so the client stalls; then the client reads everything back and
  checks it. Reported: bytes sent before the stall, the server's peak RSS
  above its warmed-up baseline, and whether all 64 MiB came back in order.
- **fairness**: a client floods the server with 64 KiB writes (and drains the
  echoes) while another measures 16-byte round trips. Reported: p50 and p99.
- **slowloris**: 200 clients announce a 1000-byte length-prefixed message
  and trickle a byte every 200 ms, with ``message_timeout=2``; a normal client
  keeps making requests. Reported: the normal client's worst round trip, and
  how long until every trickler was closed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

SLOW_READER_TOTAL = 64 << 20


def serve(framing: str, backend: str, message_timeout: float | None) -> None:
    import rsepoll

    class Echo(rsepoll.Server):
        def on_listen_success(self) -> None:
            print(f"ready {self.port}", flush=True)

        def on_exception_occurred(self, exc: BaseException) -> None:
            pass

    server = Echo(backend=backend, framing=framing, message_timeout=message_timeout)
    listener = rsepoll.make_listener_socket(0, "127.0.0.1")
    server.port = listener.port  # type: ignore[attr-defined]
    server.register_listener_socket(listener)
    listener.close()
    with contextlib.suppress(KeyboardInterrupt):
        server.listen()


class Server:
    """An echo server subprocess."""

    def __init__(self, backend: str, framing: str = "raw", message_timeout: str = "30") -> None:
        argv = [sys.executable, __file__, "--serve", framing, backend, message_timeout]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.split()[1])

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field}")

    def stop(self) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def slow_reader(backend: str) -> dict[str, float]:
    pattern = bytes(range(256)) * 256
    with Server(backend) as server:
        warm = connect(server.port)
        for _ in range(64):  # touch the rings' pages: they are allocated once
            warm.sendall(pattern)
            recv_exactly(warm, len(pattern))
        warm.close()
        time.sleep(0.2)
        baseline = server.status("VmRSS")
        client = connect(server.port)
        client.setblocking(False)
        sent = 0
        last = time.monotonic()
        while sent < SLOW_READER_TOTAL and time.monotonic() - last < 1.0:
            try:
                sent += client.send(pattern[sent % 256 :][: SLOW_READER_TOTAL - sent])
                last = time.monotonic()
            except BlockingIOError:
                time.sleep(0.005)
        stalled_at = sent
        peak = server.status("VmHWM")
        client.setblocking(True)
        client.settimeout(60)

        def rest() -> None:
            offset = stalled_at
            while offset < SLOW_READER_TOTAL:
                piece = pattern[offset % 256 :][: SLOW_READER_TOTAL - offset]
                client.sendall(piece)
                offset += len(piece)

        writer = threading.Thread(target=rest)
        writer.start()
        digest = hashlib.sha256()
        received = 0
        while received < SLOW_READER_TOTAL:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        writer.join(60)
        client.close()
        expected = hashlib.sha256(pattern * (SLOW_READER_TOTAL // len(pattern))).hexdigest()
        return {
            "sent_before_stall_mib": stalled_at / (1 << 20),
            "peak_rss_above_baseline_mib": (peak - baseline) / (1 << 20),
            "all_bytes_back_in_order": float(digest.hexdigest() == expected),
        }


def fairness(backend: str, rounds: int = 500) -> dict[str, float]:
    with Server(backend) as server:
        stop = threading.Event()

        def flood() -> None:
            sock = connect(server.port)
            sock.setblocking(False)
            chunk = b"f" * 65536
            while not stop.is_set():
                with contextlib.suppress(BlockingIOError):
                    sock.send(chunk)
                with contextlib.suppress(BlockingIOError):
                    while sock.recv(1 << 20):
                        pass
            sock.close()

        flooder = threading.Thread(target=flood)
        flooder.start()
        time.sleep(0.3)
        ping = connect(server.port)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            ping.sendall(b"ping-1234567890!")
            recv_exactly(ping, 16)
            samples.append(time.perf_counter() - started)
        ping.close()
        stop.set()
        flooder.join(10)
    samples.sort()
    return {
        "p50_ms": samples[len(samples) // 2] * 1e3,
        "p99_ms": samples[int(len(samples) * 0.99)] * 1e3,
    }


def slowloris(backend: str, tricklers: int = 200) -> dict[str, float]:
    with Server(backend, framing="length", message_timeout="2") as server:
        slow = [connect(server.port) for _ in range(tricklers)]
        for sock in slow:
            sock.sendall(struct.pack(">I", 1000) + b"a")
            sock.setblocking(False)
        normal = connect(server.port)
        request = struct.pack(">I", 5) + b"hello"
        worst = 0.0
        started = time.monotonic()
        closed_at = None
        while time.monotonic() - started < 10 and closed_at is None:
            open_count = 0
            for sock in slow:
                try:
                    sock.send(b"b")
                    if sock.recv(1) == b"":
                        continue
                    open_count += 1
                except BlockingIOError:
                    open_count += 1
                except OSError:
                    continue
            begin = time.perf_counter()
            normal.sendall(request)
            recv_exactly(normal, len(request))
            worst = max(worst, time.perf_counter() - begin)
            if open_count == 0:
                closed_at = time.monotonic() - started
            time.sleep(0.2)
        for sock in slow:
            sock.close()
        normal.close()
    return {
        "normal_worst_round_trip_ms": worst * 1e3,
        "all_tricklers_closed_after_s": closed_at if closed_at is not None else float("nan"),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        framing, backend, timeout = sys.argv[2:5]
        serve(framing, backend, float(timeout))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", choices=["epoll", "portable"], default="epoll")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not os.path.isdir("/proc/self"):
        print("protection.py reads /proc: Linux only", file=sys.stderr)
        return 2
    results: dict[str, list[dict[str, float]]] = {
        "slow_reader": [],
        "fairness": [],
        "slowloris": [],
    }
    for round_index in range(args.rounds):
        results["slow_reader"].append(slow_reader(args.backend))
        results["fairness"].append(fairness(args.backend))
        results["slowloris"].append(slowloris(args.backend))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"backend {args.backend}, {args.rounds} rounds: median (min - max)")
    for scenario, runs in results.items():
        for key in runs[0]:
            values = [run[key] for run in runs]
            print(
                f"  {scenario:12} {key:32} {statistics.median(values):10.2f}"
                f"  ({min(values):.2f} - {max(values):.2f})"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"backend": args.backend, "rounds": args.rounds, **results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
