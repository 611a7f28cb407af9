//! The ring between two real threads: millions of items, each one checked, with
//! batches of varying size on both sides. (The exhaustive check of the memory
//! ordering is `tests/loom.rs`; this one runs at full speed on real hardware.)
#![cfg(not(loom))]

use std::thread;

use _rsepoll::ring::ring;

const ITEMS: u64 = 5_000_000;

#[test]
fn millions_of_items_cross_threads_in_order() {
    // Slots carry a payload, as delivery slots do, so a torn read would show.
    let (mut tx, mut rx) = ring(256, || [0u64; 4]);
    let producer = thread::spawn(move || {
        let mut next = 0u64;
        let mut batch = 1;
        while next < ITEMS {
            for _ in 0..batch {
                if next == ITEMS {
                    break;
                }
                let Some(mut slot) = tx.vacant() else { break };
                slot.with_mut(|s| *s = [next, !next, next.rotate_left(17), next ^ 0x5555]);
                slot.stage();
                next += 1;
            }
            tx.publish();
            batch = batch % 61 + 1;
            if tx.free() == 0 {
                thread::yield_now();
            }
        }
    });
    let mut expected = 0u64;
    let mut release_every = 1;
    while expected < ITEMS {
        let mut taken = 0;
        while let Some(item) = rx.take_with(|s| *s) {
            assert_eq!(
                item,
                [
                    expected,
                    !expected,
                    expected.rotate_left(17),
                    expected ^ 0x5555
                ],
                "item {expected}"
            );
            expected += 1;
            taken += 1;
            if taken % release_every == 0 {
                rx.release();
            }
        }
        rx.release();
        release_every = release_every % 37 + 1;
        if taken == 0 {
            thread::yield_now();
        }
    }
    producer.join().unwrap();
    assert!(rx.take_with(|_| ()).is_none());
}
