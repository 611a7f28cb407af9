//! Connections handed from the accepting I/O thread to another one.
//!
//! The engine that owns the listeners deals accepted sockets to the engines
//! in turn (see [`crate::reactor`]). Each engine has an [`Arrivals`]: a
//! mutex-guarded list the dealer pushes to, and a flag the engine reads
//! without the lock on every turn, and before it sleeps, to know whether to
//! take the lock at all. Once the engine's loop ends, the list is closed:
//! hand-overs fail and give the socket back, for the dealer to serve
//! elsewhere.
//!
//! The flag is written only while the lock is held, in the same critical
//! section as the list: so whenever the lock is free, the flag says exactly
//! whether the list holds something. (Setting it after unlocking, or clearing
//! it before locking, breaks this: a hand-over that pushes, unlocks, and is
//! overtaken by a [`close`](Arrivals::close) then sets the flag of a closed,
//! empty list for good, and the ending I/O thread, which re-checks the flag
//! before each sleep, polls without sleeping while it waits for the consumer.
//! `tests/loom.rs` checks this under every interleaving.)
//!
//! The lock-free reads are hints, and that is enough:
//! - [`take`](Arrivals::take) that reads `false` while a hand-over is under
//!   way misses nothing: the hand-over wakes the engine afterwards, through
//!   the sleep handshake of [`crate::wake`] (its `SeqCst` fences order the
//!   flag's store before the waker's check of the sleep announcement, and the
//!   announcement before the sleeper's load of the flag, so one of the two
//!   sees the other);
//! - one that reads `true` takes the lock, which orders the list's contents.

use std::sync::atomic::Ordering::{Acquire, Relaxed};

use crate::sync::{AtomicBool, Mutex};

/// Items handed to one engine and not yet taken; see the module docs.
#[derive(Debug)]
pub struct Arrivals<T> {
    /// `None` once closed.
    list: Mutex<Option<Vec<T>>>,
    /// True exactly when `list` holds something, whenever the lock is free.
    flagged: AtomicBool,
}

impl<T> Default for Arrivals<T> {
    fn default() -> Self {
        Arrivals::new()
    }
}

impl<T> Arrivals<T> {
    /// An open, empty list.
    pub fn new() -> Self {
        Arrivals {
            list: Mutex::new(Some(Vec::new())),
            flagged: AtomicBool::new(false),
        }
    }

    /// Dealer: adds `item`, or gives it back if the list is closed. Wake the
    /// engine after this (see the module docs).
    pub fn hand_over(&self, item: T) -> Result<(), T> {
        let mut list = self.list.lock();
        match list.as_mut() {
            Some(list) => list.push(item),
            None => return Err(item),
        }
        // Under the lock: see the module docs.
        self.flagged.store(true, Relaxed);
        Ok(())
    }

    /// Engine: moves what was handed over into `into`. Costs one load when
    /// nothing was.
    pub fn take(&self, into: &mut Vec<T>) {
        if !self.flagged.load(Relaxed) {
            return;
        }
        let mut list = self.list.lock();
        if let Some(list) = list.as_mut() {
            into.append(list);
        }
        self.flagged.store(false, Relaxed);
    }

    /// True if something may have been handed over since the last
    /// [`take`](Arrivals::take): the engine's re-check before it sleeps.
    pub fn may_have_arrivals(&self) -> bool {
        self.flagged.load(Acquire)
    }

    /// Engine: refuses hand-overs from now on, and returns what was handed
    /// over and not taken (nothing, if already closed).
    pub fn close(&self) -> Vec<T> {
        let mut list = self.list.lock();
        let parked = list.take().unwrap_or_default();
        self.flagged.store(false, Relaxed);
        parked
    }
}
