//! Sleeping on a ring without missing the wake-up the other thread owes you.
//!
//! A thread that finds nothing to do (an empty ring, or a full one it wants to
//! write to) must block, and the other thread must wake it once there is
//! something to do, but only then: a wake-up per message would cost a syscall
//! per message. Both kinds of sleeper here use the same store-buffering
//! handshake:
//!
//! ```text
//! sleeper                                  waker
//! announce: sleeping = true                make progress visible (publish/release)
//! fence(SeqCst)                            fence(SeqCst)
//! re-check the condition                   if sleeping: wake the sleeper
//! sleep only if it still holds
//! ```
//!
//! The two `SeqCst` fences forbid the one bad outcome, where the sleeper misses
//! the progress *and* the waker misses the announcement: at least one of them
//! sees the other's store. `tests/loom.rs` checks both kinds under loom.
//!
//! [`Bell`] is for threads that block on a condition variable (the Python side),
//! or that sleep elsewhere, in an event loop, and are told through a
//! [`Wake`] (the Python side under asyncio: [`Bell::announce`]);
//! [`SleepFlag`] is for a thread that blocks in the poller and is woken
//! through the poller's own waker (an eventfd on Linux). [`IoSleep`] is the I/O
//! thread's whole handshake built on it: woken for commands by any sender, and
//! for ring space by the consumer when it stalled waiting for that. The reactor
//! and the consumer call exactly these methods, and `tests/loom.rs` checks
//! them, so the model and the shipped code cannot drift apart.

use std::fmt;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::sync::{fence, AtomicBool, AtomicUsize, Condvar, Mutex};
use crate::sys::Wake;

/// A condition-variable wait that any number of threads can sleep on, rung by
/// the thread that makes their condition false.
///
/// A thread that cannot block here, because it runs an event loop, sleeps
/// *elsewhere*: it [announces](Bell::announce) itself as a sleeper, re-checks
/// its condition, returns to its loop, and [retracts](Bell::retract) once
/// the loop runs it again. A ring while it is announced is passed on to the
/// [notifier](Bell::set_notifier) (which wakes the loop), once per
/// announcement.
#[derive(Default)]
pub struct Bell {
    sleepers: AtomicUsize,
    rings: Mutex<u64>,
    cond: Condvar,
    /// Wakes a sleeper that sleeps elsewhere.
    notifier: Mutex<Option<Arc<dyn Wake>>>,
    /// The notifier was called since the last announcement.
    notified: AtomicBool,
}

impl fmt::Debug for Bell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bell")
            .field("sleepers", &self.sleepers)
            .field("notified", &self.notified)
            .finish_non_exhaustive()
    }
}

impl Bell {
    /// Creates a bell nobody waits on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks while `blocked()` holds, until [`Bell::ring`] or `timeout`.
    ///
    /// Returns early, without sleeping, if `blocked()` is already false. Spurious
    /// returns are possible; callers loop. `timeout: None` waits for a ring.
    pub fn wait_while(&self, blocked: impl FnOnce() -> bool, timeout: Option<Duration>) {
        let seen = *self.rings.lock();
        self.sleepers.fetch_add(1, SeqCst);
        fence(SeqCst);
        if blocked() {
            let mut rings = self.rings.lock();
            // A ring between `seen` and here bumped the counter: do not sleep.
            if *rings == seen {
                rings = match timeout {
                    Some(timeout) => self.cond.wait_timeout(rings, timeout),
                    None => self.cond.wait(rings),
                };
            }
            drop(rings);
        }
        self.sleepers.fetch_sub(1, SeqCst);
    }

    /// Wakes every thread in [`Bell::wait_while`], and the one that sleeps
    /// elsewhere (through the notifier, if it has not been told yet). Call it
    /// after making progress visible; it costs one fence and one load when
    /// nobody sleeps.
    pub fn ring(&self) {
        fence(SeqCst);
        // SeqCst, not Relaxed: ordered after an announcement's reset of
        // `notified` by the language's rules too, not only by the fences.
        if self.sleepers.load(SeqCst) > 0 {
            *self.rings.lock() += 1;
            self.cond.notify_all();
            if !self.notified.swap(true, SeqCst) {
                if let Some(notifier) = self.notifier.lock().as_ref() {
                    // A failed wake-up cannot be helped here; the sleeper's
                    // loop has its own timeout to fall back on.
                    let _ = notifier.wake();
                }
            }
        }
    }

    /// Sets what wakes a sleeper that sleeps elsewhere (`None`: nothing).
    pub fn set_notifier(&self, notifier: Option<Arc<dyn Wake>>) {
        *self.notifier.lock() = notifier;
    }

    /// Sleeper elsewhere: announces a sleep. Re-check the condition after
    /// this, as [`Bell::wait_while`] does; if it no longer holds, call
    /// [`Bell::retract`] at once, else go to sleep in the event loop, and
    /// call `retract` when woken (by the notifier or otherwise). Each
    /// announcement must be retracted exactly once.
    pub fn announce(&self) {
        self.notified.store(false, SeqCst);
        self.sleepers.fetch_add(1, SeqCst);
        fence(SeqCst);
    }

    /// Sleeper elsewhere: awake again; see [`Bell::announce`].
    pub fn retract(&self) {
        self.sleepers.fetch_sub(1, SeqCst);
    }
}

/// The announcement flag of a single thread that sleeps somewhere else (the I/O
/// thread, in the poller).
#[derive(Debug, Default)]
pub struct SleepFlag {
    sleeping: AtomicBool,
}

impl SleepFlag {
    /// Creates a flag for a thread that is awake.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sleeper: announces the intention to sleep. Re-check the condition after
    /// this, then either sleep or call [`SleepFlag::awake`].
    pub fn announce(&self) {
        self.sleeping.store(true, Relaxed);
        fence(SeqCst);
    }

    /// Sleeper: back at work (after sleeping, or instead of it).
    pub fn awake(&self) {
        self.sleeping.store(false, Relaxed);
    }

    /// Waker: true if the sleeper must be woken. Call it after making progress
    /// visible. Only the first caller per sleep gets `true`, so concurrent
    /// wakers make one wake-up between them.
    pub fn take_wake(&self) -> bool {
        fence(SeqCst);
        self.sleeping.load(Relaxed) && self.sleeping.swap(false, Relaxed)
    }
}

/// The I/O thread's sleep in the poller, and the two reasons to end it.
///
/// Senders publish commands, then call [`IoSleep::wake_for_commands`]. The
/// consumer releases delivery slots, then calls [`IoSleep::wake_for_room`],
/// which wakes the I/O thread only if it said it was stalled on the consumer:
/// a release per batch must not cost a syscall when nobody waits for it.
#[derive(Debug, Default)]
pub struct IoSleep {
    flag: SleepFlag,
    /// The sleeper waits for the consumer to release slots.
    stalled: AtomicBool,
}

impl IoSleep {
    /// Creates the handshake for an I/O thread that is awake.
    pub fn new() -> Self {
        Self::default()
    }

    /// I/O thread: announces a sleep (`stalled` if it waits for ring space),
    /// then re-checks with `work_arrived` whether a command or the space came
    /// in meanwhile. Returns true if it may sleep; either way, call
    /// [`IoSleep::awake`] once back at work.
    pub fn prepare(&self, stalled: bool, work_arrived: impl FnOnce() -> bool) -> bool {
        // Ordered before the announcement's fence, so that a consumer that
        // sees the announcement sees this too.
        self.stalled.store(stalled, Relaxed);
        self.flag.announce();
        !work_arrived()
    }

    /// I/O thread: back at work.
    pub fn awake(&self) {
        self.flag.awake();
    }

    /// Sender, after publishing commands: true if it must wake the I/O thread.
    pub fn wake_for_commands(&self) -> bool {
        self.flag.take_wake()
    }

    /// Consumer, after releasing slots: true if it must wake the I/O thread.
    pub fn wake_for_room(&self) -> bool {
        fence(SeqCst);
        self.stalled.load(Relaxed) && self.flag.take_wake()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn bell_does_not_sleep_when_condition_already_false() {
        let bell = Bell::new();
        let start = Instant::now();
        bell.wait_while(|| false, Some(Duration::from_secs(5)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn bell_ring_wakes_a_sleeper() {
        let bell = Arc::new(Bell::new());
        let ready = Arc::new(AtomicBool::new(false));
        let sleeper = {
            let (bell, ready) = (Arc::clone(&bell), Arc::clone(&ready));
            std::thread::spawn(move || {
                while !ready.load(SeqCst) {
                    bell.wait_while(|| !ready.load(SeqCst), None);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        ready.store(true, SeqCst);
        bell.ring();
        sleeper.join().unwrap();
    }

    #[test]
    fn sleep_flag_hands_out_one_wake_per_sleep() {
        let flag = SleepFlag::new();
        assert!(!flag.take_wake());
        flag.announce();
        assert!(flag.take_wake());
        assert!(!flag.take_wake());
        flag.awake();
        assert!(!flag.take_wake());
    }
}
