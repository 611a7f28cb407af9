//! Decoding framed messages allocates nothing in steady state: large messages
//! are assembled in buffers from the pool, which the consumer gives back, and
//! whatever a decoder keeps between reads comes from the pool too. Counted with
//! a global allocator, which is why this test has a binary of its own.
#![cfg(not(loom))]

use _rsepoll::framing::{envelope, Decoder, Frame, Framing, PrefixWidth};
use _rsepoll::pool::BufferPool;

mod counting_alloc;

/// Allocations this thread makes while running `f`.
fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = counting_alloc::allocations();
    counting_alloc::count_this_thread();
    f();
    counting_alloc::stop_counting_this_thread();
    counting_alloc::allocations() - before
}

const SLOT: usize = 4096;
const MAX_MESSAGE: usize = 256 * 1024;

/// A connection's stream of messages of assorted sizes, small and large,
/// framed for `framing`.
fn stream(framing: Framing) -> Vec<u8> {
    let sizes = [10, 5000, 0, 100_000, 3000, MAX_MESSAGE, 70, SLOT + 1];
    let mut stream = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let envelope = envelope(framing, size).unwrap();
        stream.extend_from_slice(envelope.header());
        stream.extend(std::iter::repeat_n(b'a' + i as u8, size));
        stream.extend_from_slice(envelope.trailer());
    }
    stream
}

#[test]
fn steady_state_decoding_allocates_nothing() {
    for framing in [Framing::Line, Framing::Length(PrefixWidth::Four)] {
        let stream = stream(framing);
        let mut pool = BufferPool::new(SLOT, MAX_MESSAGE, 64 * MAX_MESSAGE);
        let mut decoder = Decoder::new(framing, MAX_MESSAGE, SLOT);
        // Where the "consumer" keeps owned messages until it is done with them:
        // reserved once, as ring slots are.
        let mut consumed = Vec::with_capacity(64);
        let mut messages = 0;
        let mut bytes = 0;
        // Reads of varying sizes that split headers, lines and payloads; every
        // seventh offer is refused, as by a full ring, and pumped later.
        let mut run = |pool: &mut BufferPool| {
            let mut offers = 0usize;
            let mut read_sizes = [1, 3000, 7, 65536, 4096, 2].iter().cycle();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let (read, after) = rest.split_at((*read_sizes.next().unwrap()).min(rest.len()));
                rest = after;
                let mut offer = |message: Frame<'_>| {
                    offers += 1;
                    if offers % 7 == 0 {
                        return Err(message.into());
                    }
                    messages += 1;
                    bytes += message.len();
                    if let Frame::Owned(buf) = message {
                        consumed.push(buf);
                    }
                    Ok(())
                };
                decoder.feed(read, pool, &mut offer).unwrap();
                while decoder.has_backlog() {
                    decoder.pump(pool, &mut offer).unwrap();
                }
                for buf in consumed.drain(..) {
                    pool.give(buf);
                }
            }
        };
        run(&mut pool);
        run(&mut pool);
        let misses = pool.misses();
        let allocations = allocations_during(|| {
            for _ in 0..20 {
                run(&mut pool);
            }
        });
        assert_eq!(allocations, 0, "{framing:?}");
        assert_eq!(pool.misses(), misses);
        assert_eq!(messages, 22 * 8);
        assert!(bytes > 22 * MAX_MESSAGE);
        assert_eq!(decoder.heap_capacity(), 0);
    }
}
