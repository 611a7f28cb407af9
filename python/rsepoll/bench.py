"""``python -m rsepoll.bench HOST:PORT``: a TCP load generator.

The load runs in Rust threads (``rsepoll._rsepoll.run_bench``) with the GIL
released, so the client is not the bottleneck and Ctrl-C works. Modes:

- ``rr``: each connection sends ``--size`` bytes and waits for the whole
  reply, one request in flight; every round trip goes into a latency
  histogram.
- ``stream``: every connection writes continuously and reads what comes
  back; MB/s each way.
- ``idle``: open the connections, check each with one round trip, hold them
  for ``--duration``, check each again.

Every reply is checked (``--verify``), and every request is one message in
``--framing``. ``--warmup-until-steady`` goes on warming up until the rate
settles. A run never takes longer than ``--connect-timeout`` + ``--warmup``
(or ``--warmup-max``) + ``--duration`` + 2 s, and ends as soon as every
connection has failed. When every connection's first reply was wrong, the
server is not what ``--verify`` assumes (``python -m rsepoll``'s server
reverses lines: ``--framing line --verify reverse``), and the tool says so in
one line instead of a table of errors. Ctrl-C ends a run early: the report
covers what was measured until then, and the exit status is 130.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any, Callable

from . import __version__, _raise_fd_limit
from ._rsepoll import run_bench

_PROG = "python -m rsepoll.bench"
#: --warmup-until-steady's sample length (s) and number of samples that must
#: agree (crate::bench::steady::Steady::new).
_STEADY_WINDOW = 0.25
_STEADY_WINDOWS = 4
#: Descriptors kept for everything but the connections.
_SPARE_FDS = 64


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Load a TCP echo (or reverse) server and measure it: requests/s, "
        "MB/s, latency percentiles and errors. Every reply must be the request "
        "(--verify echo), unless told otherwise: against python -m rsepoll's server, "
        "which reverses lines, use --framing line --verify reverse. A server whose "
        "first reply on every connection is wrong ends the run at once, with one line "
        "that says so.",
        epilog="Exit status: 0 if every connection ran clean, 1 if any failed or stalled "
        "(or none could connect), 2 for bad arguments, 130 after Ctrl-C (which prints "
        "what was measured until then).",
    )
    parser.add_argument("--version", action="version", version=f"rsepoll {__version__}")
    parser.add_argument("address", metavar="HOST:PORT", help="the server, e.g. 127.0.0.1:9090")
    parser.add_argument(
        "--mode",
        choices=["rr", "stream", "idle"],
        default="rr",
        help="rr: request/response, one in flight per connection (default); stream: "
        "write continuously, read what comes back; idle: hold connections, checked "
        "before and after",
    )
    parser.add_argument("--connections", type=int, default=100, metavar="N", help="default 100")
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        metavar="BYTES",
        help="bytes per request on the wire, framing included (default 1024)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="measured time; idle: how long connections are held (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="unmeasured load before the measured time (rr, stream; default 0); with "
        "--warmup-until-steady, the least warm-up",
    )
    parser.add_argument(
        "--warmup-until-steady",
        action="store_true",
        help="rr, stream: warm up until the rate settles. The rate is sampled every "
        f"{_STEADY_WINDOW} s from the moment every connection is up, and the measured "
        f"time starts at the first sample, at least --warmup in, at which the last "
        f"{_STEADY_WINDOWS} rates are within --steady-tolerance of their mean, or after "
        "--warmup-max if they never are. The report gives the warm-up's length, its "
        "rates, and whether it settled (warmup_s, warmup_rates, warmup_steady)",
    )
    parser.add_argument(
        "--warmup-max",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --warmup-until-steady: the longest warm-up (default 10)",
    )
    parser.add_argument(
        "--steady-tolerance",
        type=float,
        default=5.0,
        metavar="PERCENT",
        help="with --warmup-until-steady: how far apart the last rates may be, "
        "(highest - lowest) / mean (default 5)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="T",
        help="client threads (default: half the CPUs, at least 1)",
    )
    parser.add_argument(
        "--verify",
        choices=["echo", "reverse", "none"],
        default="echo",
        help="echo: a reply must equal its request (default); reverse: the request "
        "with its payload reversed (python -m rsepoll's server); none: only its length",
    )
    parser.add_argument(
        "--framing",
        choices=["raw", "line", "length"],
        default="raw",
        help="raw: SIZE bytes (default); line: SIZE-1 bytes without line ends, then "
        "\\n; length: a 4-byte big-endian length, then SIZE-4 bytes",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="the longest connecting may take, all connections together (default 10)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # For benchmarks/suite.py, which samples the server's CPU time when these
    # lines arrive: "measure-start" and "measure-end" on stderr at the edges of
    # the measured time. Not for users, hence hidden.
    parser.add_argument("--marks", action="store_true", help=argparse.SUPPRESS)
    return parser


class _BadArgument(Exception):
    pass


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise _BadArgument(f"expected HOST:PORT, got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise _BadArgument(f"bad port in {address!r}") from None
    if not 1 <= port <= 65535:
        raise _BadArgument(f"port must be from 1 to 65535, got {port}")
    return host or "127.0.0.1", port


def _resolve(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _BadArgument(f"cannot resolve {host!r}: {exc}") from None
    return str(infos[0][4][0])


def _check(args: argparse.Namespace) -> None:
    for name in ("connections", "size"):
        if getattr(args, name) <= 0:
            raise _BadArgument(f"--{name} must be positive, got {getattr(args, name)}")
    if args.threads < 0:
        raise _BadArgument(f"--threads must not be negative, got {args.threads}")
    for name in ("duration", "connect_timeout"):
        value = getattr(args, name)
        if not value > 0:
            raise _BadArgument(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.warmup >= 0:
        raise _BadArgument(f"--warmup must not be negative, got {args.warmup}")
    if args.warmup_until_steady:
        if not args.warmup_max >= args.warmup:
            raise _BadArgument(
                f"--warmup-max ({args.warmup_max}) must be at least --warmup ({args.warmup})"
            )
        if not args.steady_tolerance >= 0:
            raise _BadArgument(
                f"--steady-tolerance must not be negative, got {args.steady_tolerance}"
            )


def _us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.1f} us"


def _progress_printer() -> Callable[[dict[str, Any]], None]:
    last = {"elapsed": 0.0, "requests": 0}

    def show(p: dict[str, Any]) -> None:
        if p["phase"] != "running":
            line = f"{p['phase']}..."
        else:
            dt = p["elapsed"] - last["elapsed"]
            rate = (p["requests"] - last["requests"]) / dt if dt > 0 else 0.0
            line = (
                f"{p['elapsed']:6.1f} s  {rate:12,.0f} req/s  p99 {_us(p['p99_us'])}  "
                f"errors {p['errors']}"
            )
        last.update(elapsed=p["elapsed"], requests=p["requests"])
        sys.stderr.write(f"\r\033[K{line}")
        sys.stderr.flush()

    return show


def _print_mark(name: str) -> None:
    sys.stderr.write(f"measure-{name}\n")
    sys.stderr.flush()


def format_table(r: dict[str, Any]) -> str:
    """The summary ``python -m rsepoll.bench`` prints for a report ``r``."""
    threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
    host = f"[{r['host']}]" if ":" in r["host"] else r["host"]
    rows = [
        ("target", f"{host}:{r['port']}"),
        ("mode", f"{r['mode']}, {r['framing']} framing, --verify {r['verify']}"),
        (
            "connections",
            f"{r['connections']} ({r['connected']} connected, {r['held']} held to the end), "
            f"{threads}",
        ),
        ("size", f"{r['size']} bytes"),
        ("duration", f"{r['duration_s']:.2f} s measured (connected in {r['connect_s']:.2f} s)"),
        ("warm-up", _warmup_text(r)),
        ("requests/s", f"{r['requests_per_s']:,.1f} ({r['requests']:,} requests)"),
        ("MB/s", f"{r['mb_per_s_out']:,.2f} out, {r['mb_per_s_in']:,.2f} in"),
        (
            "latency",
            f"p50 {_us(r['p50_us'])}   p99 {_us(r['p99_us'])}   p99.9 {_us(r['p999_us'])}   "
            f"max {_us(r['max_us'])}   (mean {_us(r['mean_us'])})",
        ),
        ("errors", f"{r['errors']}" + (f" ({r['stalled']} stalled)" if r["stalled"] else "")),
    ]
    return "\n".join(f"{name:<13}{value}" for name, value in rows)


def _warmup_text(r: dict[str, Any]) -> str:
    text = f"{r['warmup_s']:.2f} s"
    if not r["warmup_until_steady"]:
        return text
    rates = ", ".join(f"{rate:,.0f}" for rate in r["warmup_rates"])
    how = "settled" if r["warmup_steady"] else "did not settle"
    return f"{text}, until steady: {how} (rates per {_STEADY_WINDOW} s window: {rates})"


def _fail(message: str, status: int) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return status


def _wrong_server(report: dict[str, Any]) -> str | None:
    """Why no reply of the run was right, if the server is not what
    ``--verify`` assumes: every connection failed at its first reply, which
    was wrong. None otherwise (the report tells the rest)."""
    wrong = report["wrong_first_replies"]
    if wrong == 0 or wrong != report["connected"]:
        return None
    verify = report["verify"]
    if verify == "echo":
        return (
            "the server does not echo: the first reply on every connection differed "
            "from the request (for python -m rsepoll's server, which reverses lines, "
            "use --framing line --verify reverse)"
        )
    if verify == "reverse":
        return (
            "the server does not reverse: the first reply on every connection was not "
            "the request with its payload reversed (for an echo server, use --verify echo)"
        )
    return "the first reply on every connection was longer than the request"


def _show(report: dict[str, Any], as_json: bool) -> None:
    """Prints the report, then the errors it describes (or why there were
    only errors)."""
    if as_json:
        print(json.dumps(report))
    wrong_server = _wrong_server(report)
    if wrong_server is not None:
        _fail(wrong_server, 1)
        return
    if not as_json:
        print(format_table(report))
    for sample in report["error_samples"]:
        print(f"error: {sample}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        host, port = _split_address(args.address)
        ip = _resolve(host, port)
    except _BadArgument as exc:
        return _fail(str(exc), 2)
    _raise_fd_limit(args.connections + _SPARE_FDS)
    progress = None
    if not args.json and sys.stderr.isatty():
        progress = _progress_printer()
    try:
        report = run_bench(
            ip,
            port,
            mode=args.mode,
            connections=args.connections,
            size=args.size,
            duration=args.duration,
            warmup=args.warmup,
            warmup_until_steady=args.warmup_until_steady,
            warmup_max=args.warmup_max,
            steady_tolerance=args.steady_tolerance / 100,
            threads=args.threads,
            verify=args.verify,
            framing=args.framing,
            connect_timeout=args.connect_timeout,
            progress=progress,
            marks=_print_mark if args.marks else None,
        )
    except ValueError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt as exc:
        print(f"\n{_PROG}: interrupted", file=sys.stderr)
        # What was measured until Ctrl-C, if the run had connected.
        partial: dict[str, Any] | None = getattr(exc, "report", None)
        if partial is not None:
            _show(partial, args.json)
        return 130
    finally:
        if progress is not None:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    _show(report, args.json)
    return 0 if report["errors"] == 0 and report["stalled"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
