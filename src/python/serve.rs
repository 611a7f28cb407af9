//! `serve()`: a run driven by an asyncio event loop instead of a thread of
//! its own.
//!
//! The Python side (`Server.serve` in `rsepoll/__init__.py`) owns a socket
//! pair: the loop watches the read end, and [`ServeSession`] hands the write
//! end to the run's delivery bell as its notifier ([`SocketWaker`]). Each
//! time the loop runs the session, [`ServeSession::turn`] does one
//! [`Dispatcher::turn`] and tells the loop when to come back: soon (there is
//! more to do: the loop runs its other tasks first), when the socket becomes
//! readable or a deadline passes (the session sleeps), or never (the server
//! has stopped: call [`ServeSession::finish`]). An I/O thread that publishes
//! deliveries, or a thread that calls `call_soon_threadsafe`, rings the bell
//! as for `listen()`; while the session sleeps that writes one byte to the
//! socket, so an idle server costs the loop nothing but its timer.

use std::io;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use socket2::Socket;

use super::dispatch::{Dispatcher, Next, SIGNAL_SLICE};
use crate::sys::Wake;

/// Wakes an event loop by making a socket it watches readable.
struct SocketWaker(Socket);

impl Wake for SocketWaker {
    fn wake(&self) -> io::Result<()> {
        match crate::sys::net::send(&self.0, &[1]) {
            // A full buffer already holds a wake-up the loop has yet to read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            result => result.map(drop),
        }
    }
}

/// A server running under an asyncio event loop; made by `Server.serve()`.
#[pyclass(unsendable, module = "rsepoll._rsepoll", name = "ServeSession")]
pub struct ServeSession {
    /// `None` once finished.
    dispatcher: Option<Dispatcher>,
    /// The session is announced on the bell, and the next turn must end
    /// that sleep.
    asleep: bool,
}

impl ServeSession {
    /// A session over `dispatcher`, whose notifier writes to the socket
    /// with file descriptor (or handle) `wake_fd`, which the loop watches.
    pub(super) fn new(py: Python<'_>, mut dispatcher: Dispatcher, wake_fd: i64) -> PyResult<Self> {
        let socket = crate::sys::net::duplicate(wake_fd)?;
        socket.set_nonblocking(true)?;
        dispatcher
            .running()
            .set_notifier(Some(std::sync::Arc::new(SocketWaker(socket))));
        dispatcher.wake_on_loans();
        dispatcher.start(py);
        Ok(ServeSession {
            dispatcher: Some(dispatcher),
            asleep: false,
        })
    }
}

#[pymethods]
impl ServeSession {
    /// Does one turn of the server's work. Returns how many seconds the loop
    /// may wait before the next turn at most (0.0: turn again once the loop
    /// has run its other callbacks; otherwise sooner if the wake-up socket
    /// becomes readable), or None once the server has stopped: then call
    /// `finish()`.
    fn turn(&mut self, py: Python<'_>) -> PyResult<Option<f64>> {
        let Some(dispatcher) = self.dispatcher.as_mut() else {
            return Err(PyRuntimeError::new_err("the session has finished"));
        };
        if std::mem::take(&mut self.asleep) {
            dispatcher.end_sleep();
        }
        Ok(match dispatcher.turn(py) {
            Next::Done => None,
            Next::Again => {
                dispatcher.poll_inline(py);
                Some(0.0)
            }
            Next::Sleep(wait) => {
                // Inline, the engine's loop turns here: the replies just
                // queued go out, and what came in is read.
                dispatcher.poll_inline(py);
                match dispatcher.begin_sleep() {
                    Some(limit) => {
                        self.asleep = true;
                        // Lent replies are let go by a turn: holding some,
                        // the session comes back within the slice `listen()`
                        // waits in, whatever the pace (docs/api.md, Memory).
                        // Checked once the sleep is announced, so that a
                        // reply lent after the check rings the bell instead.
                        let wait = if dispatcher.settle_loans(py) {
                            wait.min(SIGNAL_SLICE)
                        } else {
                            wait
                        };
                        Some(limit.map_or(wait, |limit| wait.min(limit)).as_secs_f64())
                    }
                    None => Some(0.0),
                }
            }
        })
    }

    /// A descriptor the loop must watch too, besides the wake-up socket,
    /// and turn when it reads as ready: the inline engine's poller; None if
    /// the server has I/O threads (or the session has finished).
    fn io_fd(&self) -> Option<i64> {
        self.dispatcher.as_ref()?.running().pollable()
    }

    /// Stops the server as a first Ctrl-C does and makes `finish()` raise
    /// `error` (the task awaiting `serve()` got it).
    fn interrupt(&mut self, error: Bound<'_, pyo3::exceptions::PyBaseException>) {
        if let Some(dispatcher) = self.dispatcher.as_mut() {
            dispatcher.interrupt(error.py(), PyErr::from_value(error.into_any()));
        }
    }

    /// Ends the run once `turn()` returned None: `on_shutdown_success` runs,
    /// and what the run raises is raised here. Called earlier, it abandons
    /// the run: the I/O threads are stopped and what they still deliver is
    /// discarded.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let Some(dispatcher) = self.dispatcher.take() else {
            return Ok(());
        };
        if std::mem::take(&mut self.asleep) {
            dispatcher.end_sleep();
        }
        dispatcher.running().set_notifier(None);
        dispatcher.finish(py)
    }
}
