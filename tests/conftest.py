"""Shared helpers for the rsepoll test suite.

Everything here is loopback-only and bounded in time: client sockets carry a
timeout, loops are bounded by byte counts or deadlines, and the server thread
must end within a few seconds of ``stop_server()``.

Test modules import the helpers with ``from conftest import ...``; the
directory of this file is put on ``sys.path`` so that works under any pytest
import mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rsepoll

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

CLIENT_TIMEOUT = 10.0
JOIN_TIMEOUT = 5.0
READY_TIMEOUT = 10.0


def pytest_configure(config: pytest.Config) -> None:
    # pytest-timeout registers this marker itself; registering it again keeps
    # the suite free of "unknown marker" warnings if the plugin is missing.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit")
    # A shell starts a background job (`cmd &` without job control) with
    # SIGINT ignored, and an ignored signal stays ignored across exec, so the
    # Ctrl-C tests' children would never see their SIGINT. Handled here, it
    # is back to the default in every child this process starts.
    if hasattr(signal, "SIGINT") and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------------------
# Small client-side helpers
# ---------------------------------------------------------------------------


def connect(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = CLIENT_TIMEOUT,
    rcvbuf: int | None = None,
) -> socket.socket:
    """A blocking client socket connected to ``host:port`` with a timeout.

    ``rcvbuf`` sets SO_RCVBUF before connecting, which pins a small TCP
    window: the server then has to keep most of a big reply in its own queue.
    """
    if rcvbuf is None:
        sock = socket.create_connection((host, port), timeout=timeout)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
    sock.settimeout(timeout)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, limit: int = 64 << 20) -> bytes:
    """Read until EOF (at most ``limit`` bytes, more is a failure)."""
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")


def assert_eof(sock: socket.socket) -> None:
    """The peer must have closed the connection (orderly FIN, no data)."""
    data = sock.recv(4096)
    assert data == b"", f"expected EOF, got {data[:200]!r}"


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``pred`` every ``interval`` seconds; True as soon as it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return bool(pred())
        time.sleep(interval)


class LineReader:
    """Reassembles newline-terminated lines from a byte stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"EOF with {bytes(self.buf)!r} buffered")
            self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def readline(self, max_len: int = 1 << 20) -> bytes:
        """One line without its trailing newline."""
        while b"\n" not in self.buf:
            if len(self.buf) > max_len:
                raise AssertionError("line too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"EOF with {bytes(self.buf)!r} buffered")
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def call_in_thread(fn: Callable[[], Any], timeout: float = JOIN_TIMEOUT) -> Any:
    """Run ``fn`` in a daemon thread; return its result or re-raise its exception.

    Used for calls that are expected to return promptly but would hang the
    whole test run (the GIL may be held in native code) if they did not.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True, name="call_in_thread")
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"call did not return within {timeout} s"
    if "exc" in box:
        raise box["exc"]
    return box.get("result")


class Workers:
    """Daemon threads whose exceptions are collected and re-raised on join."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        def target() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                self.errors.append(exc)

        t = threading.Thread(target=target, daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        assert alive == 0, f"{alive} worker thread(s) still running after {timeout} s"
        if self.errors:
            raise self.errors[0]


# ---------------------------------------------------------------------------
# Running a server in a background thread
# ---------------------------------------------------------------------------


class ServerThread:
    """Runs ``server.listen(timeout)`` in a daemon thread and captures the outcome."""

    def __init__(self, server: Any, listen_timeout: int | None = 1000) -> None:
        self.server = server
        self.listen_timeout = listen_timeout
        self.exc: BaseException | None = None
        self.returned = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="rsepoll-listen")

    def _run(self) -> None:
        try:
            if self.listen_timeout is None:
                self.server.listen()
            else:
                self.server.listen(timeout=self.listen_timeout)
            self.returned = True
        except BaseException as exc:
            self.exc = exc

    def start(self) -> ServerThread:
        self.thread.start()
        return self

    @property
    def ident(self) -> int | None:
        return self.thread.ident

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"listen() did not return within {timeout} s"

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """stop_server() (if still running) and assert the thread ended."""
        if self.thread.is_alive():
            self.server.stop_server()
        self.join(timeout)

    def raise_if_failed(self) -> None:
        if self.exc is not None:
            raise self.exc


def instrumented(cls: type) -> type:
    """Subclass ``cls`` so tests can wait for readiness and see callback errors.

    The subclass sets ``self.test_ready`` (an Event) in on_listen_success,
    records the listening thread's ident in ``self.test_listen_ident`` and
    appends every exception passed to on_exception_occurred to
    ``self.test_errors`` before delegating to ``cls``'s implementation.
    """

    class Instrumented(cls):  # type: ignore[valid-type, misc]
        def on_listen_success(self) -> None:
            self.test_listen_ident = threading.get_ident()
            try:
                super().on_listen_success()
            finally:
                self.test_ready.set()

        def on_exception_occurred(self, exc: BaseException) -> None:
            self.test_errors.append(exc)
            super().on_exception_occurred(exc)

    Instrumented.__name__ = cls.__name__
    Instrumented.__qualname__ = cls.__qualname__
    return Instrumented


def make_server(cls: type | None = None, *args: Any, **kwargs: Any) -> Any:
    """Instantiate an instrumented subclass of ``cls`` (default rsepoll.Server)."""
    server = instrumented(cls or rsepoll.Server)(*args, **kwargs)
    server.test_ready = threading.Event()
    server.test_errors = []
    server.test_listen_ident = None
    return server


def start(server: Any, listen_timeout: int | None = 1000) -> ServerThread:
    """Start listen() in a thread and wait for on_listen_success."""
    st = ServerThread(server, listen_timeout).start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not server.test_ready.wait(0.01):
        if not st.is_alive():
            st.raise_if_failed()
            raise AssertionError("listen() returned before on_listen_success")
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                st.stop()
            raise AssertionError("on_listen_success was not called")
    return st


@contextlib.contextmanager
def running(
    server_cls: type | None = None,
    *args: Any,
    host: str = "127.0.0.1",
    listen_timeout: int | None = 1000,
    expect_errors: bool = False,
    **kwargs: Any,
) -> Iterator[tuple[Any, int]]:
    """Run an (instrumented) server on a fresh loopback port.

    Yields ``(server, port)``. The ServerThread is available as
    ``server.test_thread`` and the ListenerSocket as ``server.test_listener``.
    On exit: stop_server(), join (asserting the thread ended within 5 s),
    close the listener, re-raise whatever listen() raised and, unless
    ``expect_errors``, fail if any callback raised.
    """
    server = make_server(server_cls, *args, **kwargs)
    listener = rsepoll.make_listener_socket(0, host)
    try:
        assert server.register_listener_socket(listener) is True
        st = start(server, listen_timeout)
        server.test_thread = st
        server.test_listener = listener
        body_ok = False
        try:
            yield server, listener.port
            body_ok = True
        finally:
            st.stop()
            if body_ok:
                st.raise_if_failed()
                if not expect_errors and server.test_errors:
                    raise AssertionError(
                        f"callback raised: {server.test_errors!r}"
                    ) from server.test_errors[0]
    finally:
        listener.close()


# ---------------------------------------------------------------------------
# Subprocesses (CLI and signal tests)
# ---------------------------------------------------------------------------


def io_thread_names() -> set[str] | None:
    """The names of rsepoll's I/O threads in this process (``rsepoll-io``,
    ``rsepoll-io-N``; not the tests' own ``rsepoll-listen`` and the like,
    which Python 3.14 names in the OS too), from Linux's /proc or Windows'
    thread descriptions; None where threads cannot be listed (macOS, or a
    Windows without ``GetThreadDescription``)."""
    if sys.platform == "win32":
        # First: under Wine, "/proc" is the Linux host's, seen through Z:.
        names = _windows_thread_names()
        if names is None:
            return None
    elif os.path.isdir("/proc/self/task"):
        names = set()
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as comm:
                names.add(comm.read().strip())
    else:
        return None
    return {name for name in names if name.startswith("rsepoll-io")}


def _windows_thread_names() -> set[str] | None:
    """The descriptions of this process's threads (Rust's std names its
    threads with ``SetThreadDescription``), through a Toolhelp snapshot;
    None where that cannot be done."""
    import ctypes
    from ctypes import wintypes

    class ThreadEntry(ctypes.Structure):
        _fields_ = [
            ("dwSize", wintypes.DWORD),
            ("cntUsage", wintypes.DWORD),
            ("th32ThreadID", wintypes.DWORD),
            ("th32OwnerProcessID", wintypes.DWORD),
            ("tpBasePri", wintypes.LONG),
            ("tpDeltaPri", wintypes.LONG),
            ("dwFlags", wintypes.DWORD),
        ]

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    try:
        # Exported by kernel32 from Windows 10 1809 (by KernelBase before).
        get_description = kernel32.GetThreadDescription
    except AttributeError:
        return None
    get_description.argtypes = [wintypes.HANDLE, ctypes.POINTER(ctypes.c_wchar_p)]
    get_description.restype = ctypes.c_long
    kernel32.CreateToolhelp32Snapshot.argtypes = [wintypes.DWORD, wintypes.DWORD]
    kernel32.CreateToolhelp32Snapshot.restype = wintypes.HANDLE
    kernel32.Thread32First.argtypes = [wintypes.HANDLE, ctypes.POINTER(ThreadEntry)]
    kernel32.Thread32Next.argtypes = [wintypes.HANDLE, ctypes.POINTER(ThreadEntry)]
    kernel32.OpenThread.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    kernel32.OpenThread.restype = wintypes.HANDLE
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    kernel32.LocalFree.argtypes = [ctypes.c_void_p]
    snapshot_threads, query_limited_information = 0x4, 0x0800
    snapshot = kernel32.CreateToolhelp32Snapshot(snapshot_threads, 0)
    if snapshot in (None, wintypes.HANDLE(-1).value):
        raise ctypes.WinError(ctypes.get_last_error())
    names = set()
    try:
        entry = ThreadEntry(dwSize=ctypes.sizeof(ThreadEntry))
        more = kernel32.Thread32First(snapshot, ctypes.byref(entry))
        while more:
            if entry.th32OwnerProcessID == os.getpid():
                thread = kernel32.OpenThread(query_limited_information, False, entry.th32ThreadID)
                if thread:
                    description = ctypes.c_wchar_p()
                    if get_description(thread, ctypes.byref(description)) >= 0:
                        if description.value:
                            names.add(description.value)
                        kernel32.LocalFree(description)
                    kernel32.CloseHandle(thread)
            more = kernel32.Thread32Next(snapshot, ctypes.byref(entry))
    finally:
        kernel32.CloseHandle(snapshot)
    return names


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child Pythons: unbuffered, and importing this rsepoll."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rsepoll.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class ChildProcess:
    """A child process whose stdout/stderr are collected by reader threads."""

    def __init__(self, argv: list[str], cwd: str | None = None, **env: str) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=subprocess_env(**env),
            cwd=cwd,
        )
        self._lock = threading.Lock()
        self._out = bytearray()
        self._err = bytearray()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _pump(self, stream: Any, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            with self._lock:
                buf += chunk

    @property
    def stdout(self) -> str:
        with self._lock:
            return self._out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.decode("utf-8", "replace")

    def wait_for_output(
        self, pattern: str, timeout: float = READY_TIMEOUT, stream: str = "both"
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the output."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = {"out": self.stdout, "err": self.stderr}.get(stream)
            if text is None:
                text = self.stdout + "\n" + self.stderr
            m = rx.search(text)
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                # one last look after the readers drained the pipes
                self._join_readers(1.0)
                text = self.stdout + "\n" + self.stderr
                m = rx.search(text)
                if m:
                    return m
                raise AssertionError(
                    f"{pattern!r} not seen (exit status {self.proc.poll()}); "
                    f"stdout={self.stdout[-2000:]!r} stderr={self.stderr[-2000:]!r}"
                )
            time.sleep(0.01)

    def _join_readers(self, timeout: float) -> None:
        for t in self._readers:
            t.join(timeout)

    def wait(self, timeout: float) -> int:
        """Wait for exit (failing the test if it takes longer) and drain output."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"process did not exit within {timeout} s; "
                f"stdout={self.stdout[-2000:]!r} stderr={self.stderr[-2000:]!r}"
            ) from None
        self._join_readers(5.0)
        return rc

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._join_readers(5.0)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


def rsepoll_cli(*args: str, cwd: str | None = None) -> ChildProcess:
    return ChildProcess([sys.executable, "-m", "rsepoll", *args], cwd=cwd)


def parse_listening_port(text: str) -> int:
    """The port from the first line containing 'listening on' and host:port."""
    for line in text.splitlines():
        if "listening on" in line:
            after = line.split("listening on", 1)[1]
            m = re.search(r":(\d{1,5})\b", after)
            if m:
                return int(m.group(1))
    raise AssertionError(f"no 'listening on host:port' line in {text!r}")


def wait_listening(child: ChildProcess, timeout: float = READY_TIMEOUT) -> int:
    child.wait_for_output(r"listening on.*:\d+", timeout)
    return parse_listening_port(child.stdout + "\n" + child.stderr)


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


SIGNALS_OK = hasattr(signal, "SIGINT") and hasattr(signal, "SIGTERM")

#: Why the Ctrl-C tests do not run on Windows.
CTRL_C_ON_WINDOWS = (
    "Ctrl-C on Windows is a console control event (CTRL_C_EVENT) for a process "
    "group sharing a console; under Wine, without a console, GenerateConsoleCtrlEvent "
    "fails (WinError 12), so it is untested"
)


def _under_wine() -> bool:
    if sys.platform != "win32":
        return False
    import ctypes

    return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")


#: Running as a Windows program under Wine rather than on Windows.
UNDER_WINE = _under_wine()

#: Skips a test that must see a TCP reset where Wine cannot show one.
needs_visible_resets = pytest.mark.skipif(
    UNDER_WINE,
    reason="under Wine 8 a Windows program's recv reports a TCP reset as EOF "
    "(checked: a Linux peer's SO_LINGER-0 close reads as b'' in a Wine client); "
    "Windows itself reports WSAECONNRESET",
)
