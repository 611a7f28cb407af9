//! Request/response: each connection sends a request, waits for the whole
//! reply, checks it and sends the next; the round trips completed in the
//! measured time are counted and go into the histogram.

use std::io;
use std::net::TcpStream;
use std::time::Instant;

use polling::{Events, Poller};

use super::exchange::Exchange;
use super::{slice_until, Shared, Tally, Worker, STALL};

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
    let window = worker.arrive();
    let mut alive = conns.len();
    for (key, conn) in conns.iter_mut().enumerate() {
        if let Err(message) = conn.send_next(&poller, key) {
            conn.close(&poller);
            alive -= 1;
            tally.fail(format!("connection {}: {message}", conn.id));
        }
    }
    let mut scratch = vec![0u8; SCRATCH];
    let mut events = Events::new();
    loop {
        let now = Instant::now();
        tally.tick(now);
        if alive == 0 || now >= window.end || shared.stopping() {
            break;
        }
        events.clear();
        poller.wait(&mut events, Some(slice_until(window.end, now)))?;
        for event in events.iter() {
            let key = event.key;
            let conn = &mut conns[key];
            if !conn.alive {
                continue;
            }
            let mut outcome = Ok(None);
            if event.writable {
                outcome = conn.on_writable(&poller, key).map(|()| None);
            }
            if event.readable && outcome.is_ok() {
                outcome = conn.on_readable(&mut scratch);
            }
            let outcome = match outcome {
                Ok(Some(done)) => {
                    if window.contains(done) {
                        tally.requests += 1;
                        tally.bytes_out += size;
                        tally.bytes_in += size;
                        let nanos = done.duration_since(conn.sent_at).as_nanos();
                        tally.latency.record(nanos as u64);
                    }
                    if done < window.end {
                        conn.send_next(&poller, key)
                    } else {
                        Ok(())
                    }
                }
                Ok(None) => Ok(()),
                Err(message) => Err(message),
            };
            if let Err(message) = outcome {
                conn.close(&poller);
                alive -= 1;
                tally.fail(format!("connection {}: {message}", conn.id));
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
