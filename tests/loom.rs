//! Model checks of the ring and of the sleep/wake handshakes, under every
//! interleaving loom explores. Run with:
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test --release --test loom
//! ```
//!
//! Waits here have no timeout: a lost wake-up shows up as a deadlock, which
//! loom reports as a failure.
#![cfg(loom)]

use _rsepoll::handover::Arrivals;
use _rsepoll::ring::{ring, Consumer, Producer};
use _rsepoll::sys::Wake;
use _rsepoll::wake::{Bell, IoSleep};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

fn push(tx: &mut Producer<usize>, value: usize) -> bool {
    match tx.vacant() {
        Some(mut slot) => {
            slot.with_mut(|v| *v = value);
            slot.stage();
            true
        }
        None => false,
    }
}

fn take(rx: &mut Consumer<usize>) -> Option<usize> {
    rx.take_with(|v| *v)
}

/// Items published one by one through a ring smaller than the stream arrive
/// complete and in order, and a slot is never read while being written.
#[test]
fn ring_delivers_every_item_in_order() {
    loom::model(|| {
        let (mut tx, mut rx) = ring(2, || 0usize);
        let producer = thread::spawn(move || {
            for value in 1..=3 {
                while !push(&mut tx, value) {
                    thread::yield_now();
                }
                tx.publish();
            }
        });
        let mut expected = 1;
        while expected <= 3 {
            match take(&mut rx) {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                    rx.release();
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

/// Lent bytes: the consumer reads memory the producer's side owns (as the
/// I/O thread writes a `bytes` object lent by `send_message`), and the owner
/// reuses that memory once `ReleaseWatch` says the slot is released. Loom
/// reports a data race if the release does not order the read before the
/// owner's write.
#[test]
fn a_released_slot_frees_what_its_item_borrowed() {
    loom::model(|| {
        let lent = Arc::new(loom::cell::UnsafeCell::new(7u8));
        let (mut tx, mut rx) = ring(2, || 0usize);
        let watch = tx.release_watch();
        let owner = {
            let lent = Arc::clone(&lent);
            thread::spawn(move || {
                let mut slot = tx.vacant().expect("an empty ring");
                slot.with_mut(|v| *v = 1);
                let position = slot.position();
                slot.stage();
                tx.publish();
                while !watch.has_released(position) {
                    thread::yield_now();
                }
                // SAFETY: the consumer is done with the loan (checked above).
                lent.with_mut(|byte| unsafe { *byte = 0 });
            })
        };
        loop {
            let read = rx.take_with(|_| {
                // SAFETY: the owner writes only after the slot is released.
                lent.with(|byte| unsafe { *byte })
            });
            match read {
                Some(byte) => {
                    assert_eq!(byte, 7);
                    rx.release();
                    break;
                }
                None => thread::yield_now(),
            }
        }
        owner.join().unwrap();
    });
}

/// Batches: two slots staged and published with one store, consumed and
/// released with one store.
#[test]
fn ring_batches_publish_and_release_together() {
    loom::model(|| {
        let (mut tx, mut rx) = ring(2, || 0usize);
        let producer = thread::spawn(move || {
            for batch in [[1, 2], [3, 4]] {
                while tx.free() < 2 {
                    thread::yield_now();
                }
                for value in batch {
                    assert!(push(&mut tx, value));
                }
                tx.publish();
            }
        });
        let mut expected = 1;
        while expected <= 4 {
            while let Some(value) = take(&mut rx) {
                assert_eq!(value, expected);
                expected += 1;
            }
            rx.release();
            thread::yield_now();
        }
        producer.join().unwrap();
    });
}

/// The Python side's wait for deliveries: it sleeps on a `Bell` when the ring
/// is empty; the I/O thread rings it after each publish.
#[test]
fn bell_never_misses_a_publish() {
    loom::model(|| {
        let (mut tx, mut rx) = ring(2, || 0usize);
        let bell = Arc::new(Bell::new());
        let producer = {
            let bell = Arc::clone(&bell);
            thread::spawn(move || {
                for value in 1..=2 {
                    assert!(push(&mut tx, value));
                    tx.publish();
                    bell.ring();
                }
            })
        };
        let mut expected = 1;
        while expected <= 2 {
            match take(&mut rx) {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                }
                None => bell.wait_while(|| rx.is_empty(), None),
            }
        }
        producer.join().unwrap();
    });
}

/// The poller's wake-up, as an eventfd behaves: a wake before the wait is kept.
struct EventFd {
    pending: Mutex<bool>,
    cond: Condvar,
}

impl EventFd {
    fn new() -> Self {
        EventFd {
            pending: Mutex::new(false),
            cond: Condvar::new(),
        }
    }

    fn wake(&self) {
        *self.pending.lock().unwrap() = true;
        self.cond.notify_one();
    }

    fn wait(&self) {
        let mut pending = self.pending.lock().unwrap();
        while !*pending {
            pending = self.cond.wait(pending).unwrap();
        }
        *pending = false;
    }
}

impl Wake for EventFd {
    fn wake(&self) -> std::io::Result<()> {
        EventFd::wake(self);
        Ok(())
    }
}

/// The Python side under asyncio sleeps in the event loop, not on the bell:
/// it announces itself, re-checks the ring, and waits for the notifier (the
/// loop's readable socket, an `EventFd` here); the I/O thread rings the bell
/// after each publish, as always.
#[test]
fn a_sleeper_elsewhere_never_misses_a_publish() {
    loom::model(|| {
        let (mut tx, mut rx) = ring(2, || 0usize);
        let bell = Arc::new(Bell::new());
        // Shared through std's `Arc`, as the bell holds its notifier; the
        // state inside is loom's.
        let notifier = std::sync::Arc::new(EventFd::new());
        bell.set_notifier(Some(
            std::sync::Arc::clone(&notifier) as std::sync::Arc<dyn Wake>
        ));
        let producer = {
            let bell = Arc::clone(&bell);
            thread::spawn(move || {
                for value in 1..=2 {
                    assert!(push(&mut tx, value));
                    tx.publish();
                    bell.ring();
                }
            })
        };
        let mut expected = 1;
        while expected <= 2 {
            match take(&mut rx) {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                }
                None => {
                    bell.announce();
                    if rx.is_empty() {
                        notifier.wait();
                    }
                    bell.retract();
                }
            }
        }
        producer.join().unwrap();
    });
}

/// The I/O thread's wait for commands, as `Reactor::wait` makes it: it
/// prepares its sleep with `IoSleep`, re-checking the command ring, then
/// blocks in the poller; a sender publishes, then wakes the poller only if
/// `wake_for_commands` says it sleeps.
#[test]
fn io_thread_never_misses_a_command() {
    loom::model(|| {
        let (mut tx, mut rx) = ring(2, || 0usize);
        let sleep = Arc::new(IoSleep::new());
        let poller = Arc::new(EventFd::new());
        let sender = {
            let (sleep, poller) = (Arc::clone(&sleep), Arc::clone(&poller));
            thread::spawn(move || {
                for value in 1..=2 {
                    assert!(push(&mut tx, value));
                    tx.publish();
                    if sleep.wake_for_commands() {
                        poller.wake();
                    }
                }
            })
        };
        let mut expected = 1;
        while expected <= 2 {
            if let Some(value) = take(&mut rx) {
                assert_eq!(value, expected);
                expected += 1;
                continue;
            }
            if sleep.prepare(false, || !rx.is_empty()) {
                poller.wait();
            }
            sleep.awake();
        }
        sender.join().unwrap();
    });
}

/// The I/O thread stalled on a full delivery ring, as `Reactor::wait` makes
/// it: it prepares a stalled sleep, re-checking for space; the consumer
/// releases slots and wakes it through `wake_for_room` (`Running::release`),
/// which wakes only a stalled sleeper.
#[test]
fn stalled_io_thread_is_woken_by_release() {
    loom::model(|| {
        let (mut tx, mut rx) = ring(1, || 0usize);
        let sleep = Arc::new(IoSleep::new());
        let poller = Arc::new(EventFd::new());
        let io_thread = {
            let (sleep, poller) = (Arc::clone(&sleep), Arc::clone(&poller));
            thread::spawn(move || {
                for value in 1..=2 {
                    loop {
                        if push(&mut tx, value) {
                            tx.publish();
                            break;
                        }
                        if sleep.prepare(true, || tx.free() > 0) {
                            poller.wait();
                        }
                        sleep.awake();
                    }
                }
            })
        };
        let mut expected = 1;
        while expected <= 2 {
            match take(&mut rx) {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                    rx.release();
                    if sleep.wake_for_room() {
                        poller.wake();
                    }
                }
                None => thread::yield_now(),
            }
        }
        io_thread.join().unwrap();
    });
}

/// An engine's hand-over list (`handover::Arrivals`), as the accepting engine
/// and an ending engine use it: the dealer hands a socket over while the
/// engine takes what arrived, then closes the list (`finish`, or `fail`,
/// which passes what it finds on). The socket is taken, found at the close,
/// or given back to the dealer, exactly once; and once the list is closed its
/// flag is down, so that the ending engine, which re-checks the flag before
/// each sleep, does sleep. (With the flag set after unlocking, a hand-over
/// overtaken by the close leaves it up for good.)
#[test]
fn a_closed_hand_over_list_is_not_flagged() {
    loom::model(|| {
        let arrivals = Arc::new(Arrivals::new());
        let dealer = {
            let arrivals = Arc::clone(&arrivals);
            thread::spawn(move || arrivals.hand_over(7usize).is_err())
        };
        let mut taken = Vec::new();
        arrivals.take(&mut taken);
        let parked = arrivals.close();
        let refused = dealer.join().unwrap();
        assert_eq!(taken.len() + parked.len() + usize::from(refused), 1);
        assert!(
            !arrivals.may_have_arrivals(),
            "the flag of a closed list is up"
        );
    });
}

/// The engine's wait for hand-overs, as `Reactor::wait` makes it: it takes
/// what arrived, prepares its sleep re-checking the flag, then blocks in the
/// poller; the dealer hands over, then wakes the poller only if
/// `wake_for_commands` says the engine sleeps (`Shared::hand_over`).
#[test]
fn io_thread_never_misses_a_hand_over() {
    loom::model(|| {
        let arrivals = Arc::new(Arrivals::new());
        let sleep = Arc::new(IoSleep::new());
        let poller = Arc::new(EventFd::new());
        let dealer = {
            let (arrivals, sleep, poller) = (
                Arc::clone(&arrivals),
                Arc::clone(&sleep),
                Arc::clone(&poller),
            );
            thread::spawn(move || {
                arrivals.hand_over(1usize).unwrap();
                if sleep.wake_for_commands() {
                    poller.wake();
                }
            })
        };
        let mut taken = Vec::new();
        loop {
            arrivals.take(&mut taken);
            if !taken.is_empty() {
                break;
            }
            if sleep.prepare(false, || arrivals.may_have_arrivals()) {
                poller.wait();
            }
            sleep.awake();
        }
        assert_eq!(taken, [1]);
        dealer.join().unwrap();
    });
}
