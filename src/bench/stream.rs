//! Streaming: every connection writes requests without waiting for replies
//! (as fast as the socket takes them) and reads what comes back, checking it.
//!
//! A worker's connections send the same cycle of consecutive requests, at
//! least 64 KiB of them, over and over, and check the replies against the
//! matching cycle of expected replies, wherever a read cuts them. Latency is
//! the time from the `write` of a chunk to the `read` that brings back its
//! last byte, so under load it includes the time spent queued in the
//! socket buffers of both ends.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use polling::{Event, Events, PollMode, Poller};

use super::message::{self, Verify};
use super::rr::SCRATCH;
use super::{Shared, Tally, Worker, STALL};

/// Requests per cycle: enough for 64 KiB.
const CYCLE_BYTES: usize = 64 << 10;
/// The most a connection writes, or reads, per readiness event, so that
/// one fast connection does not starve the others.
const BUDGET: usize = 256 << 10;
/// Writes remembered per connection for latency; later ones go unmeasured
/// until the replies catch up.
const MAX_MARKS: usize = 1024;

struct Flow {
    id: usize,
    stream: TcpStream,
    /// Bytes written and read since the start.
    sent: u64,
    received: u64,
    /// (bytes written after a `write`, when) for the writes not yet back.
    marks: VecDeque<(u64, Instant)>,
    last_read: Instant,
    alive: bool,
    /// It failed because its first reply (the first `size` bytes back) was
    /// wrong.
    first_reply_wrong: bool,
}

/// What every connection of a worker sends and expects.
struct Cycle {
    requests: Vec<u8>,
    /// Empty with `--verify none`.
    replies: Vec<u8>,
    size: u64,
    verify: Verify,
}

pub(super) fn run(
    shared: &Shared,
    worker: &mut Worker<'_>,
    tally: &mut Tally<'_>,
    poller: Poller,
    streams: Vec<(usize, TcpStream)>,
    index: usize,
) -> io::Result<()> {
    let config = &shared.config;
    let count = CYCLE_BYTES.div_ceil(config.size);
    let (requests, replies) =
        message::cycle(index, config.size, count, config.framing, config.verify);
    let cycle = Cycle {
        requests,
        replies,
        size: config.size as u64,
        verify: config.verify,
    };
    let now = Instant::now();
    let mut flows: Vec<Flow> = streams
        .into_iter()
        .map(|(id, stream)| Flow {
            id,
            stream,
            sent: 0,
            received: 0,
            marks: VecDeque::new(),
            last_read: now,
            alive: true,
            first_reply_wrong: false,
        })
        .collect();
    // Moved here, after `flows`, so that it is dropped (closed) before the streams.
    let poller = poller;
    for (key, flow) in flows.iter().enumerate() {
        // SAFETY: a stream must leave the poller before it is closed: failed
        // flows are deleted in `close`, the others at the end; on an early
        // return the poller is dropped before `flows`.
        unsafe { poller.add_with_mode(&flow.stream, Event::all(key), PollMode::Level)? };
    }
    worker.arrive();
    let mut alive = flows.len();
    let mut scratch = vec![0u8; SCRATCH];
    let mut events = Events::new();
    while alive > 0 && tally.wait(&poller, &mut events, shared.until())? {
        for event in events.iter() {
            let flow = &mut flows[event.key];
            if !flow.alive {
                continue;
            }
            let mut outcome = Ok(());
            if event.writable {
                outcome = flow.write_some(&cycle, shared, tally);
            }
            if event.readable && outcome.is_ok() {
                outcome = flow.read_some(&cycle, shared, tally, &mut scratch);
            }
            if let Err(message) = outcome {
                flow.close(&poller);
                alive -= 1;
                let message = format!("connection {}: {message}", flow.id);
                if flow.first_reply_wrong {
                    tally.fail_first_reply(message);
                } else {
                    tally.fail(message);
                }
            }
        }
    }
    let now = Instant::now();
    for flow in &mut flows {
        if !flow.alive {
            continue;
        }
        if flow.received < flow.sent && now.duration_since(flow.last_read) >= STALL {
            tally.stall(format!(
                "connection {}: nothing back for {:.1?} with {} bytes outstanding",
                flow.id,
                now.duration_since(flow.last_read),
                flow.sent - flow.received
            ));
        } else {
            shared
                .held
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        flow.close(&poller);
    }
    Ok(())
}

impl Flow {
    fn write_some(
        &mut self,
        cycle: &Cycle,
        shared: &Shared,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let len = cycle.requests.len();
        let mut budget = BUDGET;
        while budget > 0 {
            let from = (self.sent % len as u64) as usize;
            let to = (from + budget).min(len);
            match self.stream.write(&cycle.requests[from..to]) {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => {
                    let now = Instant::now();
                    self.sent += n as u64;
                    budget -= n;
                    if shared.in_window(now) {
                        tally.bytes_out += n as u64;
                    }
                    if self.marks.len() < MAX_MARKS {
                        self.marks.push_back((self.sent, now));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }

    fn read_some(
        &mut self,
        cycle: &Cycle,
        shared: &Shared,
        tally: &mut Tally,
        scratch: &mut [u8],
    ) -> Result<(), String> {
        let mut budget = BUDGET;
        while budget > 0 {
            let n = match self.stream.read(scratch) {
                Ok(0) => {
                    return Err(format!(
                        "the server closed the connection ({} of {} bytes back)",
                        self.received, self.sent
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("read: {e}")),
            };
            budget = budget.saturating_sub(n);
            let before = self.received;
            if before + n as u64 > self.sent {
                self.first_reply_wrong = before < cycle.size;
                return Err(format!(
                    "{} bytes back, more than the {} sent",
                    before + n as u64,
                    self.sent
                ));
            }
            if let Some(at) = mismatch(&cycle.replies, before, &scratch[..n]) {
                self.first_reply_wrong = before + (at as u64) < cycle.size;
                return Err(format!(
                    "a reply is not {} (--verify {}): byte {} of the stream differs",
                    cycle.verify.expectation(),
                    cycle.verify.name(),
                    before + at as u64
                ));
            }
            self.received += n as u64;
            let now = Instant::now();
            self.last_read = now;
            tally.completed += self.received / cycle.size - before / cycle.size;
            let counted = shared.in_window(now);
            if counted {
                tally.bytes_in += n as u64;
                tally.requests += self.received / cycle.size - before / cycle.size;
            }
            while let Some(&(upto, at)) = self.marks.front() {
                if upto > self.received {
                    break;
                }
                self.marks.pop_front();
                if counted {
                    tally
                        .latency
                        .record(now.duration_since(at).as_nanos() as u64);
                }
            }
        }
        Ok(())
    }

    fn close(&mut self, poller: &Poller) {
        self.alive = false;
        let _ = poller.delete(&self.stream);
    }
}

/// Where `chunk`, read at `offset` of a stream of `replies` repeated, departs
/// from it; `None` if it does not (or if `replies` is empty: no checking).
fn mismatch(replies: &[u8], offset: u64, chunk: &[u8]) -> Option<usize> {
    if replies.is_empty() {
        return None;
    }
    let mut at = (offset % replies.len() as u64) as usize;
    let mut done = 0;
    while done < chunk.len() {
        let n = (replies.len() - at).min(chunk.len() - done);
        if replies[at..at + n] != chunk[done..done + n] {
            let i = (0..n).find(|&i| replies[at + i] != chunk[done + i]);
            return Some(done + i.unwrap_or(0));
        }
        done += n;
        at = 0;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::mismatch;

    #[test]
    fn a_cycle_checks_across_its_wrap() {
        let replies: Vec<u8> = (0..10).collect();
        let stream: Vec<u8> = (0..35).map(|i| i % 10).collect();
        for from in 0..35 {
            for to in from..=35 {
                assert_eq!(mismatch(&replies, from as u64, &stream[from..to]), None);
            }
        }
        let mut bad = stream.clone();
        bad[23] = 99;
        assert_eq!(mismatch(&replies, 5, &bad[5..30]), Some(18));
        assert_eq!(mismatch(&replies, 0, &bad), Some(23));
        assert_eq!(mismatch(&[], 3, &bad), None);
    }
}
