//! The Python module `rsepoll._rsepoll`: a thin layer over [`crate::server`].
//!
//! - [`server::ServerCore`] is the base class of `rsepoll.Server`: its
//!   options, the send path, and `listen()`;
//! - [`dispatch::Dispatcher`] turns each delivery into a call of the
//!   instance's callback method (so overrides in Python subclasses are
//!   honoured) and runs the application's timers ([`timers`]) and calls
//!   from other threads ([`calls`]), in turns that `listen()` drives on the
//!   calling thread and `serve()` from an asyncio loop ([`serve`]); [`run`]
//!   is what a run shares with the server object;
//! - [`connection::PyConnection`] (`rsepoll.Connection` in Python) is the handle callbacks receive;
//! - [`loans::Loans`] keeps large `bytes` payloads alive while the I/O thread
//!   writes them from where they are; [`blanks::Blanks`] lends `bytes`
//!   objects for the engines to read large input into;
//! - [`listener::ListenerSocket`] and `make_listener_socket` make listening
//!   sockets, and registered sockets are duplicated and checked there;
//! - [`bench::run_bench`] runs the load generator of `python -m rsepoll.bench`.
//!
//! The class is `frozen`: all its state is behind atomics and mutexes, so a
//! callback may call back into the server (`send_message` inside
//! `on_message_received`) without tripping PyO3's borrow checking.

use pyo3::prelude::*;

mod bench;
mod blanks;
mod calls;
mod connection;
mod deliveries;
mod dispatch;
mod listener;
mod loans;
mod run;
mod send;
mod serve;
mod server;
mod timers;

/// The compiled part of rsepoll; import `rsepoll` instead.
#[pymodule(gil_used = true)]
fn _rsepoll(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust `log` records (from the listening thread: the I/O threads never
    // log) go to Python's logging, under the `rsepoll` logger: a record of
    // `_rsepoll::python::server` goes to `rsepoll._rsepoll.python.server`.
    // Loggers are cached, levels are not: a level set after the first record
    // still counts.
    let logger = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Loggers)?.set_prefix("rsepoll");
    let _ = logger.install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<connection::PyConnection>()?;
    m.add_class::<listener::ListenerSocket>()?;
    m.add_class::<server::ServerCore>()?;
    m.add_class::<serve::ServeSession>()?;
    m.add_class::<timers::TimerHandle>()?;
    m.add_function(wrap_pyfunction!(listener::make_listener_socket, m)?)?;
    m.add_function(wrap_pyfunction!(bench::run_bench, m)?)?;
    m.add_function(wrap_pyfunction!(usable_cpus, m)?)?;
    Ok(())
}

/// The CPUs this process may run on, at least 1: on Linux its affinity
/// mask and its cgroup CPU quota (`cpu.max`: a limit of 1.5 CPUs counts
/// as 1); elsewhere the logical CPUs (Windows' affinity mask is not
/// read), as the standard library counts them. What `io_threads="auto"`
/// picks by.
#[pyfunction]
fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
