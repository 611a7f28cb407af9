//! The Python module `rsepoll._rsepoll`: a thin layer over [`crate::server`].
//!
//! - [`server::ServerCore`] is the base class of `rsepoll.Server`: its
//!   options, the send path, and `listen()`;
//! - [`dispatch::Dispatcher`] is the loop `listen()` runs on the calling
//!   thread: it turns each delivery into a call of the instance's callback
//!   method, so overrides in Python subclasses are honoured;
//! - [`run_state::RunState`] is a run's stop request, which `stop_server()`
//!   makes from any thread and the dispatcher carries out;
//! - [`connection::PyConnection`] (`rsepoll.Connection` in Python) is the handle callbacks receive;
//! - [`loans::Loans`] keeps large `bytes` payloads alive while the I/O thread
//!   writes them from where they are;
//! - [`listener::ListenerSocket`] and `make_listener_socket` make listening
//!   sockets, and registered sockets are duplicated and checked there;
//! - [`bench::run_bench`] runs the load generator of `python -m rsepoll.bench`.
//!
//! The class is `frozen`: all its state is behind atomics and mutexes, so a
//! callback may call back into the server (`send_message` inside
//! `on_message_received`) without tripping PyO3's borrow checking.

use pyo3::prelude::*;

mod bench;
mod connection;
mod dispatch;
mod listener;
mod loans;
mod run_state;
mod send;
mod server;

/// The compiled part of rsepoll; import `rsepoll` instead.
#[pymodule(gil_used = true)]
fn _rsepoll(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust `log` records (warnings from the I/O thread) go to Python's logging.
    let _ = pyo3_log::try_init();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<connection::PyConnection>()?;
    m.add_class::<listener::ListenerSocket>()?;
    m.add_class::<server::ServerCore>()?;
    m.add_function(wrap_pyfunction!(listener::make_listener_socket, m)?)?;
    m.add_function(wrap_pyfunction!(bench::run_bench, m)?)?;
    Ok(())
}
