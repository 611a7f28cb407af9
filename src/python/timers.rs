//! The application's timers: `call_later` and `call_at`, run on the
//! listening thread by the dispatcher between batches of deliveries.
//!
//! [`Timers`] is a binary heap ordered by due time, then by creation, so
//! timers due at the same moment run in the order they were made. A
//! [`TimerHandle`] is what the application holds: cancelling one drops its
//! callback at once, and leaves its heap entry to be skipped when it comes
//! up; when a timer is scheduled into a heap of 64 entries or more of
//! which more than half are cancelled, the heap is first rebuilt without
//! them, so memory follows the pending timers, not every timer ever
//! cancelled. Scheduling is `O(log n)`, and the dispatcher looks only at the
//! top, so pending timers cost a dispatch turn nothing while none is due.
//!
//! The clock ([`now`]) is monotonic seconds from an arbitrary origin, fixed
//! when the module is first used.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::PyTraverseError;

use crate::sync::Mutex;

/// Heaps smaller than this are never rebuilt: skipping a few cancelled
/// entries costs less.
const COMPACT_FLOOR: usize = 64;

/// The timers' clock: monotonic seconds since the first call.
pub(super) fn now() -> f64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// How long from now until `when` on the clock of [`now`] (zero if past).
pub(super) fn until(when: f64) -> Duration {
    let left = when - now();
    if left > 0.0 {
        // Far (or infinitely far) off: as long as a Duration goes.
        Duration::try_from_secs_f64(left).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

/// A callback scheduled with `call_later` or `call_at`.
#[pyclass(frozen, module = "rsepoll", name = "TimerHandle")]
pub struct TimerHandle {
    when: f64,
    /// The callback and its arguments, until it runs or is cancelled.
    scheduled: Mutex<Option<(Py<PyAny>, Py<PyTuple>)>>,
    cancelled: AtomicBool,
    /// The heap's count of cancelled entries, told when this one is.
    census: Arc<AtomicUsize>,
}

#[pymethods]
impl TimerHandle {
    /// Cancels the call if it has not run yet. `cancelled()` is True from
    /// then on either way.
    fn cancel(&self) {
        self.cancelled.store(true, SeqCst);
        let dropped = self.scheduled.lock().take();
        if dropped.is_some() {
            self.census.fetch_add(1, Relaxed);
        }
    }

    /// True once `cancel()` was called.
    fn cancelled(&self) -> bool {
        self.cancelled.load(SeqCst)
    }

    /// When the call is due, on the clock of `Server.time()`.
    fn when(&self) -> f64 {
        self.when
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The collector runs with the GIL held, as does every user of the
        // lock, so it is free; if not, what it guards is simply not seen.
        if let Some(scheduled) = self.scheduled.try_lock() {
            if let Some((callback, args)) = scheduled.as_ref() {
                visit.call(callback)?;
                visit.call(args)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        // Dropped after the lock is released: a callback's `__del__` may
        // come back to this handle.
        let scheduled = self.scheduled.lock().take();
        drop(scheduled);
    }

    fn __repr__(&self) -> String {
        let state = if self.cancelled() {
            "cancelled"
        } else if self.scheduled.lock().is_some() {
            "pending"
        } else {
            "done"
        };
        format!("<rsepoll.TimerHandle when={:.6} {state}>", self.when)
    }
}

impl TimerHandle {
    /// Takes the callback to run it: `None` if the handle was cancelled.
    pub(super) fn take(&self) -> Option<(Py<PyAny>, Py<PyTuple>)> {
        self.scheduled.lock().take()
    }
}

/// One heap entry: the earliest `when`, then the lowest `order`, on top.
struct Entry {
    when: f64,
    order: u64,
    handle: Py<TimerHandle>,
}

impl Entry {
    fn is_pending(&self) -> bool {
        self.handle.get().scheduled.lock().is_some()
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: `BinaryHeap` keeps its greatest entry on top.
        other
            .when
            .total_cmp(&self.when)
            .then(other.order.cmp(&self.order))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

/// A server's pending timers.
#[derive(Default)]
pub(super) struct Timers {
    heap: Mutex<BinaryHeap<Entry>>,
    next_order: AtomicU64,
    /// Entries in the heap whose handle was cancelled.
    census: Arc<AtomicUsize>,
}

impl Timers {
    /// Schedules `callback(*args)` at `when`; returns its handle, and
    /// whether it is now the earliest (a sleeping dispatcher must be woken).
    pub(super) fn schedule(
        &self,
        py: Python<'_>,
        when: f64,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
    ) -> PyResult<(Py<TimerHandle>, bool)> {
        let handle = Py::new(
            py,
            TimerHandle {
                when,
                scheduled: Mutex::new(Some((callback, args))),
                cancelled: AtomicBool::new(false),
                census: Arc::clone(&self.census),
            },
        )?;
        let entry = Entry {
            when,
            order: self.next_order.fetch_add(1, Relaxed),
            handle: handle.clone_ref(py),
        };
        let mut heap = self.heap.lock();
        if heap.len() >= COMPACT_FLOOR && self.census.load(Relaxed) * 2 > heap.len() {
            heap.retain(Entry::is_pending);
            self.census.store(0, Relaxed);
        }
        heap.push(entry);
        let earliest = heap
            .peek()
            .is_some_and(|top| top.handle.as_ptr() == handle.as_ptr());
        Ok((handle, earliest))
    }

    /// When the earliest pending timer is due.
    pub(super) fn next_when(&self) -> Option<f64> {
        let mut heap = self.heap.lock();
        while let Some(top) = heap.peek() {
            if top.is_pending() {
                return Some(top.when);
            }
            heap.pop();
            self.forget_cancelled();
        }
        None
    }

    /// Takes every pending timer due by `now`, in the order they must run.
    pub(super) fn take_due(&self, now: f64, into: &mut Vec<Py<TimerHandle>>) {
        let mut heap = self.heap.lock();
        while heap.peek().is_some_and(|top| top.when <= now) {
            let Some(entry) = heap.pop() else { break };
            if entry.is_pending() {
                into.push(entry.handle);
            } else {
                self.forget_cancelled();
            }
        }
    }

    /// A cancelled entry left the heap.
    fn forget_cancelled(&self) {
        // Saturating: a rebuild may have zeroed the count under a cancel.
        let _ = self
            .census
            .fetch_update(Relaxed, Relaxed, |count| count.checked_sub(1));
    }

    /// Shows the collector the handles in the heap (a callback may refer
    /// back to the server that holds them).
    pub(super) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(heap) = self.heap.try_lock() {
            for entry in heap.iter() {
                visit.call(&entry.handle)?;
            }
        }
        Ok(())
    }

    /// Drops every pending timer (the server has stopped).
    pub(super) fn clear(&self) {
        let entries = std::mem::take(&mut *self.heap.lock());
        // Dropped after the lock is released, as in `TimerHandle::__clear__`.
        self.census.store(0, Relaxed);
        for entry in entries {
            // Let the callbacks go even if the application keeps the handles.
            drop(entry.handle.get().take());
        }
    }
}
