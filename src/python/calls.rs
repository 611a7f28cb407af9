//! `call_soon_threadsafe`: callbacks that any thread hands to the listening
//! thread, run there in the order they were handed over.
//!
//! The queue is open from the server's creation, and again from the start of
//! each run, until the end of the run: a call made once a run has ended is
//! refused (the caller learns it from the return value), and calls accepted
//! before that are all run, the last of them just before
//! `on_shutdown_success`. The dispatcher checks [`Calls::is_pending`] before
//! it sleeps, and the caller wakes it after queueing, with the same
//! handshake as deliveries (`wake.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::PyTraverseError;

use crate::sync::Mutex;

/// A callback and its arguments.
pub(super) type Call = (Py<PyAny>, Py<PyTuple>);

/// The calls waiting for the listening thread.
pub(super) struct Calls {
    queue: Mutex<Queue>,
    /// The queue is not empty: read without the lock before sleeping.
    pending: AtomicBool,
}

struct Queue {
    open: bool,
    calls: VecDeque<Call>,
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            queue: Mutex::new(Queue {
                open: true,
                calls: VecDeque::new(),
            }),
            pending: AtomicBool::new(false),
        }
    }
}

impl Calls {
    /// Queues `call`; false, dropping it, once the queue is closed.
    pub(super) fn push(&self, call: Call) -> bool {
        let mut queue = self.queue.lock();
        if !queue.open {
            return false;
        }
        queue.calls.push_back(call);
        self.pending.store(true, SeqCst);
        true
    }

    /// True if a call waits.
    pub(super) fn is_pending(&self) -> bool {
        self.pending.load(SeqCst)
    }

    /// Takes every call queued so far, oldest first.
    pub(super) fn take(&self) -> VecDeque<Call> {
        if !self.is_pending() {
            return VecDeque::new();
        }
        let mut queue = self.queue.lock();
        self.pending.store(false, SeqCst);
        std::mem::take(&mut queue.calls)
    }

    /// Shows the collector the queued calls.
    pub(super) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(queue) = self.queue.try_lock() {
            for (callback, args) in &queue.calls {
                visit.call(callback)?;
                visit.call(args)?;
            }
        }
        Ok(())
    }

    /// Drops the queued calls without running them (the server is being
    /// collected).
    pub(super) fn clear(&self) {
        let calls = std::mem::take(&mut self.queue.lock().calls);
        self.pending.store(false, SeqCst);
        drop(calls);
    }

    /// Accepts calls again (a run starts).
    pub(super) fn open(&self) {
        self.queue.lock().open = true;
    }

    /// Refuses calls from now on (a run ends); returns those still queued,
    /// which were accepted and are owed a run.
    pub(super) fn close(&self) -> VecDeque<Call> {
        let mut queue = self.queue.lock();
        queue.open = false;
        self.pending.store(false, SeqCst);
        std::mem::take(&mut queue.calls)
    }
}
