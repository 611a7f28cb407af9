//! `ServerCore`, the base class of `rsepoll.Server`: its configuration, the
//! send path (`send_message`, `close_connection`, ...) and `listen()`, which
//! starts the engine and hands the calling thread to [`Dispatcher`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyMemoryView, PyString, PyTuple};
use socket2::Socket;

use super::connection::Connection;
use super::dispatch::Dispatcher;
use super::listener::ListenerSocket;
use super::loans::{Loans, LEND_MIN};
use crate::framing::{self, Envelope, Framing, PrefixWidth};
use crate::server::{Config, Request, Running, SendError, Sender, DEFAULT_STOP_TIMEOUT};
use crate::stats::Snapshot;
use crate::sys::Backend;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

// `stop_server`'s signature spells its default as the literal 5.0.
const _: () =
    assert!(DEFAULT_STOP_TIMEOUT.as_secs() == 5 && DEFAULT_STOP_TIMEOUT.subsec_nanos() == 0);

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The engine of `rsepoll.Server`; subclass `rsepoll.Server`, not this.
#[pyclass(subclass, frozen, module = "rsepoll._rsepoll", name = "ServerCore")]
pub struct ServerCore {
    pub(super) id: u64,
    pub(super) config: Mutex<Config>,
    /// Listening sockets registered for the next `listen()`.
    listeners: Mutex<Vec<Socket>>,
    /// A `listen()` is running.
    running: AtomicBool,
    /// `stop_server()` was called and the running `listen()` has not ended yet.
    pub(super) stop_requested: AtomicBool,
    /// The running server's command handle, for `stop_server()`.
    current: Mutex<Option<Sender>>,
    /// The timeout of the first `stop_server()` since the last run.
    pub(super) stop_timeout: Mutex<Duration>,
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
        io_threads = None,
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
        io_threads: Option<usize>,
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
        config.io_threads = io_threads.unwrap_or(config.io_threads);
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

    /// How many I/O threads serve the connections.
    #[getter]
    fn io_threads(&self) -> usize {
        lock(&self.config).io_threads
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
        let socket = super::listener::duplicate_fd(fd)?;
        lock(&self.listeners).push(socket);
        Ok(())
    }

    /// Serves the registered listeners on this thread until `stop_server()`,
    /// Ctrl-C, or a `KeyboardInterrupt`/`SystemExit` from a callback. Ctrl-C
    /// stops as `stop_server()` does, then raises `KeyboardInterrupt`; a
    /// second Ctrl-C resets what is still open.
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
        let envelope = match conn.framing {
            Framing::Raw if bytes.is_empty() => return Ok(true),
            Framing::Raw => None,
            // A framed message is never empty on the wire: an empty line, or
            // a zero length.
            framing => Some(
                framing::envelope(framing, bytes.len())
                    .map_err(|e| PyValueError::new_err(e.to_string()))?,
            ),
        };
        if bytes.len() >= LEND_MIN {
            if let (Ok(object), Some(loans)) = (data.cast_exact::<PyBytes>(), conn.loans()) {
                return Ok(lend(py, conn, envelope.as_ref(), object, &loans));
            }
        }
        Ok(queue(
            py,
            conn,
            match &envelope {
                Some(envelope) => Request::SendFramed(envelope, bytes),
                None => Request::Send(bytes),
            },
        ))
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
    /// client. Input already read is still delivered, and a reset ends the
    /// connection at once. Returns False if `conn` has closed.
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
pub(super) fn queue(py: Python<'_>, conn: &Connection, request: Request<'_>) -> bool {
    // Counted before it is queued: the I/O thread subtracts once it is written.
    let sending = match request {
        Request::Send(bytes) => bytes.len(),
        Request::SendFramed(envelope, payload) => envelope.overhead() + payload.len(),
        _ => 0,
    };
    submit(py, conn, sending, |sender, wait| {
        sender.request(conn.key, request, Some(&conn.closing), wait)
    })
    .is_some()
}

/// Sends the `bytes` object `object` (framed by `envelope`, if any) from its
/// own buffer, without copying it into the command ring; `loans` keeps it
/// alive until the I/O thread is done with it. Otherwise as [`queue`].
fn lend(
    py: Python<'_>,
    conn: &Connection,
    envelope: Option<&Envelope>,
    object: &Bound<'_, PyBytes>,
    loans: &Loans,
) -> bool {
    let bytes = object.as_bytes();
    let sending = envelope.map_or(0, Envelope::overhead) + bytes.len();
    let ticket = submit(py, conn, sending, |sender, wait| {
        // SAFETY: `bytes` belongs to an exact `bytes` object, which is
        // immutable; the caller holds it until this returns, and then
        // `loans` does until the I/O thread has returned the ticket, or has
        // been joined (see `Loans`).
        unsafe { sender.lend(conn.key, envelope, bytes, Some(&conn.closing), wait) }
    });
    let Some(ticket) = ticket else {
        return false;
    };
    let sender = conn.sender();
    let has_returned = |ticket| sender.as_ref().is_some_and(|s| s.has_returned(ticket));
    loans.keep(py, ticket, object.clone().unbind(), has_returned);
    true
}

/// Runs `push` for `conn`'s sender, first without waiting and then, if it
/// would block, waiting with the GIL released (see [`queue`]). `sending`
/// bytes are counted as pending meanwhile, and withdrawn if nothing was
/// queued.
fn submit<T: Send>(
    py: Python<'_>,
    conn: &Connection,
    sending: usize,
    push: impl Fn(&Sender, bool) -> Result<T, SendError> + Sync,
) -> Option<T> {
    let sender = conn.sender()?;
    conn.opened.pending.add(sending);
    let queued = match push(&sender, false) {
        Ok(done) => Some(done),
        Err(SendError::Stopped | SendError::Closing) => None,
        Err(SendError::WouldBlock) => py.detach(|| push(&sender, true).ok()),
    };
    if queued.is_none() {
        conn.opened.pending.withdraw(sending);
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
