//! `ServerCore`, the base class of `rsepoll.Server`: its configuration, the
//! send path (`send_message`, `close_connection`, ...), the application's
//! timers and calls from other threads, and the two ways to run: `listen()`,
//! which starts the engines and hands the calling thread to [`Dispatcher`],
//! and `_serve_session()`, the same under an asyncio loop ([`ServeSession`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyTuple};
use pyo3::PyTraverseError;
use socket2::Socket;

use super::connection::PyConnection;
use super::dispatch::{Agenda, Dispatcher};
use super::listener::ListenerSocket;
use super::run::RunState;
use super::send;
use super::serve::ServeSession;
use super::timers::{self, TimerHandle};
use crate::framing::{Framing, PrefixWidth};
use crate::server::{Config, Request, Running, DEFAULT_STOP_TIMEOUT};
use crate::sync::Mutex;
use crate::sys::Backend;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

// `stop_server`'s signature spells its default as the literal 5.0.
const _: () =
    assert!(DEFAULT_STOP_TIMEOUT.as_secs() == 5 && DEFAULT_STOP_TIMEOUT.subsec_nanos() == 0);

/// The engine of `rsepoll.Server`; subclass `rsepoll.Server`, not this.
#[pyclass(subclass, frozen, module = "rsepoll._rsepoll", name = "ServerCore")]
pub struct ServerCore {
    id: u64,
    config: Mutex<Config>,
    /// Listening sockets registered for the next run.
    listeners: Mutex<Vec<Socket>>,
    /// Whether a run is under way, its stop request, its I/O threads.
    run: Arc<RunState>,
    /// Timers and calls from other threads, for the runs to carry out.
    agenda: Arc<Agenda>,
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
            run: Arc::new(RunState::new()),
            agenda: Arc::default(),
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
        backend: Option<&Bound<'_, PyAny>>,
        ring_slots: Option<&Bound<'_, PyAny>>,
        slot_size: Option<&Bound<'_, PyAny>>,
        write_buffer_high: Option<&Bound<'_, PyAny>>,
        write_buffer_low: Option<&Bound<'_, PyAny>>,
        framing: Option<&Bound<'_, PyAny>>,
        max_message_size: Option<&Bound<'_, PyAny>>,
        length_prefix: Option<&Bound<'_, PyAny>>,
        idle_timeout: Option<&Bound<'_, PyAny>>,
        message_timeout: Option<&Bound<'_, PyAny>>,
        max_connections: Option<&Bound<'_, PyAny>>,
        io_threads: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let mut config = self.config.lock().clone();
        if let Some(name) = backend {
            config.backend =
                Backend::from_name(&text("backend", name)?).map_err(PyValueError::new_err)?;
        }
        let sizes = [
            ("ring_slots", ring_slots, &mut config.ring_slots),
            ("slot_size", slot_size, &mut config.slot_size),
            (
                "write_buffer_high",
                write_buffer_high,
                &mut config.write_buffer_high,
            ),
            (
                "write_buffer_low",
                write_buffer_low,
                &mut config.write_buffer_low,
            ),
            (
                "max_message_size",
                max_message_size,
                &mut config.max_message_size,
            ),
            (
                "max_connections",
                max_connections,
                &mut config.max_connections,
            ),
            ("io_threads", io_threads, &mut config.io_threads),
        ];
        for (name, value, setting) in sizes {
            if let Some(value) = value {
                *setting = size(name, value)?;
            }
        }
        let length_prefix = length_prefix
            .map(|value| size("length_prefix", value))
            .transpose()?;
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
        let framing = framing.map(|name| text("framing", name)).transpose()?;
        config.framing = match framing.as_deref() {
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
        *self.config.lock() = config;
        Ok(())
    }

    /// How many I/O threads serve the connections (0: inline). Under
    /// `serve()` on a loop that cannot watch the poller (IOCP on Windows, or a
    /// loop without `add_reader`), an inline server runs one I/O thread for
    /// that run, and this still says 0.
    #[getter]
    fn io_threads(&self) -> usize {
        self.config.lock().io_threads
    }

    /// How messages are cut and framed: `"raw"`, `"line"` or `"length"`.
    #[getter]
    fn framing(&self) -> &'static str {
        match self.config.lock().framing {
            Framing::Raw => "raw",
            Framing::Line => "line",
            Framing::Length(_) => "length",
        }
    }

    /// The readiness backend: `"epoll"` or `"portable"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.config.lock().backend.name()
    }

    /// The server's counters: a dict of `connections_open`,
    /// `connections_accepted`, `connections_closed`, `connections_rejected`,
    /// `bytes_received`, `bytes_sent`, `messages_received`, `messages_sent`,
    /// `ring_high_water`, and `closes` (a dict of close reason to count).
    /// While `listen()` runs, they are at most one I/O turn old; after, they
    /// are the last run's. Cheap, and safe from any thread.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = self.run.stats();
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

    /// True while `listen()` or `serve()` runs.
    #[getter]
    fn is_running(&self) -> bool {
        self.run.is_running()
    }

    /// Registers a duplicate of `listener` for the next `listen()`.
    fn _add_listener(&self, listener: &ListenerSocket) -> PyResult<()> {
        self.check_not_running("register a listener")?;
        let socket = listener.duplicate()?;
        self.listeners.lock().push(socket);
        Ok(())
    }

    /// Registers a duplicate of the listening socket with file descriptor `fd`
    /// (validated by the Python caller).
    fn _add_listener_fd(&self, fd: i64) -> PyResult<()> {
        self.check_not_running("register a listener")?;
        let socket = super::listener::duplicate_fd(fd)?;
        self.listeners.lock().push(socket);
        Ok(())
    }

    /// Serves the registered listeners on this thread until `stop_server()`,
    /// Ctrl-C, or a `KeyboardInterrupt`/`SystemExit` from a callback. Ctrl-C
    /// stops as `stop_server()` does, then raises `KeyboardInterrupt`; a
    /// second Ctrl-C resets what is still open.
    #[pyo3(signature = (timeout = 1000))]
    fn listen(slf: &Bound<'_, Self>, timeout: i64) -> PyResult<()> {
        Self::begin_run(slf, timeout, Driver::Listen)?.listen(slf.py())
    }

    /// Starts a run driven by an asyncio event loop, which watches the
    /// socket `wake_fd` is the other end of (and, inline, the session's
    /// `io_fd()`); see `rsepoll.Server.serve`. `watch_fds`: the loop can
    /// watch descriptors (`add_reader`); without, an inline server runs one
    /// I/O thread.
    #[pyo3(signature = (wake_fd, timeout = 1000, watch_fds = true))]
    fn _serve_session(
        slf: &Bound<'_, Self>,
        wake_fd: i64,
        timeout: i64,
        watch_fds: bool,
    ) -> PyResult<ServeSession> {
        let dispatcher = Self::begin_run(slf, timeout, Driver::EventLoop { watch_fds })?;
        ServeSession::new(slf.py(), dispatcher, wake_fd)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.agenda.timers.traverse(&visit)?;
        self.agenda.calls.traverse(&visit)
    }

    fn __clear__(&self) {
        self.agenda.timers.clear();
        self.agenda.calls.clear();
    }

    /// The clock of `call_at` and `TimerHandle.when()`: monotonic seconds
    /// from an arbitrary origin.
    fn time(&self) -> f64 {
        timers::now()
    }

    /// Runs `callback(*args)` on the listening thread `delay` seconds from
    /// now (at once, after what is due before it, if `delay` is not
    /// positive). Returns a `TimerHandle` that can cancel it. Call it from
    /// the listening thread (a callback, a timer) or before the run; from
    /// another thread, through `call_soon_threadsafe`.
    #[pyo3(signature = (delay, callback, *args))]
    fn call_later(
        &self,
        py: Python<'_>,
        delay: f64,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
    ) -> PyResult<Py<TimerHandle>> {
        if delay.is_nan() {
            return Err(PyValueError::new_err(
                "delay must be a number of seconds, not NaN",
            ));
        }
        self.schedule(py, timers::now() + delay, callback, args)
    }

    /// Runs `callback(*args)` on the listening thread once `time()` reaches
    /// `when`. Returns a `TimerHandle` that can cancel it. From where to
    /// call it: as `call_later`.
    #[pyo3(signature = (when, callback, *args))]
    fn call_at(
        &self,
        py: Python<'_>,
        when: f64,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
    ) -> PyResult<Py<TimerHandle>> {
        if when.is_nan() {
            return Err(PyValueError::new_err("when must be a time, not NaN"));
        }
        self.schedule(py, when, callback, args)
    }

    /// Runs `callback(*args)` on the listening thread soon, waking it if it
    /// sleeps. Safe from any thread; calls from one thread run in the order
    /// made. Returns False, running nothing, once the server has stopped
    /// (from the end of a run until the next one starts).
    #[pyo3(signature = (callback, *args))]
    fn call_soon_threadsafe(&self, callback: Py<PyAny>, args: Py<PyTuple>) -> PyResult<bool> {
        if !self.agenda.calls.push((callback, args)) {
            return Ok(false);
        }
        self.run.wake_dispatcher();
        Ok(true)
    }

    /// Queues `data` (bytes-like, or `str` sent as UTF-8) for `conn`. Returns
    /// False, sending nothing, if `conn` has closed or is closing.
    fn send_message(
        &self,
        py: Python<'_>,
        conn: &Bound<'_, PyConnection>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        send::message(py, self.own_connection(conn)?, data)
    }

    /// Closes `conn` once what is queued for it has been sent (FIN), or at
    /// once with a reset if `abort`, dropping what is queued. Returns False if
    /// it had already closed, or (without `abort`) was already closing.
    #[pyo3(signature = (conn, abort = false))]
    fn close_connection(
        &self,
        py: Python<'_>,
        conn: &Bound<'_, PyConnection>,
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
        Ok(send::queue(py, conn, request))
    }

    /// Stops reading `conn` until `resume_reading(conn)`: TCP then slows the
    /// client. Input already read is still delivered, and a reset ends the
    /// connection at once. Returns False if `conn` has closed.
    fn pause_reading(&self, py: Python<'_>, conn: &Bound<'_, PyConnection>) -> PyResult<bool> {
        let conn = self.own_connection(conn)?;
        Ok(conn.open.load(Relaxed) && send::queue(py, conn, Request::PauseReading))
    }

    /// Reads `conn` again after `pause_reading(conn)`. Returns False if `conn`
    /// has closed.
    fn resume_reading(&self, py: Python<'_>, conn: &Bound<'_, PyConnection>) -> PyResult<bool> {
        let conn = self.own_connection(conn)?;
        Ok(conn.open.load(Relaxed) && send::queue(py, conn, Request::ResumeReading))
    }

    /// Stops the run (`listen()` or `serve()`): the listeners close, so new clients are refused, and
    /// `on_stopping()` runs on the listening thread. Then, by default
    /// (`close_connections`), input already read is still handled, no more
    /// is read, and each connection closes once its queued output is out;
    /// with `close_connections=False`, the open connections are served as
    /// usual until the application (or the peer, or a timeout) has closed
    /// each. What is still open after `timeout` seconds is reset
    /// (`close_reason == "shutdown"`). Every connection is reported closed,
    /// then `on_shutdown_success` runs and the run ends.
    ///
    /// The first call's timeout stands; a later call that closes the
    /// connections turns a stop that keeps them into a drain, by the first
    /// call's deadline or its own timeout, whichever comes first. Safe from
    /// any thread and from signal handlers; before a run, it makes the
    /// next one stop as soon as it has started (and return at once, with no
    /// connection open).
    // The literal keeps the default visible to `inspect` (and stubtest); it is
    // DEFAULT_STOP_TIMEOUT, as a compile-time assertion at the top checks.
    #[pyo3(signature = (timeout = 5.0, *, close_connections = true))]
    fn stop_server(&self, timeout: f64, close_connections: bool) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
            PyValueError::new_err(format!(
                "timeout must be a non-negative number of seconds, got {timeout}"
            ))
        })?;
        self.run.request_stop(Some(timeout), close_connections);
        Ok(())
    }
}

impl ServerCore {
    /// Starts a run: the I/O threads serving the registered listeners, and
    /// the dispatcher that will call back `slf`. An inline engine that
    /// `driver` cannot turn gets one I/O thread instead.
    fn begin_run(slf: &Bound<'_, Self>, timeout: i64, driver: Driver) -> PyResult<Dispatcher> {
        let this = slf.get();
        if timeout <= 0 {
            return Err(PyValueError::new_err(format!(
                "timeout must be a positive number of milliseconds, got {timeout}"
            )));
        }
        let ticket = this.run.begin()?;
        let listeners = std::mem::take(&mut *this.listeners.lock());
        if listeners.is_empty() {
            return Err(PyRuntimeError::new_err(
                "no listener registered: call register_listener_socket() before listen() or serve()",
            ));
        }
        let mut config = this.config.lock().clone();
        if config.io_threads == 0 && !driver.can_turn_inline(config.backend) {
            config.io_threads = 1;
        }
        log::debug!(
            "serving {} listener(s) with the {} backend",
            listeners.len(),
            config.backend.name()
        );
        let running = Running::start(&config, listeners)?;
        Dispatcher::new(
            slf.py(),
            slf.clone().into_any().unbind(),
            ticket,
            Arc::clone(&this.run),
            Arc::clone(&this.agenda),
            this.id,
            config.framing,
            running,
            Duration::from_millis(timeout as u64),
        )
    }

    /// Schedules a timer, waking a sleeping dispatcher if it is the earliest.
    fn schedule(
        &self,
        py: Python<'_>,
        when: f64,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
    ) -> PyResult<Py<TimerHandle>> {
        if !callback.bind(py).is_callable() {
            return Err(PyTypeError::new_err("the callback must be callable"));
        }
        let (handle, earliest) = self.agenda.timers.schedule(py, when, callback, args)?;
        if earliest {
            self.run.wake_dispatcher();
        }
        Ok(handle)
    }

    fn check_not_running(&self, what: &str) -> PyResult<()> {
        if self.run.is_running() {
            Err(PyRuntimeError::new_err(format!(
                "cannot {what} while the server runs (listen() or serve())"
            )))
        } else {
            Ok(())
        }
    }

    fn own_connection<'a>(&self, conn: &'a Bound<'_, PyConnection>) -> PyResult<&'a PyConnection> {
        let conn = conn.get();
        if conn.server_id != self.id {
            return Err(PyValueError::new_err(
                "this connection belongs to another server",
            ));
        }
        Ok(conn)
    }
}

/// The size or count `value` of option `name`: an `int` (or an object with
/// `__index__`, not a `bool`) that fits a `usize`, else a `ValueError`
/// naming the option. `Config::validate` checks each option's own range.
fn size(name: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    let refused = |what: &str| refusal(name, what, value);
    if value.is_instance_of::<PyBool>() {
        return Err(refused("must be an integer"));
    }
    let Ok(number) = value.call_method0(intern!(value.py(), "__index__")) else {
        return Err(refused("must be an integer"));
    };
    number.extract::<usize>().map_err(|_| {
        if number.lt(0).unwrap_or(false) {
            refused("must not be negative")
        } else {
            refused("is too large")
        }
    })
}

/// A positive number of seconds, at most [`Config::TIMEOUT_MAX`], as a
/// `Duration`: whatever `PyFloat_AsDouble` converts (an object with
/// `__float__` or `__index__`: `int`, `float`, `fractions.Fraction`,
/// `decimal.Decimal`, ...; not a `str`), but not a `bool`.
fn seconds(name: &str, value: &Bound<'_, PyAny>) -> PyResult<Duration> {
    let refused = || {
        let what = format!(
            "must be a positive number of seconds, at most {}, or None",
            Config::TIMEOUT_MAX.as_secs()
        );
        refusal(name, &what, value)
    };
    if value.is_instance_of::<PyBool>() {
        return Err(refused());
    }
    let seconds: f64 = value.extract().map_err(|_| refused())?;
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Config::TIMEOUT_MAX)
        .ok_or_else(refused)
}

/// The string an option names its choice with (`backend`, `framing`).
fn text(name: &str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    value
        .extract()
        .map_err(|_| refusal(name, "must be a string", value))
}

/// The `ValueError` for option `name`: `value` `what` ("must be ...").
fn refusal(name: &str, what: &str, value: &Bound<'_, PyAny>) -> PyErr {
    let shown = value.repr().map_or_else(|_| "?".into(), |r| r.to_string());
    PyValueError::new_err(format!("{name} {what}, got {shown}"))
}

/// What the listening thread of a run sleeps in between its turns, which
/// decides whether it can turn an inline engine itself.
#[derive(Clone, Copy)]
enum Driver {
    /// `listen()`: the engine's own poller, on every backend.
    Listen,
    /// `serve()`: an event loop, which can wake the thread for the engine's
    /// sockets only by watching its poller's descriptor (`add_reader`, when
    /// `watch_fds`); IOCP has none.
    EventLoop { watch_fds: bool },
}

impl Driver {
    /// True if this driver's thread can turn an inline engine on `backend`.
    fn can_turn_inline(self, backend: Backend) -> bool {
        match self {
            Driver::Listen => true,
            Driver::EventLoop { watch_fds } => watch_fds && backend.has_pollable(),
        }
    }
}
