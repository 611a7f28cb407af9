//! Input: what a readable or hung-up socket means for its connection, raw
//! reads straight into delivery slots (spilling a large burst into a pooled
//! buffer), discarding the input of a closing connection, and the ready list
//! that brings back a connection whose last read stopped before `EAGAIN`.
//!
//! A raw read fills the slot's own buffer first and goes on into a spill
//! buffer only when that one is full, so that small messages cost no pooled
//! buffer. A connection whose last read spilled is sending large bursts: its
//! next read goes straight into a spill buffer, which saves a system call
//! and the copy of the slot's bytes into the spill buffer per burst (at rr
//! 64 KiB × 10 inline, a quarter of the server's CPU per request; see
//! `benchmarks/README.md`). If that read brings no more than a slot holds,
//! its bytes move into the slot and the buffer goes back to the pool, so
//! the ring's budget of spill buffers counts only large messages. Where the
//! consumer lends storage of its own (`blank.rs`), such a read goes into a
//! blank of its stock instead of a spill buffer, when the stock has one.

use std::io;

use socket2::Socket;

use crate::blank::Blank;
use crate::close_reason::CloseReason;
use crate::conn::{AfterEof, Input};
use crate::inbound::RingAccount;
use crate::message::{Delivery, DeliveryKind};
use crate::pool::BufferPool;
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
    /// consumer as one message rather than a slot's worth at a time; after
    /// such a read, the next one starts in the larger buffer (see the
    /// module docs).
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
            let input = RawInput {
                socket: conn.socket(),
                spill_size: spill.then(|| self.outbox.spill_size()),
                room,
                read_fully: conn.reads_fully(),
            };
            // A connection that spilled last time starts in a spill buffer,
            // or in the consumer's storage if it lent some.
            let spill_first = input.spill_size.filter(|_| conn.spills());
            let blank = spill_first.and_then(|_| self.outbox.take_blank());
            // The buffer the slot held before goes back for the next spill.
            let SlotRead {
                result,
                end,
                spilled,
            } = self.outbox.with_pool(|pool, mut staging| {
                staging.stage(key, |delivery, account| {
                    let read = match (spill_first, blank) {
                        (Some(_), Some(blank)) => input.read_blank_first(blank, delivery, account),
                        (Some(spill_size), None) => {
                            input.read_spill_first(spill_size, delivery, pool, account)
                        }
                        (None, _) => input.read_slot_first(delivery, pool, account),
                    };
                    // An empty read (EOF) or an error leaves the slot free.
                    let len = *read.result.as_ref().unwrap_or(&0);
                    ((len > 0).then_some(len), read)
                })
            });
            match result {
                // The slot stays unstaged, so it is still free.
                Ok(0) => return self.on_eof(key),
                Ok(n) => {
                    conn.set_spills(spilled);
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

/// One raw read into a delivery slot, as `read_into_ring` asks for it.
struct RawInput<'a> {
    socket: &'a Socket,
    /// The size of a spill buffer, if the read may go past the slot.
    spill_size: Option<usize>,
    /// The most payload bytes the ring may take now (more than a slot holds
    /// whenever `spill_size` is set).
    room: usize,
    /// A short read does not prove the socket drained.
    read_fully: bool,
}

/// What a [`RawInput`] read brought.
struct SlotRead {
    /// The bytes in the delivery (`Ok(0)`: EOF), or the error (`WouldBlock`
    /// included) met before any came.
    result: io::Result<usize>,
    /// How the read ended, when it brought something.
    end: ReadEnd,
    /// The bytes went past the slot's own buffer, into a spill buffer.
    spilled: bool,
}

impl RawInput<'_> {
    /// Reads into the slot's own buffer and, if that fills up and a spill
    /// is allowed, on into a spill buffer, which the slot then carries.
    fn read_slot_first(
        &self,
        delivery: &mut Delivery,
        pool: &mut BufferPool,
        account: &mut RingAccount,
    ) -> SlotRead {
        let want = delivery.buf.len();
        let result = net::recv(self.socket, &mut delivery.buf);
        delivery.len = *result.as_ref().unwrap_or(&0);
        let (end, spilled) = match (&result, self.spill_size) {
            (Ok(n), Some(spill_size)) if *n == want => {
                let mut buffer = pool.take(spill_size);
                buffer.extend_from_slice(&delivery.buf[..*n]);
                let limit = buffer.capacity().min(self.room);
                let end = read_on(self.socket, &mut buffer, limit, self.read_fully);
                account.place(delivery, buffer);
                (end, true)
            }
            (Ok(n), _) if *n < want && !self.read_fully => (ReadEnd::Drained, false),
            _ => (ReadEnd::Full, false),
        };
        SlotRead {
            result: result.map(|_| delivery.len),
            end,
            spilled,
        }
    }

    /// Reads straight into a spill buffer of `spill_size` bytes, which the
    /// slot then carries; a read no larger than the slot's own buffer moves
    /// there, and the spill buffer goes back to the pool. Only where a
    /// spill is allowed.
    fn read_spill_first(
        &self,
        spill_size: usize,
        delivery: &mut Delivery,
        pool: &mut BufferPool,
        account: &mut RingAccount,
    ) -> SlotRead {
        let mut buffer = pool.take(spill_size);
        let limit = buffer.capacity().min(self.room);
        let end = read_on(self.socket, &mut buffer, limit, self.read_fully);
        let (result, end) = outcome(buffer.len(), end);
        let spilled = buffer.len() > delivery.buf.len();
        if spilled {
            account.place(delivery, buffer);
        } else {
            delivery.buf[..buffer.len()].copy_from_slice(&buffer);
            delivery.len = buffer.len();
            pool.give(buffer);
        }
        SlotRead {
            result,
            end,
            spilled,
        }
    }

    /// As [`RawInput::read_spill_first`], into the consumer's `blank`: the
    /// slot carries it if the read went past the slot's own buffer, and it
    /// goes back to the stock if not.
    fn read_blank_first(
        &self,
        mut blank: Blank,
        delivery: &mut Delivery,
        account: &mut RingAccount,
    ) -> SlotRead {
        let limit = blank.capacity().min(self.room);
        let end = read_on(self.socket, &mut blank, limit, self.read_fully);
        let (result, end) = outcome(blank.len(), end);
        let spilled = blank.len() > delivery.buf.len();
        if spilled {
            delivery.put_blank(blank);
        } else {
            delivery.buf[..blank.len()].copy_from_slice(blank.filled());
            delivery.len = blank.len();
            account.give_back(blank);
        }
        SlotRead {
            result,
            end,
            spilled,
        }
    }
}

/// What a read that started in a spill buffer (or a blank) and holds `len`
/// bytes brought: the count, or what ended it before any byte came.
fn outcome(len: usize, end: ReadEnd) -> (io::Result<usize>, ReadEnd) {
    match (len, end) {
        (0, ReadEnd::Eof) => (Ok(0), ReadEnd::Eof),
        (0, ReadEnd::Failed(e)) => (Err(e), ReadEnd::Drained),
        (0, _) => (Err(io::ErrorKind::WouldBlock.into()), ReadEnd::Drained),
        (n, end) => (Ok(n), end),
    }
}

/// Storage a read goes on into: a pooled spill buffer, or a blank.
trait ReadRoom {
    /// Bytes written so far.
    fn filled_len(&self) -> usize;
    /// Reads at most `max` bytes after those.
    fn recv_more(&mut self, socket: &Socket, max: usize) -> io::Result<usize>;
}

impl ReadRoom for Vec<u8> {
    fn filled_len(&self) -> usize {
        self.len()
    }

    fn recv_more(&mut self, socket: &Socket, max: usize) -> io::Result<usize> {
        net::recv_spare(socket, self, max)
    }
}

impl ReadRoom for Blank {
    fn filled_len(&self) -> usize {
        self.len()
    }

    fn recv_more(&mut self, socket: &Socket, max: usize) -> io::Result<usize> {
        let spare = self.spare();
        let len = spare.len().min(max);
        let n = net::recv_uninit(socket, &mut spare[..len])?;
        // SAFETY: `recv_uninit` wrote the first `n` bytes of the spare room.
        unsafe { self.advance(n) };
        Ok(n)
    }
}

/// Reads on into `buffer` until the socket is drained or the buffer holds
/// `limit` bytes, which it has room for. With `read_fully`, a short read
/// does not count as drained (see `read_into_ring`).
fn read_on(socket: &Socket, buffer: &mut impl ReadRoom, limit: usize, read_fully: bool) -> ReadEnd {
    while buffer.filled_len() < limit {
        let room = limit - buffer.filled_len();
        match buffer.recv_more(socket, room) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) if n < room && !read_fully => return ReadEnd::Drained,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
            Err(e) => return ReadEnd::Failed(e),
        }
    }
    ReadEnd::Full
}
