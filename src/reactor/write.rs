//! Output: the commands that send ([`Core::send_part`] gathers a message
//! larger than a slot, [`Core::send`] writes now what the socket takes and
//! queues the rest), flushing the queue when the socket is writable, the
//! watermarks' crossings (reading stops and resumes, and the application
//! hears `WritingPaused` and `WritingResumed`), and what a failed write means
//! (the peer is gone; its input is still read to its end).
//!
//! The crossings are decided here, on this thread's own write queue, and
//! nowhere else: bytes the application sent that still wait in the command
//! ring do not count, so a burst of sends to a client that reads as fast
//! as they are written pauses nothing. Their deliveries are control
//! deliveries ([`Core::emit`]): one that finds the ring full waits in the
//! backlog, in order with the connection's `Eof` and `Closed`.

use std::io;

use socket2::Socket;

use crate::close_reason::CloseReason;
use crate::conn::Crossing;
use crate::message::DeliveryKind;
use crate::sys::{net, Selector};
use crate::token::ConnKey;

use super::Core;

/// The most of one message gathered before it is written (see `send_part`).
const MAX_GATHER: usize = 256 * 1024;

/// The parts of a message larger than a slot, gathered so far, and the
/// connection they are for (see [`Core::send_part`]).
#[derive(Default)]
pub(super) struct Gather {
    bytes: Vec<u8>,
    conn: Option<ConnKey>,
}

impl Gather {
    /// True if no part is held.
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Adds `key`'s part `data`; true if it is held back for the parts that
    /// follow (`more`), false if what is gathered is to be written now.
    pub(super) fn hold(&mut self, key: ConnKey, data: &[u8], more: bool) -> bool {
        debug_assert!(self.conn.is_none_or(|k| k == key));
        self.bytes.extend_from_slice(data);
        if more && self.bytes.len() < MAX_GATHER {
            self.conn = Some(key);
            return true;
        }
        false
    }

    /// What is gathered, to be written; hand the buffer back with
    /// [`Gather::restore`].
    pub(super) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    /// Takes back the buffer [`Gather::take`] lent, emptied, for the next
    /// message.
    pub(super) fn restore(&mut self, mut bytes: Vec<u8>) {
        bytes.clear();
        self.bytes = bytes;
        self.conn = None;
    }
}

impl<S: Selector> Core<S> {
    /// Sends one command's part of a message. A message larger than a slot
    /// comes in consecutive commands (a sender holds the command ring for a
    /// whole message), and its parts are gathered here and written with one
    /// call, as much as [`MAX_GATHER`] at a time, instead of one call per slot.
    pub(super) fn send_part(&mut self, key: ConnKey, data: &[u8], more: bool) {
        if self.gather.is_empty() && !more {
            return self.send(key, &[data], false);
        }
        if self.gather.hold(key, data, more) {
            if let Some(conn) = self.table.get_mut(key) {
                // Part of a message is held back: a close now must cut.
                conn.set_mid_message(true);
            }
            return;
        }
        let gathered = self.gather.take();
        self.send(key, &[&gathered], more);
        self.gather.restore(gathered);
    }

    /// Writes `parts`, one message in order, now if the socket takes them and
    /// nothing is queued ahead of them; queues the rest (a copy, so that what
    /// the parts point to is free once this returns).
    /// `more`: other parts of the same message follow in later commands.
    pub(super) fn send(&mut self, key: ConnKey, parts: &[&[u8]], more: bool) {
        let now = self.now;
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        conn.set_mid_message(more);
        let total: usize = parts.iter().map(|part| part.len()).sum();
        if !conn.accepts_output() {
            conn.refuse_output(total);
            return;
        }
        let mut sent = 0;
        if !conn.has_queued_output() {
            while sent < total {
                match send_from(conn.socket(), parts, sent) {
                    Ok(n) => {
                        sent += n;
                        conn.wrote(n);
                        conn.touch(now);
                        self.counters.bytes_sent += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        conn.refuse_output(total - sent);
                        return self.on_write_error(key, &e);
                    }
                }
            }
        }
        if sent < total {
            let mut skip = sent;
            for part in parts {
                let from = skip.min(part.len());
                skip -= from;
                conn.queue_output(&part[from..]);
            }
            // The queue only grew: it may rise past `high`, never fall.
            let checked = conn.check_watermarks(self.settings.watermarks());
            self.tell_crossing(key, checked.crossed);
            self.update_interest(key);
        }
    }

    /// Tells the application that `key`'s queue crossed a watermark, if it
    /// did. Never after its `Closed`: a connection is reported closed only
    /// once its queue is empty or dropped (and no longer above the mark, see
    /// `conn`'s module docs), and takes no output after that.
    fn tell_crossing(&mut self, key: ConnKey, crossed: Option<Crossing>) {
        let kind = match crossed {
            Some(Crossing::Rose) => DeliveryKind::WritingPaused,
            Some(Crossing::Fell) => DeliveryKind::WritingResumed,
            None => return,
        };
        self.emit(kind, key, None, None);
    }

    /// Pauses or resumes reading `key` for the application.
    pub(super) fn set_paused(&mut self, key: ConnKey, paused: bool) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.set_paused(paused) {
            self.mark_unread(key);
        }
        self.update_interest(key);
    }

    /// Sends what is queued until the socket is full; completes a pending close
    /// once the queue is empty.
    pub(super) fn flush(&mut self, key: ConnKey) {
        let now = self.now;
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        while conn.has_queued_output() {
            match send_from(conn.socket(), &conn.queued_output(), 0) {
                Ok(n) => {
                    conn.sent_queued(n);
                    conn.touch(now);
                    self.counters.bytes_sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return self.on_write_error(key, &e),
            }
        }
        let checked = conn.check_watermarks(self.settings.watermarks());
        let drained_close = !conn.has_queued_output() && conn.closing_reason().is_some();
        if checked.reads_again {
            // Input that arrived while reading was off raised no new edge.
            self.mark_unread(key);
        }
        // Before `Closed`: a graceful close drains the queue, so its writing
        // resumes first (as asyncio's `resume_writing` precedes
        // `connection_lost`).
        self.tell_crossing(key, checked.crossed);
        if drained_close {
            self.finish_close(key);
        }
    }

    /// A send failed: the peer is gone. Input it sent before may still wait in
    /// the kernel; unless nothing more can come, read it to its end first.
    pub(super) fn on_write_error(&mut self, key: ConnKey, error: &io::Error) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.write_failed() {
            self.close_now(key, Some(CloseReason::of_error(error)));
        } else {
            // No new edge may come for input that is already there.
            self.mark_unread(key);
        }
    }
}

/// Sends what follows the first `skip` bytes of `parts`, with one call.
pub(super) fn send_from(socket: &Socket, parts: &[&[u8]], mut skip: usize) -> io::Result<usize> {
    let mut slices = [io::IoSlice::new(&[]); 3];
    let mut count = 0;
    for part in parts {
        let from = skip.min(part.len());
        skip -= from;
        if from < part.len() {
            slices[count] = io::IoSlice::new(&part[from..]);
            count += 1;
        }
    }
    match &slices[..count] {
        [one] => net::send(socket, one),
        several => net::send_vectored(socket, several),
    }
}
