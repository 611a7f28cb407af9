//! Input: what a readable or hung-up socket means for its connection, raw
//! reads straight into delivery slots (spilling a large burst into a pooled
//! buffer), discarding the input of a closing connection, and the ready list
//! that brings back a connection whose last read stopped before `EAGAIN`.

use std::io;

use socket2::Socket;

use crate::close_reason::CloseReason;
use crate::conn::{AfterEof, Input};
use crate::message::DeliveryKind;
use crate::sys::{net, Selector};
use crate::token::ConnKey;

use super::{Core, PUBLISH_BATCH, READ_BUDGET};

/// How a read into a delivery ended, when it read something.
pub(super) enum ReadEnd {
    /// The socket has nothing more now (a short read, or `EAGAIN`).
    Drained,
    /// The buffer filled up: more may wait.
    Full,
    /// The peer's EOF came right behind the data.
    Eof,
    /// An error came right behind the data.
    Failed(io::Error),
}

impl<S: Selector> Core<S> {
    pub(super) fn on_readable(&mut self, key: ConnKey) {
        let reading = self.reading();
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        match conn.input() {
            // Messages a decoder already holds are delivered whatever the
            // state of reading: paused, throttled or stopping, they were read.
            Input::Deliver if conn.holds_messages() => self.read_framed(key),
            Input::Deliver if reading && conn.reads_input() => {
                if conn.is_framed() {
                    self.read_framed(key)
                } else {
                    self.read_into_ring(key)
                }
            }
            // Not now: resuming puts it on the ready list. Until then, the
            // one-shot registration stays disarmed (see `update_interest`).
            Input::Deliver => conn.hold_input(),
            Input::Ended => {}
            Input::Discard => self.discard_input(key),
        }
    }

    /// The poller reported a hangup or an error. A connection that reads
    /// finds out by reading; one held back (paused, throttled) is marked
    /// gone and read to its end now, pause or not; one that reads no more
    /// (after the peer's EOF, or while stopping) is closed here, or the
    /// report would repeat, unless its decoder still holds messages, which
    /// go first.
    pub(super) fn on_hangup(&mut self, key: ConnKey) {
        let reading = self.reading();
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let finds_out = match conn.input() {
            Input::Deliver => reading,
            Input::Discard => true,
            Input::Ended => false,
        };
        if finds_out {
            if !conn.reads_input() {
                // Paused or throttled, and the peer is gone: nothing it sent
                // can be held back for later any more. Read what the kernel
                // holds to its end, then the reset ends it.
                conn.peer_gone();
                self.mark_unread(key);
            }
            return;
        }
        if conn.holds_messages() {
            // Stopping: the messages read before the reset go first; the
            // stop closes it after them.
            conn.peer_gone();
            return self.mark_unread(key);
        }
        let reason = match conn.socket().take_error() {
            Ok(Some(error)) => CloseReason::of_error(&error),
            _ => CloseReason::Reset,
        };
        self.close_now(key, Some(reason));
    }

    pub(super) fn on_eof(&mut self, key: ConnKey) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        match conn.peer_finished() {
            AfterEof::Deliver => self.emit(DeliveryKind::Eof, key, None, None),
            AfterEof::Continue => {}
            AfterEof::Close(reason) => self.close_now(key, Some(reason)),
            AfterEof::Forget => self.close_now(key, None),
        }
    }

    /// Reads into delivery slots until the socket is drained, the ring is full,
    /// or the budget is spent. A read that fills a slot goes on into a larger
    /// buffer (see [`LARGE_READ`]), so that a burst of input reaches the
    /// consumer as one message rather than a slot's worth at a time.
    pub(super) fn read_into_ring(&mut self, key: ConnKey) {
        let now = self.now;
        for _ in 0..READ_BUDGET {
            if !self.outbox.has_slot() || !self.has_share(key) {
                return self.mark_unread(key);
            }
            let room = self.ring_room();
            if room == 0 {
                return self.mark_unread(key);
            }
            let spill = room > self.settings.slot_size() && self.outbox.may_spill();
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            let read_fully = conn.reads_fully();
            let spill_size = self.outbox.spill_size();
            // The buffer the slot held before goes back for the next spill.
            let (result, end) = self.outbox.with_pool(|pool, mut staging| {
                staging.stage(key, |delivery, account| {
                    let want = delivery.buf.len();
                    let result = net::recv(conn.socket(), &mut delivery.buf);
                    delivery.len = *result.as_ref().unwrap_or(&0);
                    let end = match result {
                        Ok(n) if n == want && spill => {
                            let mut buffer = pool.take(spill_size);
                            buffer.extend_from_slice(&delivery.buf[..n]);
                            let limit = buffer.capacity().min(room);
                            let end = read_on(conn.socket(), &mut buffer, limit, read_fully);
                            account.place(delivery, buffer);
                            end
                        }
                        Ok(n) if n < want && !read_fully => ReadEnd::Drained,
                        _ => ReadEnd::Full,
                    };
                    let result = result.map(|_| delivery.len);
                    // An empty read (EOF) or an error leaves the slot free.
                    let len = *result.as_ref().unwrap_or(&0);
                    ((len > 0).then_some(len), (result, end))
                })
            });
            match result {
                // The slot stays unstaged, so it is still free.
                Ok(0) => return self.on_eof(key),
                Ok(n) => {
                    conn.delivered(1);
                    conn.touch(now);
                    self.counters.bytes_received += n as u64;
                    self.counters.messages_received += 1;
                    if self.outbox.staged() >= PUBLISH_BATCH {
                        self.publish();
                    }
                    match end {
                        // A short read drained the socket: anything that
                        // arrives later raises a new edge (and re-arms a
                        // one-shot registration). Unless the poller said
                        // otherwise (an EOF behind the data, urgent data):
                        // then read on to EAGAIN.
                        ReadEnd::Drained => return self.mark_drained(key),
                        // A spilled read has had a turn's worth (16 slots'
                        // worth before); the ready list brings it back.
                        ReadEnd::Full if n > self.settings.slot_size() => {
                            return self.mark_unread(key)
                        }
                        ReadEnd::Full => {}
                        ReadEnd::Eof => return self.on_eof(key),
                        ReadEnd::Failed(e) => {
                            return self.close_now(key, Some(CloseReason::of_error(&e)))
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.mark_drained(key);
                }
                Err(e) => return self.close_now(key, Some(CloseReason::of_error(&e))),
            }
        }
        self.mark_unread(key);
    }

    /// Reads and drops input of a connection the application closed. EOF (or an
    /// error) ends a lingering connection.
    pub(super) fn discard_input(&mut self, key: ConnKey) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            match net::recv(conn.socket(), &mut self.scratch) {
                Ok(0) => return self.on_eof(key),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.mark_drained(key);
                }
                Err(e) => return self.close_now(key, Some(CloseReason::of_error(&e))),
            }
        }
        self.mark_unread(key);
    }

    pub(super) fn mark_unread(&mut self, key: ConnKey) {
        if self.table.get_mut(key).is_some_and(|conn| conn.enlist()) {
            self.ready.push_back(key);
        }
    }

    pub(super) fn mark_drained(&mut self, key: ConnKey) {
        if let Some(conn) = self.table.get_mut(key) {
            conn.drained();
        }
    }
}

/// Reads on into `buffer`'s spare capacity until the socket is drained or
/// the buffer holds `limit` bytes. With `read_fully`, a short read does not
/// count as drained (see `read_into_ring`).
pub(super) fn read_on(
    socket: &Socket,
    buffer: &mut Vec<u8>,
    limit: usize,
    read_fully: bool,
) -> ReadEnd {
    debug_assert!(limit <= buffer.capacity());
    while buffer.len() < limit {
        let room = limit - buffer.len();
        match net::recv_spare(socket, buffer, room) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) if n < room && !read_fully => return ReadEnd::Drained,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
            Err(e) => return ReadEnd::Failed(e),
        }
    }
    ReadEnd::Full
}
