//! Counters of a running server, readable from any thread at any time.
//!
//! The I/O thread counts in plain integers ([`Counters`]) on its hot path and
//! copies them into shared atomics ([`Stats`]) once per turn of its loop, so
//! counting costs no atomic operation per byte or message. The only counter
//! the other side keeps is `messages_sent`, bumped by each accepted send.
//! A [`Snapshot`] is a consistent-enough read for monitoring: each field is
//! exact as of some recent turn, not all of them as of the same instant.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

use crate::close_reason::CloseReason;

/// What the I/O thread counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted and delivered as `Opened`.
    pub connections_accepted: u64,
    /// Connections reported `Closed`.
    pub connections_closed: u64,
    /// Connections accepted and closed at once (over `max_connections`, or
    /// out of file descriptors).
    pub connections_rejected: u64,
    /// Bytes read from sockets (framing included), discarded input excluded.
    pub bytes_received: u64,
    /// Bytes written to sockets.
    pub bytes_sent: u64,
    /// `Data` deliveries: messages in the framed modes, reads in raw mode.
    pub messages_received: u64,
    /// The most deliveries the ring held at once.
    pub ring_high_water: u64,
    /// Closes by reason, indexed like [`CloseReason::ALL`].
    pub closes: [u64; CloseReason::ALL.len()],
}

impl Counters {
    /// Counts a `Closed` report.
    pub fn closed(&mut self, reason: CloseReason) {
        self.connections_closed += 1;
        self.closes[reason_index(reason)] += 1;
    }

    /// Counts a connection turned away with `reason` before it was opened.
    pub fn rejected(&mut self, reason: CloseReason) {
        self.connections_rejected += 1;
        self.closes[reason_index(reason)] += 1;
    }
}

fn reason_index(reason: CloseReason) -> usize {
    CloseReason::ALL
        .iter()
        .position(|&r| r == reason)
        .expect("every reason is in ALL")
}

/// The shared copy, written by the I/O thread once per turn.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    closed: AtomicU64,
    rejected: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    messages_received: AtomicU64,
    ring_high_water: AtomicU64,
    closes: [AtomicU64; CloseReason::ALL.len()],
    /// Written by senders, on their own cache line.
    messages_sent: CachePadded<AtomicU64>,
}

impl Stats {
    /// Copies the I/O thread's counters.
    pub fn publish(&self, counters: &Counters) {
        self.accepted.store(counters.connections_accepted, Relaxed);
        self.closed.store(counters.connections_closed, Relaxed);
        self.rejected.store(counters.connections_rejected, Relaxed);
        self.bytes_received.store(counters.bytes_received, Relaxed);
        self.bytes_sent.store(counters.bytes_sent, Relaxed);
        self.messages_received
            .store(counters.messages_received, Relaxed);
        self.ring_high_water
            .store(counters.ring_high_water, Relaxed);
        for (shared, &count) in self.closes.iter().zip(&counters.closes) {
            shared.store(count, Relaxed);
        }
    }

    /// Counts one message accepted by `send_message`.
    pub fn message_sent(&self) {
        self.messages_sent.fetch_add(1, Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let mut closes = [0; CloseReason::ALL.len()];
        for (count, shared) in closes.iter_mut().zip(&self.closes) {
            *count = shared.load(Relaxed);
        }
        let counters = Counters {
            connections_accepted: self.accepted.load(Relaxed),
            connections_closed: self.closed.load(Relaxed),
            connections_rejected: self.rejected.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            messages_received: self.messages_received.load(Relaxed),
            ring_high_water: self.ring_high_water.load(Relaxed),
            closes,
        };
        Snapshot {
            counters,
            messages_sent: self.messages_sent.load(Relaxed),
        }
    }
}

/// Every counter, as read by [`Stats::snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The I/O thread's counters.
    pub counters: Counters,
    /// Messages accepted by `send_message`.
    pub messages_sent: u64,
}

impl Snapshot {
    /// The counters of two I/O threads as one server's: sums, but the ring
    /// high-water mark is the higher one (each thread has its own ring).
    pub fn merge(&self, other: &Snapshot) -> Snapshot {
        let (a, b) = (&self.counters, &other.counters);
        let mut closes = a.closes;
        for (count, more) in closes.iter_mut().zip(b.closes) {
            *count += more;
        }
        Snapshot {
            counters: Counters {
                connections_accepted: a.connections_accepted + b.connections_accepted,
                connections_closed: a.connections_closed + b.connections_closed,
                connections_rejected: a.connections_rejected + b.connections_rejected,
                bytes_received: a.bytes_received + b.bytes_received,
                bytes_sent: a.bytes_sent + b.bytes_sent,
                messages_received: a.messages_received + b.messages_received,
                ring_high_water: a.ring_high_water.max(b.ring_high_water),
                closes,
            },
            messages_sent: self.messages_sent + other.messages_sent,
        }
    }

    /// Connections open now: accepted and not yet reported closed.
    pub fn connections_open(&self) -> u64 {
        // The two are published one after the other: a reader may see a close
        // before the accept it belongs to.
        self.counters
            .connections_accepted
            .saturating_sub(self.counters.connections_closed)
    }

    /// Closes of each reason, by name.
    pub fn closes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CloseReason::ALL
            .iter()
            .zip(self.counters.closes)
            .map(|(reason, count)| (reason.name(), count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_what_was_published() {
        let stats = Stats::default();
        let mut counters = Counters {
            connections_accepted: 3,
            bytes_received: 10,
            ..Counters::default()
        };
        counters.closed(CloseReason::Peer);
        counters.closed(CloseReason::TooLarge);
        counters.rejected(CloseReason::Limit);
        stats.publish(&counters);
        stats.message_sent();
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.counters, counters);
        assert_eq!(snapshot.messages_sent, 1);
        assert_eq!(snapshot.connections_open(), 1);
        let closes: Vec<_> = snapshot.closes().filter(|&(_, n)| n > 0).collect();
        assert_eq!(closes, [("peer", 1), ("too_large", 1), ("limit", 1)]);
    }
}
