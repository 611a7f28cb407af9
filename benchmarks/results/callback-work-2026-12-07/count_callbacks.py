"""How many callbacks does one request take? An experiment's script, kept with its output.

    python count_callbacks.py [--work-us 20] [--size 65536] [--seconds 2]

For each of rsepoll inline, rsepoll with one I/O thread and uvloop, starts an
echo server that counts its callbacks (``on_message_received``,
``data_received``) and spins ``--work-us`` in each, as ``suite.py
--callback-us`` does, loads it with ``benchmarks/loadgen`` (rr, 10
connections, no warm-up) and prints the callbacks per request. In raw mode a
request may reach the callback in several reads, each of which would pay the
work. Needs rsepoll and uvloop importable, and loadgen built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LOADGEN = ROOT / "benchmarks" / "loadgen" / "target" / "release" / "echo-loadgen"
KINDS = ("rsepoll-inline", "rsepoll-threaded", "uvloop")


def spin(ns: int) -> None:
    deadline = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < deadline:
        pass


def serve(kind: str, work_ns: int) -> None:
    """Echoes until SIGTERM, then prints ``callbacks N``."""
    count = 0
    if kind.startswith("rsepoll"):
        import rsepoll

        class Echo(rsepoll.Server):
            def on_message_received(self, conn: rsepoll.Connection, data: bytes) -> None:
                nonlocal count
                count += 1
                spin(work_ns)
                self.send_message(conn, data)

        server = Echo(io_threads=0 if kind == "rsepoll-inline" else 1)
        listener = rsepoll.make_listener_socket(0, "127.0.0.1")
        server.register_listener_socket(listener)
        server.on_listen_success = lambda: print("ready", listener.port, flush=True)
        listener.close()
        signal.signal(signal.SIGTERM, lambda *_: server.stop_server())
        server.listen()
    else:
        import uvloop

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]

            def data_received(self, data: bytes) -> None:
                nonlocal count
                count += 1
                spin(work_ns)
                self.transport.write(data)

        loop = uvloop.new_event_loop()
        listening = loop.run_until_complete(loop.create_server(Protocol, "127.0.0.1", 0))
        print("ready", listening.sockets[0].getsockname()[1], flush=True)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        loop.run_forever()
    print("callbacks", count, flush=True)


def measure(kind: str, args: argparse.Namespace) -> str:
    argv = [sys.executable, __file__, "--serve", kind, "--work-us", str(args.work_us)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline().split()[1])
    load = [str(LOADGEN), "--port", str(port), "--mode", "rr", "--size", str(args.size)]
    load += ["--connections", "10", "--warmup", "0", "--duration", str(args.seconds)]
    out = subprocess.run(load, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("result "))[7:])
    server.send_signal(signal.SIGTERM)
    callbacks = int(server.stdout.read().split()[-1])
    server.wait()
    # loadgen counts the requests answered in its window; the server counts
    # every callback, those of requests still in flight at the end too.
    return (
        f"{kind:17} size {args.size}, work {args.work_us:g} us: requests {result['requests']}, "
        f"callbacks {callbacks}, per request {callbacks / result['requests']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-us", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, round(args.work_us * 1000))
        return
    for kind in KINDS:
        print(measure(kind, args), flush=True)


if __name__ == "__main__":
    main()
