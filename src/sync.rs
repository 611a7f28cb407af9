//! The synchronisation primitives the crate is built on.
//!
//! Under `--cfg loom` every item here comes from [`loom`], so that the model
//! checker can explore every interleaving of the ring and wake protocols (see
//! `tests/loom.rs`); otherwise they are the `std` ones. `UnsafeCell` uses loom's
//! closure-based API in both builds, so the code that touches slot memory is the
//! same code that loom checks.
//!
//! [`Mutex`] and [`Condvar`] ignore lock poisoning (after tokio's
//! `loom/std/mutex.rs`), so that one shape of `lock()` serves every caller.
//! Nothing the crate does under a lock is expected to panic, and the state
//! guarded is kept valid between steps. (A panic in the middle of a long
//! send would leave the first parts of its message in the command ring, and
//! the I/O thread would gather the next send onto them.) Under loom, which
//! has no clock, a timed wait is an untimed one, so that a lost wake-up shows
//! up as a deadlock instead of hiding behind the timeout.

use std::time::Duration;

#[cfg(loom)]
use loom::sync as inner;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::MutexGuard;

#[cfg(not(loom))]
use std::sync as inner;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::MutexGuard;

/// A mutex whose lock ignores poisoning; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(inner::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(inner::Mutex::new(value))
    }

    /// Locks, waiting as long as it takes.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks if nobody holds the lock now.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// A condition variable whose waits ignore poisoning; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Condvar(inner::Condvar);

impl Condvar {
    pub(crate) fn new() -> Self {
        Condvar(inner::Condvar::new())
    }

    /// Waits for a notification, releasing `guard` meanwhile.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a notification or `timeout`, releasing `guard` meanwhile.
    #[cfg(not(loom))]
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T> {
        match self.0.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Loom has no clock: waits for a notification (see the module docs).
    #[cfg(loom)]
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        _timeout: Duration,
    ) -> MutexGuard<'a, T> {
        self.wait(guard)
    }

    /// Waits while `condition` holds, for at most `timeout`.
    pub(crate) fn wait_timeout_while<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        timeout: Duration,
        mut condition: impl FnMut(&mut T) -> bool,
    ) -> MutexGuard<'a, T> {
        let deadline = std::time::Instant::now() + timeout;
        while condition(&mut guard) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            guard = self.wait_timeout(guard, left);
        }
        guard
    }

    /// Wakes every waiter.
    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `std::cell::UnsafeCell` behind loom's closure-based access API.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with an exclusive pointer to the contents.
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
