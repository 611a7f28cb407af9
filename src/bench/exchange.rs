//! One connection's request/response round trips (rr and idle modes).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use polling::{Event, PollMode, Poller};

use super::message::{Message, Verify};
use super::{Config, Tally};

/// A connection that sends one request at a time and checks each reply.
pub(super) struct Exchange {
    pub(super) id: usize,
    pub(super) stream: TcpStream,
    message: Message,
    verify: Verify,
    seq: u64,
    written: usize,
    received: usize,
    /// When the request in flight was sent.
    pub(super) sent_at: Instant,
    /// A request is out and its reply not complete.
    pub(super) in_flight: bool,
    wants_write: bool,
    /// Not failed (a failed connection has left the poller).
    pub(super) alive: bool,
    /// It failed because its first reply was wrong.
    first_reply_wrong: bool,
}

impl Exchange {
    pub(super) fn new(id: usize, stream: TcpStream, config: &Config) -> Exchange {
        Exchange {
            id,
            stream,
            message: Message::new(id, config.size, config.framing, config.verify),
            verify: config.verify,
            seq: 0,
            written: 0,
            received: 0,
            sent_at: Instant::now(),
            in_flight: false,
            wants_write: false,
            alive: true,
            first_reply_wrong: false,
        }
    }

    /// Registers the connection with `poller` under `key`, for reading.
    pub(super) fn register(&self, poller: &Poller, key: usize) -> std::io::Result<()> {
        // SAFETY: a stream must leave the poller before it is closed. Callers
        // delete each failed stream in `close`, and the others before they
        // return; on an early return their poller is a local declared after
        // the streams' vector, so it is dropped (closed) first.
        unsafe { poller.add_with_mode(&self.stream, Event::readable(key), PollMode::Level) }
    }

    /// Stamps the next sequence number into the request and starts sending it.
    pub(super) fn send_next(&mut self, poller: &Poller, key: usize) -> Result<(), String> {
        self.seq += 1;
        self.message.stamp(self.seq);
        self.written = 0;
        self.received = 0;
        self.in_flight = true;
        self.sent_at = Instant::now();
        self.on_writable(poller, key)
    }

    /// Writes what the socket takes of the request.
    fn on_writable(&mut self, poller: &Poller, key: usize) -> Result<(), String> {
        let request = self.message.request();
        while self.written < request.len() {
            match self.stream.write(&request[self.written..]) {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !self.wants_write {
                        self.wants_write = true;
                        self.interest(poller, Event::all(key))?;
                    }
                    return Ok(());
                }
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        if self.wants_write {
            self.wants_write = false;
            self.interest(poller, Event::readable(key))?;
        }
        Ok(())
    }

    fn interest(&self, poller: &Poller, interest: Event) -> Result<(), String> {
        poller
            .modify_with_mode(&self.stream, interest, PollMode::Level)
            .map_err(|e| format!("poller: {e}"))
    }

    /// Handles readiness: writes what is left of the request, reads what has
    /// come of the reply; returns when the reply completed, if it did.
    pub(super) fn on_event(
        &mut self,
        poller: &Poller,
        event: Event,
        scratch: &mut [u8],
    ) -> Result<Option<Instant>, String> {
        if event.writable {
            self.on_writable(poller, event.key)?;
        }
        if event.readable {
            return self.on_readable(scratch);
        }
        Ok(None)
    }

    /// Reads what has come of the reply, checking it; returns when the reply
    /// completed, if it did.
    fn on_readable(&mut self, scratch: &mut [u8]) -> Result<Option<Instant>, String> {
        let size = self.message.len();
        loop {
            let n = match self.stream.read(scratch) {
                Ok(0) => {
                    return Err(format!(
                        "the server closed the connection ({} of {size} bytes of the reply \
                         to request {} received)",
                        self.received, self.seq
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(format!("read: {e}")),
            };
            if !self.in_flight || self.received + n > size {
                self.first_reply_wrong = self.in_flight && self.seq == 1;
                return Err(format!(
                    "{} bytes back for request {}, which is {size} bytes",
                    self.received + n,
                    self.seq
                ));
            }
            let chunk = &scratch[..n];
            if !self.message.check(self.received, chunk) {
                self.first_reply_wrong = self.seq == 1;
                return Err(self.mismatch(chunk));
            }
            self.received += n;
            if self.received == size {
                self.in_flight = false;
                return Ok(Some(Instant::now()));
            }
        }
    }

    /// Describes where `chunk`, read at `self.received`, departs from the reply.
    fn mismatch(&self, chunk: &[u8]) -> String {
        let expected = &self.message.expected()[self.received..];
        let at = chunk
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        format!(
            "the reply to request {} is not {} (--verify {}): byte {} is {:#04x}, \
             expected {:#04x}",
            self.seq,
            self.verify.expectation(),
            self.verify.name(),
            self.received + at,
            chunk[at],
            expected[at]
        )
    }

    /// How far the request in flight got, for a stall report.
    pub(super) fn stall(&self, now: Instant) -> String {
        format!(
            "connection {}: request {} unanswered for {:.1?} ({} of {} bytes sent, {} back)",
            self.id,
            self.seq,
            now.duration_since(self.sent_at),
            self.written,
            self.message.len(),
            self.received
        )
    }

    /// Counts the connection as failed, for `message`, and closes it.
    pub(super) fn fail(&mut self, poller: &Poller, tally: &mut Tally<'_>, message: &str) {
        self.close(poller);
        let message = format!("connection {}: {message}", self.id);
        if self.first_reply_wrong {
            tally.fail_first_reply(message);
        } else {
            tally.fail(message);
        }
    }

    /// Leaves the poller: a failed connection, or the end of the run.
    pub(super) fn close(&mut self, poller: &Poller) {
        if self.alive {
            self.alive = false;
            let _ = poller.delete(&self.stream);
        }
    }
}
