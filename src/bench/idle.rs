//! Idle connections: open them all, check each with one round trip, hold
//! them for the duration without a byte either way (a byte or an EOF from
//! the server meanwhile is an error), then check each again.
//!
//! Both checks count as requests and go into the histogram; `held` in the
//! report is the connections that passed both.

use std::io::{self, ErrorKind, Read};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use polling::{Events, Poller};

use super::exchange::Exchange;
use super::rr::SCRATCH;
use super::{Shared, Tally, Worker, GRACE};

pub(super) fn run(
    shared: &Shared,
    worker: &mut Worker<'_>,
    tally: &mut Tally<'_>,
    poller: Poller,
    streams: Vec<(usize, TcpStream)>,
    connect_deadline: Instant,
) -> io::Result<()> {
    let config = &shared.config;
    let mut conns: Vec<Exchange> = streams
        .into_iter()
        .map(|(id, stream)| Exchange::new(id, stream, config))
        .collect();
    // Moved here, after `conns`, so that it is dropped (closed) before the streams.
    let poller = poller;
    for (key, conn) in conns.iter().enumerate() {
        conn.register(&poller, key)?;
    }
    let mut idle = Idle {
        shared,
        poller,
        scratch: vec![0u8; SCRATCH],
        events: Events::new(),
    };
    idle.check(&mut conns, tally, connect_deadline, "first")?;
    let end = worker
        .arrive()
        .expect("idle mode has no warm-up: the window is fixed when the gate opens")
        .end;
    // Nothing to hold once every connection has failed: the run ends early.
    if conns.iter().any(|conn| conn.alive) {
        idle.hold(&mut conns, tally, end)?;
        idle.check(&mut conns, tally, end + GRACE, "second")?;
    }
    for conn in &mut conns {
        if conn.alive {
            shared.held.fetch_add(1, Relaxed);
            conn.close(&idle.poller);
        }
    }
    Ok(())
}

struct Idle<'a> {
    shared: &'a Shared,
    poller: Poller,
    scratch: Vec<u8>,
    events: Events,
}

impl Idle<'_> {
    /// One round trip on every live connection, all at once; a connection
    /// without its reply by `deadline` fails.
    fn check(
        &mut self,
        conns: &mut [Exchange],
        tally: &mut Tally<'_>,
        deadline: Instant,
        which: &str,
    ) -> io::Result<()> {
        let mut pending = 0;
        for (key, conn) in conns.iter_mut().enumerate() {
            if !conn.alive {
                continue;
            }
            match conn.send_next(&self.poller, key) {
                Ok(()) => pending += 1,
                Err(message) => conn.fail(&self.poller, tally, &message),
            }
        }
        while pending > 0 && tally.wait(&self.poller, &mut self.events, Some(deadline))? {
            for event in self.events.iter() {
                let conn = &mut conns[event.key];
                if !conn.alive || !conn.in_flight {
                    continue;
                }
                match conn.on_event(&self.poller, event, &mut self.scratch) {
                    Ok(None) => continue,
                    Ok(Some(done)) => {
                        let size = self.shared.config.size as u64;
                        tally.requests += 1;
                        tally.bytes_out += size;
                        tally.bytes_in += size;
                        let nanos = done.duration_since(conn.sent_at).as_nanos();
                        tally.latency.record(nanos as u64);
                    }
                    Err(message) => conn.fail(&self.poller, tally, &message),
                }
                pending -= 1;
            }
        }
        if self.shared.stopping() {
            return Ok(());
        }
        let now = Instant::now();
        for conn in conns.iter_mut().filter(|c| c.alive && c.in_flight) {
            let message = format!("{} at the {which} check", conn.stall(now));
            conn.close(&self.poller);
            tally.fail(message);
        }
        Ok(())
    }

    /// Waits until `end`; a connection on which anything arrives fails.
    fn hold(
        &mut self,
        conns: &mut [Exchange],
        tally: &mut Tally<'_>,
        end: Instant,
    ) -> io::Result<()> {
        while tally.wait(&self.poller, &mut self.events, Some(end))? {
            for event in self.events.iter() {
                let conn = &mut conns[event.key];
                if !conn.alive {
                    continue;
                }
                let message = match conn.stream.read(&mut self.scratch) {
                    Ok(0) => "the server closed the connection while it was idle".to_string(),
                    Ok(n) => format!("{n} bytes arrived while the connection was idle"),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => format!("read while idle: {e}"),
                };
                conn.fail(&self.poller, tally, &message);
            }
        }
        Ok(())
    }
}
