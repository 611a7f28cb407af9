//! `bytes` objects lent to the I/O thread by `send_message`.
//!
//! A large `bytes` payload is not copied into the command ring: the I/O
//! thread writes it from the object's own buffer (see
//! [`Sender::lend`](crate::server::Sender::lend)). The object must stay alive
//! until the I/O thread is done with it, which the command ring tells: its
//! slot has been released. So each lent object waits here with its
//! [`Ticket`], and the listening thread lets the returned ones go after each
//! batch of callbacks, with the GIL it already holds.
//!
//! Only exact `bytes` are lent: they are immutable, and freeing one runs no
//! Python code, so it is safe to do under this lock.

use std::collections::VecDeque;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::server::lock;
use crate::server::Ticket;

/// Payloads at least this large are lent rather than copied: below it, a
/// copy costs less than keeping the object.
pub(super) const LEND_MIN: usize = 4096;

/// The objects lent during one `listen()` run, oldest first.
///
/// Whoever owns it must drop it only after the I/O thread has been joined
/// (the dispatcher declares it after its `Running`, so it is dropped after
/// that has joined the thread).
#[derive(Default)]
pub(super) struct Loans {
    kept: Mutex<VecDeque<(Ticket, Py<PyBytes>)>>,
}

impl Loans {
    /// Keeps `object` until `ticket` has returned.
    pub(super) fn keep(&self, ticket: Ticket, object: Py<PyBytes>) {
        lock(&self.kept).push_back((ticket, object));
    }

    /// Lets go of the objects at the front whose tickets have returned. An
    /// object behind one whose ticket has not (threads racing to send, a
    /// busier I/O thread, or a command queued after its I/O thread ended)
    /// waits for a later call, or for [`Loans::clear`]: held longer, never
    /// let go early.
    pub(super) fn settle(&self, _py: Python<'_>, has_returned: impl Fn(Ticket) -> bool) {
        let mut kept = lock(&self.kept);
        while kept
            .front()
            .is_some_and(|(ticket, _)| has_returned(*ticket))
        {
            kept.pop_front();
        }
    }

    /// Lets go of every object: only once the I/O thread is gone.
    pub(super) fn clear(&self, _py: Python<'_>) {
        lock(&self.kept).clear();
    }
}
