//! Request/response: each connection sends a request, waits for the whole
//! reply, checks it and sends the next; the round trips completed in the
//! measured time are counted and go into the histogram.

use std::io;
use std::net::TcpStream;
use std::time::Instant;

use polling::{Events, Poller};

use super::exchange::Exchange;
use super::{Shared, Tally, Worker, STALL};

/// Bytes read per `read` call (a reply may take several).
pub(super) const SCRATCH: usize = 64 << 10;

pub(super) fn run(
    shared: &Shared,
    worker: &mut Worker<'_>,
    tally: &mut Tally<'_>,
    poller: Poller,
    streams: Vec<(usize, TcpStream)>,
) -> io::Result<()> {
    let config = &shared.config;
    let size = config.size as u64;
    let mut conns: Vec<Exchange> = streams
        .into_iter()
        .map(|(id, stream)| Exchange::new(id, stream, config))
        .collect();
    // Moved here, after `conns`, so that it is dropped (closed) before the streams.
    let poller = poller;
    for (key, conn) in conns.iter().enumerate() {
        conn.register(&poller, key)?;
    }
    worker.arrive();
    let mut alive = conns.len();
    for (key, conn) in conns.iter_mut().enumerate() {
        if let Err(message) = conn.send_next(&poller, key) {
            conn.fail(&poller, tally, &message);
            alive -= 1;
        }
    }
    let mut scratch = vec![0u8; SCRATCH];
    let mut events = Events::new();
    while alive > 0 && tally.wait(&poller, &mut events, shared.until())? {
        for event in events.iter() {
            let conn = &mut conns[event.key];
            if !conn.alive {
                continue;
            }
            let outcome = match conn.on_event(&poller, event, &mut scratch) {
                Ok(Some(done)) => {
                    tally.completed += 1;
                    if shared.in_window(done) {
                        tally.requests += 1;
                        tally.bytes_out += size;
                        tally.bytes_in += size;
                        let nanos = done.duration_since(conn.sent_at).as_nanos();
                        tally.latency.record(nanos as u64);
                    }
                    if shared.until().is_none_or(|end| done < end) {
                        conn.send_next(&poller, event.key)
                    } else {
                        Ok(())
                    }
                }
                Ok(None) => Ok(()),
                Err(message) => Err(message),
            };
            if let Err(message) = outcome {
                conn.fail(&poller, tally, &message);
                alive -= 1;
            }
        }
    }
    let now = Instant::now();
    for conn in &mut conns {
        if !conn.alive {
            continue;
        }
        if conn.in_flight && now.duration_since(conn.sent_at) >= STALL {
            tally.stall(conn.stall(now));
        } else {
            shared
                .held
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        conn.close(&poller);
    }
    Ok(())
}
