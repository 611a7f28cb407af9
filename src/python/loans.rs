//! `bytes` objects lent to the I/O thread by `send_message`.
//!
//! A large `bytes` payload is not copied into the command ring: the I/O
//! thread writes it from the object's own buffer (see
//! [`Sender::lend`](crate::server::Sender::lend)). The object must stay alive
//! until the I/O thread is done with it, which the command ring tells: its
//! slot has been released. So each lent object waits here with its
//! [`Ticket`], and is let go, with the GIL its caller already holds, at the
//! first of these points after its ticket has returned:
//!
//! - the next object lent to the same I/O thread ([`Loans::keep`]), from any
//!   Python thread: so while a callback waits for workers sending large
//!   replies, only the replies whose command slots the I/O thread had not
//!   released at the last send are held, not all of them;
//! - every 32 deliveries the listening thread takes, and the end of each of
//!   its batches ([`Loans::settle`]);
//! - inline (`io_threads=0`), right after the delivery callback that lent
//!   it: while objects are kept, the dispatcher applies the engine's queued
//!   commands after each delivery's callback, which writes the reply (or
//!   copies what the socket would not take), and settles (not after calls
//!   and timers, whose replies wait for the turn as before). So one
//!   callback's replies are alive at a time, not a turn's worth: freed
//!   together, a turn's worth of large `bytes` objects made glibc hand their
//!   memory back to the kernel and fault it in again for the next turn's:
//!   at a fixed load of 64 KiB messages, inline rsepoll spent 1.4 times
//!   uvloop's CPU per byte that way (see `benchmarks/README.md`);
//! - when the listening thread is about to sleep: `listen()` sleeps in
//!   slices of 50 ms, and under `serve()` a session that still holds
//!   objects sleeps no longer than that. A lender under `serve()` rings the
//!   sleeping session, whose sleep was decided before the object came
//!   ([`Loans::wakes_consumer`]).
//!
//! A check takes this lock and reads, per I/O thread with objects kept, how
//! far that thread has released its commands (one atomic load per object let
//! go, plus one). A message that is not lent adds nothing to it, but for
//! one look at this lock after each delivery's callback, inline.
//!
//! Objects are kept per I/O thread, in the order they were kept. One thread
//! releases its commands in ring order, so its returned tickets form a prefix
//! of its queue, except when threads race to send: one that queued its command
//! first may keep its object second. Then an object behind one whose ticket
//! has not returned (or a command queued after its I/O thread ended) waits for
//! a later check, or for [`Loans::clear`]: held longer, never let go early.
//!
//! Only exact `bytes` are lent: they are immutable, and freeing one runs no
//! Python code, so it is safe to do under this lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::server::Ticket;
use crate::sync::Mutex;

/// Payloads at least this large are lent rather than copied: below it, a
/// copy costs less than keeping the object.
pub(super) const LEND_MIN: usize = 4096;

/// The objects lent during one `listen()` run, per I/O thread, oldest first.
///
/// Whoever owns it must drop it only after the I/O threads have been joined
/// (the dispatcher declares it after its `Running`, so it is dropped after
/// that has joined the threads).
#[derive(Default)]
pub(super) struct Loans {
    kept: Mutex<Vec<Queue>>,
    /// Set for a run under `serve()`, whose listening thread sleeps in an
    /// event loop with no slice of its own: a lender then rings it, so that
    /// a turn lets go of the object within the slice (see `serve.rs`).
    /// Set before the run serves, read by lenders: `Relaxed` is enough,
    /// since a connection, and so a lender, comes only after the start.
    wakes_consumer: AtomicBool,
}

/// One I/O thread's lent objects, oldest first.
type Queue = VecDeque<(Ticket, Py<PyBytes>)>;

impl Loans {
    /// Keeps `object` until `ticket` has returned, and lets go of the objects
    /// lent to the same I/O thread whose tickets `has_returned` says have.
    pub(super) fn keep(
        &self,
        _py: Python<'_>,
        ticket: Ticket,
        object: Py<PyBytes>,
        has_returned: impl Fn(Ticket) -> bool,
    ) {
        let mut kept = self.kept.lock();
        let engine = ticket.engine();
        if kept.len() <= engine {
            kept.resize_with(engine + 1, VecDeque::new);
        }
        let queue = &mut kept[engine];
        let_go_returned(queue, &has_returned);
        queue.push_back((ticket, object));
    }

    /// Lets go of the objects whose tickets `has_returned` says have returned
    /// (see the module docs for which ones may wait longer).
    pub(super) fn settle(&self, _py: Python<'_>, has_returned: impl Fn(Ticket) -> bool) {
        for queue in self.kept.lock().iter_mut() {
            let_go_returned(queue, &has_returned);
        }
    }

    /// Makes lenders wake the listening thread when they keep an object
    /// (`serve()`); see the field.
    pub(super) fn wake_consumer_on_keep(&self) {
        self.wakes_consumer.store(true, Relaxed);
    }

    /// True if a lender should wake the listening thread once it has kept
    /// its object.
    pub(super) fn wakes_consumer(&self) -> bool {
        self.wakes_consumer.load(Relaxed)
    }

    /// True if some object is kept.
    pub(super) fn is_holding(&self) -> bool {
        self.kept.lock().iter().any(|queue| !queue.is_empty())
    }

    /// Lets go of every object: only once the I/O thread is gone.
    pub(super) fn clear(&self, _py: Python<'_>) {
        self.kept.lock().clear();
    }
}

/// Lets go of the objects at the front of one I/O thread's `queue` whose
/// tickets have returned.
fn let_go_returned(queue: &mut Queue, has_returned: impl Fn(Ticket) -> bool) {
    while queue
        .front()
        .is_some_and(|(ticket, _)| has_returned(*ticket))
    {
        queue.pop_front();
    }
}
