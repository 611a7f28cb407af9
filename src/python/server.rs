//! `ServerCore`, the base class of `rsepoll.Server`, and the loop `listen()`
//! runs on the calling thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyMemoryView, PyString, PyTuple};
use socket2::Socket;

use super::connection::Connection;
use super::listener::ListenerSocket;
use crate::conn::CloseReason;
use crate::core::{Config, Request, Running, SendError, Sender, WeakSender, DEFAULT_STOP_TIMEOUT};
use crate::framing::{self, Framing, PrefixWidth};
use crate::message::{Delivery, DeliveryKind};
use crate::stats::Snapshot;
use crate::sys::Backend;

/// Longest the listening thread waits with the GIL released before it checks
/// for signals (Ctrl-C) and stop requests.
const SIGNAL_SLICE: Duration = Duration::from_millis(50);
/// Deliveries dispatched per batch before signals are checked again.
const DISPATCH_BATCH: usize = 256;
/// Deliveries dispatched before their slots go back to the I/O thread.
const RELEASE_BATCH: usize = 32;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

// `stop_server`'s signature spells its default as the literal 5.0.
const _: () =
    assert!(DEFAULT_STOP_TIMEOUT.as_secs() == 5 && DEFAULT_STOP_TIMEOUT.subsec_nanos() == 0);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The engine of `rsepoll.Server`; subclass `rsepoll.Server`, not this.
#[pyclass(subclass, frozen, module = "rsepoll._rsepoll", name = "ServerCore")]
pub struct ServerCore {
    id: u64,
    config: Mutex<Config>,
    /// Listening sockets registered for the next `listen()`.
    listeners: Mutex<Vec<Socket>>,
    /// A `listen()` is running.
    running: AtomicBool,
    /// `stop_server()` was called and the running `listen()` has not ended yet.
    stop_requested: AtomicBool,
    /// The running server's command handle, for `stop_server()`.
    current: Mutex<Option<Sender>>,
    /// The timeout of the first `stop_server()` since the last run.
    stop_timeout: Mutex<Duration>,
    /// The counters as the last run left them.
    last_stats: Mutex<Snapshot>,
}

#[pymethods]
impl ServerCore {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyAny>>) -> Self {
        ServerCore {
            id: NEXT_SERVER_ID.fetch_add(1, Relaxed),
            config: Mutex::new(Config::default()),
            listeners: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            current: Mutex::new(None),
            stop_timeout: Mutex::new(DEFAULT_STOP_TIMEOUT),
            last_stats: Mutex::new(Snapshot::default()),
        }
    }

    /// Sets the engine's options; see `rsepoll.Server.__init__`.
    #[pyo3(signature = (
        backend = None,
        ring_slots = None,
        slot_size = None,
        write_buffer_high = None,
        write_buffer_low = None,
        framing = None,
        max_message_size = None,
        length_prefix = None,
        idle_timeout = None,
        message_timeout = None,
        max_connections = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn _configure(
        &self,
        backend: Option<&str>,
        ring_slots: Option<usize>,
        slot_size: Option<usize>,
        write_buffer_high: Option<usize>,
        write_buffer_low: Option<usize>,
        framing: Option<&str>,
        max_message_size: Option<usize>,
        length_prefix: Option<usize>,
        idle_timeout: Option<f64>,
        message_timeout: Option<f64>,
        max_connections: Option<usize>,
    ) -> PyResult<()> {
        let mut config = lock(&self.config).clone();
        if let Some(name) = backend {
            config.backend = Backend::from_name(name).map_err(PyValueError::new_err)?;
        }
        config.ring_slots = ring_slots.unwrap_or(config.ring_slots);
        config.slot_size = slot_size.unwrap_or(config.slot_size);
        config.write_buffer_high = write_buffer_high.unwrap_or(config.write_buffer_high);
        config.write_buffer_low = write_buffer_low.unwrap_or(config.write_buffer_low);
        config.max_message_size = max_message_size.unwrap_or(config.max_message_size);
        config.max_connections = max_connections.unwrap_or(config.max_connections);
        // Unlike the options above, None here means no timeout.
        config.idle_timeout = idle_timeout
            .map(|t| seconds("idle_timeout", t))
            .transpose()?;
        config.message_timeout = message_timeout
            .map(|t| seconds("message_timeout", t))
            .transpose()?;
        let width = match length_prefix {
            None => PrefixWidth::Four,
            Some(bytes) => PrefixWidth::from_bytes(bytes).ok_or_else(|| {
                PyValueError::new_err(format!("length_prefix must be 4 or 8, got {bytes}"))
            })?,
        };
        config.framing = match framing {
            None => config.framing,
            Some("raw") => Framing::Raw,
            Some("line") => Framing::Line,
            Some("length") => Framing::Length(width),
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "unknown framing {other:?}: expected 'raw', 'line' or 'length'"
                )))
            }
        };
        config.validate().map_err(PyValueError::new_err)?;
        *lock(&self.config) = config;
        Ok(())
    }

    /// How messages are cut and framed: `"raw"`, `"line"` or `"length"`.
    #[getter]
    fn framing(&self) -> &'static str {
        match lock(&self.config).framing {
            Framing::Raw => "raw",
            Framing::Line => "line",
            Framing::Length(_) => "length",
        }
    }

    /// The readiness backend: `"epoll"` or `"portable"`.
    #[getter]
    fn backend(&self) -> &'static str {
        lock(&self.config).backend.name()
    }

    /// The server's counters: a dict of `connections_open`,
    /// `connections_accepted`, `connections_closed`, `connections_rejected`,
    /// `bytes_received`, `bytes_sent`, `messages_received`, `messages_sent`,
    /// `ring_high_water`, and `closes` (a dict of close reason to count).
    /// While `listen()` runs, they are at most one I/O turn old; after, they
    /// are the last run's. Cheap, and safe from any thread.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = match lock(&self.current).as_ref() {
            Some(sender) => sender.stats(),
            None => *lock(&self.last_stats),
        };
        let counters = &snapshot.counters;
        let dict = PyDict::new(py);
        dict.set_item("connections_open", snapshot.connections_open())?;
        dict.set_item("connections_accepted", counters.connections_accepted)?;
        dict.set_item("connections_closed", counters.connections_closed)?;
        dict.set_item("connections_rejected", counters.connections_rejected)?;
        dict.set_item("bytes_received", counters.bytes_received)?;
        dict.set_item("bytes_sent", counters.bytes_sent)?;
        dict.set_item("messages_received", counters.messages_received)?;
        dict.set_item("messages_sent", snapshot.messages_sent)?;
        dict.set_item("ring_high_water", counters.ring_high_water)?;
        let closes = PyDict::new(py);
        for (reason, count) in snapshot.closes() {
            closes.set_item(reason, count)?;
        }
        dict.set_item("closes", closes)?;
        Ok(dict)
    }

    /// True while `listen()` runs.
    #[getter]
    fn is_running(&self) -> bool {
        self.running.load(SeqCst)
    }

    /// Registers a duplicate of `listener` for the next `listen()`.
    fn _add_listener(&self, listener: &ListenerSocket) -> PyResult<()> {
        self.check_not_running("register a listener")?;
        let socket = listener.duplicate()?;
        lock(&self.listeners).push(socket);
        Ok(())
    }

    /// Registers a duplicate of the listening socket with file descriptor `fd`
    /// (validated by the Python caller).
    fn _add_listener_fd(&self, fd: i64) -> PyResult<()> {
        self.check_not_running("register a listener")?;
        let socket = duplicate_fd(fd)?;
        lock(&self.listeners).push(socket);
        Ok(())
    }

    /// Serves the registered listeners on this thread until `stop_server()`,
    /// Ctrl-C, or a `KeyboardInterrupt`/`SystemExit` from a callback.
    #[pyo3(signature = (timeout = 1000))]
    fn listen(slf: &Bound<'_, Self>, timeout: i64) -> PyResult<()> {
        let this = slf.get();
        if timeout <= 0 {
            return Err(PyValueError::new_err(format!(
                "timeout must be a positive number of milliseconds, got {timeout}"
            )));
        }
        if this.running.swap(true, SeqCst) {
            return Err(PyRuntimeError::new_err("listen() is already running"));
        }
        let _running = RunningGuard(this);
        let listeners = std::mem::take(&mut *lock(&this.listeners));
        if listeners.is_empty() {
            return Err(PyRuntimeError::new_err(
                "no listener registered: call register_listener_socket() before listen()",
            ));
        }
        let config = lock(&this.config).clone();
        log::debug!(
            "serving {} listener(s) with the {} backend",
            listeners.len(),
            config.backend.name()
        );
        let running = Running::start(&config, listeners)?;
        *lock(&this.current) = Some(running.sender());
        Dispatcher::new(slf, running, Duration::from_millis(timeout as u64))?.run()
    }

    /// Queues `data` (bytes-like, or `str` sent as UTF-8) for `conn`. Returns
    /// False, sending nothing, if `conn` has closed or is closing.
    fn send_message(
        &self,
        py: Python<'_>,
        conn: &Bound<'_, Connection>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let conn = self.own_connection(conn)?;
        let payload = Payload::extract(data)?;
        if !conn.accepts_sends() {
            return Ok(false);
        }
        let bytes = payload.as_bytes();
        if conn.framing == Framing::Raw {
            if bytes.is_empty() {
                return Ok(true);
            }
            return Ok(queue(py, conn, Request::Send(bytes)));
        }
        // A framed message is never empty on the wire: an empty line, or a
        // zero length.
        let envelope = framing::envelope(conn.framing, bytes.len())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(queue(py, conn, Request::SendFramed(&envelope, bytes)))
    }

    /// Closes `conn` once what is queued for it has been sent (FIN), or at
    /// once with a reset if `abort`, dropping what is queued. Returns False if
    /// it had already closed, or (without `abort`) was already closing.
    #[pyo3(signature = (conn, abort = false))]
    fn close_connection(
        &self,
        py: Python<'_>,
        conn: &Bound<'_, Connection>,
        abort: bool,
    ) -> PyResult<bool> {
        let conn = self.own_connection(conn)?;
        if !conn.open.load(Relaxed) {
            return Ok(false);
        }
        let request = if abort {
            Request::Abort
        } else {
            Request::Close
        };
        Ok(queue(py, conn, request))
    }

    /// Stops reading `conn` until `resume_reading(conn)`: TCP then slows the
    /// client. Returns False if `conn` has closed.
    fn pause_reading(&self, py: Python<'_>, conn: &Bound<'_, Connection>) -> PyResult<bool> {
        let conn = self.own_connection(conn)?;
        Ok(conn.open.load(Relaxed) && queue(py, conn, Request::PauseReading))
    }

    /// Reads `conn` again after `pause_reading(conn)`. Returns False if `conn`
    /// has closed.
    fn resume_reading(&self, py: Python<'_>, conn: &Bound<'_, Connection>) -> PyResult<bool> {
        let conn = self.own_connection(conn)?;
        Ok(conn.open.load(Relaxed) && queue(py, conn, Request::ResumeReading))
    }

    /// Stops `listen()`: no new connections, input already read is still
    /// handled, queued output gets up to `timeout` seconds to go out; then
    /// connections still holding output are reset. Every connection is
    /// reported closed, then `on_shutdown_success` runs and `listen()`
    /// returns. Safe from any thread and from signal handlers; before
    /// `listen()`, it makes the next one return at once.
    // The literal keeps the default visible to `inspect` (and stubtest); it is
    // DEFAULT_STOP_TIMEOUT, as a compile-time assertion at the top checks.
    #[pyo3(signature = (timeout = 5.0))]
    fn stop_server(&self, timeout: f64) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
            PyValueError::new_err(format!(
                "timeout must be a non-negative number of seconds, got {timeout}"
            ))
        })?;
        if !self.stop_requested.swap(true, SeqCst) {
            *lock(&self.stop_timeout) = timeout;
        }
        if let Some(sender) = lock(&self.current).as_ref() {
            sender.stop(*lock(&self.stop_timeout));
        }
        Ok(())
    }
}

impl ServerCore {
    fn check_not_running(&self, what: &str) -> PyResult<()> {
        if self.running.load(SeqCst) {
            Err(PyRuntimeError::new_err(format!(
                "cannot {what} while listen() runs"
            )))
        } else {
            Ok(())
        }
    }

    fn own_connection<'a>(&self, conn: &'a Bound<'_, Connection>) -> PyResult<&'a Connection> {
        let conn = conn.get();
        if conn.server_id != self.id {
            return Err(PyValueError::new_err(
                "this connection belongs to another server",
            ));
        }
        Ok(conn)
    }
}

/// A positive number of seconds as a `Duration`.
fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{name} must be a positive number of seconds or None, got {value}"
            ))
        })
}

/// Resets the server's run state however `listen()` ends.
struct RunningGuard<'a>(&'a ServerCore);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Some(sender) = lock(&self.0.current).take() {
            *lock(&self.0.last_stats) = sender.stats();
        }
        *lock(&self.0.stop_timeout) = DEFAULT_STOP_TIMEOUT;
        self.0.stop_requested.store(false, SeqCst);
        self.0.running.store(false, SeqCst);
    }
}

/// Queues `request` for `conn`: first without waiting, holding the GIL; if
/// that cannot be done at once (another thread is sending, or the ring is
/// full), again with the GIL released, so that waiting never blocks other
/// Python threads and can never deadlock with a thread that holds the ring's
/// lock. Returns whether it was queued: not once the connection's close was
/// requested (see `Sender::request`), nor once the server has stopped.
fn queue(py: Python<'_>, conn: &Connection, request: Request<'_>) -> bool {
    let Some(sender) = conn.sender() else {
        return false;
    };
    let push = |wait| sender.request(conn.key, request, Some(&conn.closing), wait);
    // Counted before it is queued: the I/O thread subtracts once it is written.
    let sending = match request {
        Request::Send(bytes) => bytes.len(),
        Request::SendFramed(envelope, payload) => envelope.overhead() + payload.len(),
        _ => 0,
    };
    conn.opened.pending.add(sending);
    let queued = match push(false) {
        Ok(()) => true,
        Err(SendError::Stopped | SendError::Closing) => false,
        Err(SendError::WouldBlock) => py.detach(|| push(true).is_ok()),
    };
    if !queued {
        conn.opened.pending.sub(sending);
    }
    queued
}

/// The bytes of a `send_message` argument: borrowed from `bytes` and `str`
/// (immutable, so safe to read with the GIL released), copied from other
/// buffers (a `bytearray` may change under us).
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl<'a> Payload<'a> {
    fn extract(data: &'a Bound<'_, PyAny>) -> PyResult<Payload<'a>> {
        if let Ok(bytes) = data.cast::<PyBytes>() {
            return Ok(Payload::Borrowed(bytes.as_bytes()));
        }
        if let Ok(text) = data.cast::<PyString>() {
            return Ok(Payload::Borrowed(text.to_str()?.as_bytes()));
        }
        let type_error = || {
            let name = data
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string());
            PyTypeError::new_err(format!(
                "data must be bytes, a bytes-like object or str, not {name}"
            ))
        };
        let view = PyMemoryView::from(data).map_err(|_| type_error())?;
        // Any buffer format (array('i'), ...) is sent as its raw bytes.
        let bytes = view.call_method1(intern!(data.py(), "cast"), ("B",))?;
        let buffer = pyo3::buffer::PyBuffer::<u8>::get(&bytes)?;
        Ok(Payload::Owned(buffer.to_vec(data.py())?))
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Borrowed(bytes) => bytes,
            Payload::Owned(bytes) => bytes,
        }
    }
}

#[cfg(unix)]
fn duplicate_fd(fd: i64) -> PyResult<Socket> {
    use std::os::fd::{BorrowedFd, RawFd};
    let fd = RawFd::try_from(fd).map_err(|_| PyValueError::new_err("invalid file descriptor"))?;
    if fd < 0 {
        return Err(PyValueError::new_err("the socket is closed"));
    }
    // SAFETY: the borrow lives for one `dup` call and nothing is read or written
    // through it. rsepoll.Server.register_listener_socket passes the fileno() of
    // a socket object it holds open during the call; any other caller's bad
    // number makes `dup` fail with EBADF, or yields a duplicate that
    // `checked_listener` rejects unless it is a TCP socket.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned()?;
    checked_listener(Socket::from(owned))
}

#[cfg(windows)]
fn duplicate_fd(fd: i64) -> PyResult<Socket> {
    use std::os::windows::io::{BorrowedSocket, RawSocket};
    let handle =
        RawSocket::try_from(fd).map_err(|_| PyValueError::new_err("invalid socket handle"))?;
    // SAFETY: as on Unix: a live socket held by the caller, only borrowed to
    // duplicate it.
    let borrowed = unsafe { BorrowedSocket::borrow_raw(handle) };
    let owned = borrowed.try_clone_to_owned()?;
    checked_listener(Socket::from(owned))
}

/// Accepts a duplicated socket only if it is an IPv4/IPv6 stream socket, and
/// makes it non-blocking. A duplicate shares the file status flags, so the
/// caller's socket becomes non-blocking too (as with asyncio's `sock=`).
fn checked_listener(socket: Socket) -> PyResult<Socket> {
    // The bound address tells the family on every platform (`Socket::domain`
    // exists only on Linux, Android and Fuchsia). A listener is always bound.
    let is_ip = crate::sys::net::local_addr(&socket).is_some();
    if !is_ip || socket.r#type()? != socket2::Type::STREAM {
        return Err(PyValueError::new_err(
            "not a TCP socket: expected an IPv4 or IPv6 SOCK_STREAM socket",
        ));
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Turns deliveries into callbacks, on the thread that called `listen()`.
struct Dispatcher<'py, 'a> {
    server: &'a Bound<'py, ServerCore>,
    running: Running,
    /// Python-side handles of the open connections, by table slot.
    connections: Vec<Option<Py<Connection>>>,
    /// What new `Connection` objects are made with.
    factory: ConnectionFactory,
    idle_timeout: Duration,
    logger: Bound<'py, PyAny>,
    /// A stop was asked for.
    stopping: bool,
    /// Ctrl-C, `KeyboardInterrupt`/`SystemExit` from a callback, or a failed
    /// I/O thread: input still in the ring is not handed to callbacks.
    interrupted: bool,
    /// What `listen()` will raise once the server has shut down.
    exit_error: Option<PyErr>,
}

impl<'py, 'a> Dispatcher<'py, 'a> {
    fn new(
        server: &'a Bound<'py, ServerCore>,
        running: Running,
        idle_timeout: Duration,
    ) -> PyResult<Self> {
        let py = server.py();
        let logger = py
            .import(intern!(py, "logging"))?
            .call_method1(intern!(py, "getLogger"), ("rsepoll",))?;
        let factory = ConnectionFactory {
            server_id: server.get().id,
            framing: lock(&server.get().config).framing,
            sender: running.sender().downgrade(),
        };
        Ok(Dispatcher {
            server,
            running,
            connections: Vec::new(),
            factory,
            idle_timeout,
            logger,
            stopping: false,
            interrupted: false,
            exit_error: None,
        })
    }

    fn py(&self) -> Python<'py> {
        self.server.py()
    }

    fn run(mut self) -> PyResult<()> {
        let py = self.py();
        if self.server.get().stop_requested.load(SeqCst) {
            self.begin_stop();
        }
        self.callback(intern!(py, "on_listen_success"), ());
        let mut idle_since = Instant::now();
        let vanished = loop {
            let dispatched = self.dispatch_batch();
            if self.running.has_stopped() {
                break false;
            }
            if self.running.io_thread_vanished() {
                break true;
            }
            if let Err(interrupt) = py.check_signals() {
                self.fail_with(interrupt);
            }
            if self.server.get().stop_requested.load(SeqCst) {
                self.begin_stop();
            }
            if dispatched > 0 {
                idle_since = Instant::now();
                continue;
            }
            let due = idle_since + self.idle_timeout;
            let now = Instant::now();
            if now >= due {
                if !self.stopping {
                    self.callback(intern!(py, "on_waiting_for_activity"), ());
                }
                idle_since = Instant::now();
                continue;
            }
            let slice = SIGNAL_SLICE.min(due - now);
            let running = &mut self.running;
            py.detach(|| running.wait(slice));
        };
        if vanished {
            // The I/O thread could not report its own end: close the books here.
            self.report_error::<PyRuntimeError>("the rsepoll I/O thread exited unexpectedly");
            let open: Vec<Py<Connection>> = self.connections.drain(..).flatten().collect();
            for conn in open {
                self.close_and_report(conn);
            }
        }
        let running = &mut self.running;
        py.detach(|| running.join());
        self.callback(intern!(py, "on_shutdown_success"), ());
        match self.exit_error.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Dispatches up to a batch of ready deliveries; returns how many.
    fn dispatch_batch(&mut self) -> usize {
        let mut dispatched = 0;
        while dispatched < DISPATCH_BATCH {
            let py = self.py();
            let Dispatcher {
                running,
                connections,
                factory,
                ..
            } = self;
            // Copy out what the callback needs, so the slot can go back to the
            // I/O thread before the callback runs.
            let Some(item) = running.take_with(|d| Item::read(py, factory, connections, d)) else {
                break;
            };
            dispatched += 1;
            if self.running.taken() >= RELEASE_BATCH {
                self.running.release();
            }
            self.handle(item);
        }
        self.running.release();
        dispatched
    }

    fn handle(&mut self, item: Item<'py>) {
        let py = self.py();
        match item {
            Item::Opened(conn) => {
                let conn = conn.into_bound(py);
                self.callback(intern!(py, "on_connection_opened"), (conn,));
            }
            Item::Data(conn, data) => {
                if !self.interrupted {
                    self.callback(intern!(py, "on_message_received"), (conn, data));
                }
            }
            Item::Eof(conn) => {
                // After the callbacks for what came before the EOF, so their
                // replies are queued ahead of the default close.
                self.callback(intern!(py, "on_eof_received"), (conn,));
            }
            Item::Closed(conn, reason) => {
                let _ = conn.get().close_reason.set(reason);
                self.close_and_report(conn);
            }
            Item::Error(detail) => self.report_error::<PyOSError>(&detail),
            Item::TooLarge(conn, detail) => {
                let message = format!(
                    "{}: {detail}",
                    conn.bind(py)
                        .repr()
                        .map_or_else(|_| "a connection".to_owned(), |r| r.to_string(),)
                );
                let error = py
                    .import(intern!(py, "rsepoll"))
                    .and_then(|module| module.getattr(intern!(py, "MessageTooLarge")))
                    .and_then(|class| class.call1((message, conn.clone_ref(py))))
                    .map_or_else(|e| e, PyErr::from_value);
                self.on_callback_error(error);
                // After the replies to the messages before it, as for EOF.
                queue(py, conn.get(), Request::Close);
            }
            Item::Failed(detail) => {
                self.report_error::<PyRuntimeError>(&detail);
                self.stopping = true;
                self.interrupted = true;
            }
            Item::Nothing => {}
        }
    }

    fn close_and_report(&mut self, conn: Py<Connection>) {
        let py = self.py();
        conn.get().open.store(false, Relaxed);
        self.callback(intern!(py, "on_connection_closed"), (conn,));
    }

    fn report_error<E: pyo3::PyTypeInfo>(&mut self, detail: &str) {
        let error = PyErr::from_type(E::type_object(self.py()), detail.to_owned());
        self.on_callback_error(error);
    }

    /// Calls the instance's method `name`; exceptions go to
    /// `on_exception_occurred`, `KeyboardInterrupt`/`SystemExit` stop the server.
    fn callback<A>(&mut self, name: &Bound<'py, PyString>, args: A)
    where
        A: pyo3::call::PyCallArgs<'py>,
    {
        if let Err(error) = self.server.call_method1(name, args) {
            self.on_callback_error(error);
        }
    }

    fn on_callback_error(&mut self, error: PyErr) {
        let py = self.py();
        if !error.is_instance_of::<PyException>(py) {
            return self.fail_with(error);
        }
        let value = error.into_value(py);
        let Err(second) = self
            .server
            .call_method1(intern!(py, "on_exception_occurred"), (value,))
        else {
            return;
        };
        if !second.is_instance_of::<PyException>(py) {
            return self.fail_with(second);
        }
        let kwargs = [("exc_info", second.into_value(py))];
        let logged = pyo3::types::IntoPyDict::into_py_dict(kwargs, py).and_then(|kwargs| {
            self.logger.call_method(
                intern!(py, "error"),
                ("on_exception_occurred raised an exception",),
                Some(&kwargs),
            )
        });
        if let Err(error) = logged {
            error.write_unraisable(py, None);
        }
    }

    /// Stops the server and makes `listen()` raise `error` once it has.
    fn fail_with(&mut self, error: PyErr) {
        if self.exit_error.is_none() {
            self.exit_error = Some(error);
        }
        self.interrupted = true;
        self.begin_stop();
    }

    fn begin_stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            let timeout = *lock(&self.server.get().stop_timeout);
            self.running.stop(timeout);
        }
    }
}

/// Makes the `Connection` objects of one `listen()` run.
struct ConnectionFactory {
    server_id: u64,
    framing: Framing,
    sender: WeakSender,
}

/// A delivery, read out of its slot.
enum Item<'py> {
    Opened(Py<Connection>),
    Data(Py<Connection>, Bound<'py, PyBytes>),
    Eof(Py<Connection>),
    Closed(Py<Connection>, CloseReason),
    Error(String),
    TooLarge(Py<Connection>, String),
    Failed(String),
    Nothing,
}

impl<'py> Item<'py> {
    fn read(
        py: Python<'py>,
        factory: &ConnectionFactory,
        connections: &mut Vec<Option<Py<Connection>>>,
        delivery: &Delivery,
    ) -> Item<'py> {
        let index = delivery.conn.index as usize;
        let known = |connections: &Vec<Option<Py<Connection>>>| {
            connections
                .get(index)
                .and_then(Option::as_ref)
                .filter(|c| c.get().key == delivery.conn)
                .map(|c| c.clone_ref(py))
        };
        match delivery.kind {
            DeliveryKind::Opened => {
                let Some(opened) = delivery.opened.clone() else {
                    return Item::Nothing;
                };
                let conn = Connection::new(
                    delivery.conn,
                    factory.server_id,
                    opened,
                    factory.framing,
                    factory.sender.clone(),
                );
                match Py::new(py, conn) {
                    Ok(conn) => {
                        if connections.len() <= index {
                            connections.resize_with(index + 1, || None);
                        }
                        connections[index] = Some(conn.clone_ref(py));
                        Item::Opened(conn)
                    }
                    Err(_) => Item::Error("could not create a Connection object".into()),
                }
            }
            DeliveryKind::Data => match known(connections) {
                Some(conn) => Item::Data(conn, PyBytes::new(py, delivery.data())),
                None => Item::Nothing,
            },
            DeliveryKind::Eof => known(connections).map_or(Item::Nothing, Item::Eof),
            DeliveryKind::Closed(reason) => match known(connections) {
                Some(conn) => {
                    connections[index] = None;
                    Item::Closed(conn, reason)
                }
                None => Item::Nothing,
            },
            DeliveryKind::Error => Item::Error(delivery.detail.clone().unwrap_or_default()),
            DeliveryKind::TooLarge => match known(connections) {
                Some(conn) => Item::TooLarge(conn, delivery.detail.clone().unwrap_or_default()),
                None => Item::Nothing,
            },
            DeliveryKind::Failed => Item::Failed(delivery.detail.clone().unwrap_or_default()),
            DeliveryKind::Draining => {
                // Every connection is about to close: sends from now on are
                // refused. `Running` answers with `Shutdown` right after this,
                // so the latch is set before that command is queued.
                for conn in connections.iter().flatten() {
                    conn.get().closing.store(true, SeqCst);
                }
                Item::Nothing
            }
            DeliveryKind::Stopped => Item::Nothing,
        }
    }
}
