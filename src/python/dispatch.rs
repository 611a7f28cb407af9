//! The loop `listen()` runs on the calling thread: it takes deliveries from
//! the I/O thread in batches and turns each into a call of the instance's
//! callback method, so that overrides in Python subclasses are honoured.
//!
//! It waits with the GIL released, in slices short enough for Ctrl-C to be
//! seen, and holds the GIL only while it dispatches a batch. An exception
//! from a callback goes to `on_exception_occurred`; `KeyboardInterrupt` and
//! `SystemExit` stop the server and leave `listen()` once it has shut down.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::connection::PyConnection;
use super::loans::Loans;
use super::run_state::RunState;
use super::send::queue;
use crate::close_reason::CloseReason;
use crate::framing::Framing;
use crate::message::{Delivery, DeliveryKind};
use crate::server::{Request, Running, WeakSender};
use crate::token::ConnKey;

/// Longest the listening thread waits with the GIL released before it checks
/// for signals (Ctrl-C) and stop requests.
pub(super) const SIGNAL_SLICE: Duration = Duration::from_millis(50);
/// Deliveries dispatched per batch before signals are checked again.
const DISPATCH_BATCH: usize = 256;
/// Deliveries dispatched before their slots go back to the I/O thread.
const RELEASE_BATCH: usize = 32;

/// Turns deliveries into callbacks, on the thread that called `listen()`.
pub(super) struct Dispatcher<'py, 'a> {
    /// The `rsepoll.Server` instance whose methods are the callbacks.
    instance: &'a Bound<'py, PyAny>,
    run: &'a RunState,
    running: Running,
    /// Payloads lent to the I/O thread. Declared after `running`, so that it
    /// is dropped after `running` has joined the I/O thread.
    loans: Arc<Loans>,
    /// Python-side handles of the open connections, by engine and table slot.
    connections: Connections,
    /// What new `Connection` objects are made with.
    factory: ConnectionFactory,
    idle_timeout: Duration,
    logger: Bound<'py, PyAny>,
    /// A stop was asked for.
    stopping: bool,
    /// A second Ctrl-C (or `KeyboardInterrupt`/`SystemExit` from a
    /// callback), or a failed I/O thread: input still in the ring is not
    /// handed to callbacks. The first one stops as `stop_server()` does.
    interrupted: bool,
    /// What `listen()` will raise once the server has shut down.
    exit_error: Option<PyErr>,
}

impl<'py, 'a> Dispatcher<'py, 'a> {
    /// The dispatcher of the run `running` of server `server_id` (framing
    /// `framing`), calling back `instance`; `idle_timeout` paces
    /// `on_waiting_for_activity`.
    pub(super) fn new(
        instance: &'a Bound<'py, PyAny>,
        run: &'a RunState,
        server_id: u64,
        framing: Framing,
        running: Running,
        idle_timeout: Duration,
    ) -> PyResult<Self> {
        let py = instance.py();
        let logger = py
            .import(intern!(py, "logging"))?
            .call_method1(intern!(py, "getLogger"), ("rsepoll",))?;
        let loans = Arc::new(Loans::default());
        let factory = ConnectionFactory {
            server_id,
            framing,
            sender: running.sender().downgrade(),
            loans: Arc::downgrade(&loans),
        };
        Ok(Dispatcher {
            instance,
            run,
            running,
            loans,
            connections: Connections::default(),
            factory,
            idle_timeout,
            logger,
            stopping: false,
            interrupted: false,
            exit_error: None,
        })
    }

    fn py(&self) -> Python<'py> {
        self.instance.py()
    }

    pub(super) fn run(mut self) -> PyResult<()> {
        let py = self.py();
        self.callback(intern!(py, "on_listen_success"), ());
        if self.run.stop_requested.load(SeqCst) {
            self.begin_stop();
        }
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
            if self.run.stop_requested.load(SeqCst) {
                self.begin_stop();
            }
            if dispatched > 0 {
                idle_since = Instant::now();
                continue;
            }
            let due = idle_since + self.idle_timeout;
            let now = Instant::now();
            if now >= due {
                if !self.stopping || self.run.keeps_connections() {
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
            let open: Vec<Py<PyConnection>> = self.connections.drain().collect();
            for conn in open {
                self.close_and_report(conn);
            }
        }
        let running = &mut self.running;
        py.detach(|| running.join());
        // The I/O thread is gone: nothing reads what was lent any more.
        self.loans.clear(py);
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
                // Not only at the batch's end: see `Loans`.
                let running = &self.running;
                self.loans.settle(py, |ticket| running.has_returned(ticket));
            }
            self.handle(item);
        }
        self.running.release();
        let running = &self.running;
        self.loans
            .settle(self.py(), |ticket| running.has_returned(ticket));
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
                self.begin_stop();
                self.interrupted = true;
            }
            Item::Nothing => {}
        }
    }

    fn close_and_report(&mut self, conn: Py<PyConnection>) {
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
        if let Err(error) = self.instance.call_method1(name, args) {
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
            .instance
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

    /// Stops the server and makes `listen()` raise `error` once it has. The
    /// first such error stops as `stop_server()` does: input already read
    /// is still handed to the callbacks and their replies go out. A second
    /// one cuts: no more input is handed over, and every connection still
    /// open is reset.
    fn fail_with(&mut self, error: PyErr) {
        if self.exit_error.is_none() {
            self.exit_error = Some(error);
            // As stop_server() does: a stop that keeps the connections
            // becomes a drain.
            let sender = self.running.sender();
            self.run.request_stop(None, true, Some(&sender));
            return self.begin_stop();
        }
        self.interrupted = true;
        self.stopping = true;
        self.running.cut();
    }

    fn begin_stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            // The application's cue, before any connection closes for the
            // stop: the engines announce `Draining`, whose answer closes
            // them, only once `cue` lets them.
            self.callback(intern!(self.py(), "on_stopping"), ());
            self.run.cue(&self.running.sender());
        }
    }
}

/// Makes the `Connection` objects of one `listen()` run.
struct ConnectionFactory {
    server_id: u64,
    framing: Framing,
    sender: WeakSender,
    loans: std::sync::Weak<Loans>,
}

/// The `Connection` objects of the open connections, by engine and table
/// slot: one lookup per delivery, without hashing.
#[derive(Default)]
struct Connections {
    by_engine: Vec<Vec<Option<Py<PyConnection>>>>,
}

impl Connections {
    fn slot(&mut self, key: ConnKey) -> &mut Option<Py<PyConnection>> {
        let engine = usize::from(key.engine);
        if self.by_engine.len() <= engine {
            self.by_engine.resize_with(engine + 1, Vec::new);
        }
        let slots = &mut self.by_engine[engine];
        let index = key.index as usize;
        if slots.len() <= index {
            slots.resize_with(index + 1, || None);
        }
        &mut slots[index]
    }

    /// The connection `key` names, if it is open.
    fn get(&self, py: Python<'_>, key: ConnKey) -> Option<Py<PyConnection>> {
        self.by_engine
            .get(usize::from(key.engine))?
            .get(key.index as usize)?
            .as_ref()
            .filter(|c| c.get().key == key)
            .map(|c| c.clone_ref(py))
    }

    fn iter(&self) -> impl Iterator<Item = &Py<PyConnection>> {
        self.by_engine.iter().flatten().flatten()
    }

    fn drain(&mut self) -> impl Iterator<Item = Py<PyConnection>> + '_ {
        self.by_engine.drain(..).flatten().flatten()
    }
}

/// A delivery, read out of its slot.
enum Item<'py> {
    Opened(Py<PyConnection>),
    Data(Py<PyConnection>, Bound<'py, PyBytes>),
    Eof(Py<PyConnection>),
    Closed(Py<PyConnection>, CloseReason),
    Error(String),
    TooLarge(Py<PyConnection>, String),
    Failed(String),
    Nothing,
}

impl<'py> Item<'py> {
    fn read(
        py: Python<'py>,
        factory: &ConnectionFactory,
        connections: &mut Connections,
        delivery: &Delivery,
    ) -> Item<'py> {
        let key = delivery.conn;
        match delivery.kind {
            DeliveryKind::Opened => {
                let Some(opened) = delivery.opened.clone() else {
                    return Item::Nothing;
                };
                let conn = PyConnection::new(
                    key,
                    factory.server_id,
                    opened,
                    factory.framing,
                    factory.sender.clone(),
                    factory.loans.clone(),
                );
                match Py::new(py, conn) {
                    Ok(conn) => {
                        *connections.slot(key) = Some(conn.clone_ref(py));
                        Item::Opened(conn)
                    }
                    Err(_) => Item::Error("could not create a Connection object".into()),
                }
            }
            DeliveryKind::Data => match connections.get(py, key) {
                Some(conn) => Item::Data(conn, PyBytes::new(py, delivery.data())),
                None => Item::Nothing,
            },
            DeliveryKind::Eof => connections.get(py, key).map_or(Item::Nothing, Item::Eof),
            DeliveryKind::Closed(reason) => match connections.get(py, key) {
                Some(conn) => {
                    *connections.slot(key) = None;
                    Item::Closed(conn, reason)
                }
                None => Item::Nothing,
            },
            DeliveryKind::Error => Item::Error(delivery.detail.clone().unwrap_or_default()),
            DeliveryKind::TooLarge => match connections.get(py, key) {
                Some(conn) => Item::TooLarge(conn, delivery.detail.clone().unwrap_or_default()),
                None => Item::Nothing,
            },
            DeliveryKind::Failed => Item::Failed(delivery.detail.clone().unwrap_or_default()),
            DeliveryKind::Draining => {
                // Every connection of this engine (`key.engine`) is about to
                // close: sends from now on are refused. `Running` answers with
                // `Shutdown` right after this, so the latch is set before that
                // command is queued. Other engines' connections may still
                // have input to answer, ahead of their own `Draining`.
                for conn in connections
                    .iter()
                    .filter(|c| c.get().key.engine == key.engine)
                {
                    conn.get().closing.store(true, SeqCst);
                }
                Item::Nothing
            }
            DeliveryKind::Stopped => Item::Nothing,
        }
    }
}
