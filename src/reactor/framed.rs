//! Framed input: reads into the scratch buffer, cut into messages by the
//! connection's decoder, one delivery each; what the ring cannot take waits in
//! the decoder. Also the message timeout's clock, which runs only while the
//! peer, not the server, holds a message up.

use std::io;

use crate::close_reason::CloseReason;
use crate::framing::{Frame, Refused};
use crate::message::DeliveryKind;
use crate::sys::{net, Selector};
use crate::token::ConnKey;

use super::{Core, Deadline, PUBLISH_BATCH, READ_BUDGET};

impl<S: Selector> Core<S> {
    /// Reads into the I/O thread's scratch buffer and cuts what comes into
    /// messages, one delivery each, until the socket is drained, the ring is
    /// full, or the budget is spent. Messages the ring could not take wait in
    /// the decoder, and nothing more is read until they are delivered.
    pub(super) fn read_framed(&mut self, key: ConnKey) {
        let reading = self.reading();
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            let read_fully = conn.reads_fully();
            let (outcome, read) = if conn.holds_messages() {
                (self.deliver_messages(key, None), None)
            } else {
                if !reading || !conn.reads_input() {
                    // Only the backlog was to go (see `on_readable`); reading
                    // resumes, if ever, through the ready list.
                    conn.hold_input();
                    return;
                }
                if !self.outbox.has_slot() || !self.has_share(key) {
                    return self.mark_unread(key);
                }
                let Some(conn) = self.table.get_mut(key) else {
                    return;
                };
                match net::recv(conn.socket(), &mut self.scratch) {
                    Ok(0) => return self.on_eof(key),
                    Ok(n) => {
                        conn.touch(self.now);
                        self.counters.bytes_received += n as u64;
                        (self.deliver_messages(key, Some(n)), Some(n))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return self.mark_drained(key);
                    }
                    Err(e) => return self.close_now(key, Some(CloseReason::of_error(&e))),
                }
            };
            if self.outbox.staged() >= PUBLISH_BATCH {
                self.publish();
            }
            self.track_message(key);
            if let Err(error) = outcome {
                // The consumer closes it once it has answered what came before.
                let Some(conn) = self.table.get_mut(key) else {
                    return;
                };
                if conn.input_failed(CloseReason::TooLarge) {
                    self.emit(DeliveryKind::TooLarge, key, None, Some(error.to_string()));
                    return self.discard_input(key);
                }
                // Its output had failed already: the peer is gone.
                return self.close_now(key, Some(CloseReason::Reset));
            }
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            if conn.holds_messages() {
                return self.mark_unread(key);
            }
            // A short read drained the socket (see `read_into_ring`).
            if read.is_some_and(|n| n < self.scratch.len()) && !read_fully {
                return self.mark_drained(key);
            }
        }
        self.mark_unread(key);
    }

    /// Offers `key`'s messages to the delivery ring: those in the first `read`
    /// bytes of the scratch buffer, or (`None`) those its decoder kept.
    pub(super) fn deliver_messages(
        &mut self,
        key: ConnKey,
        read: Option<usize>,
    ) -> Result<(), crate::framing::FrameError> {
        let Some(conn) = self.table.get_mut(key) else {
            return Ok(());
        };
        let share = self.outbox.share().saturating_sub(conn.in_ring());
        let Some(decoder) = conn.decoder_mut() else {
            return Ok(());
        };
        let scratch = &self.scratch;
        let mut blocked = false;
        let mut staged = 0;
        let outcome = self.outbox.with_pool(|pool, mut staging| {
            let sink = |message: Frame<'_>| -> Result<(), Refused> {
                if !staging.has_slot() {
                    return Err(message.into());
                }
                if staged >= share {
                    blocked = true;
                    return Err(message.into());
                }
                if let Frame::Owned(buffer) = &message {
                    if !staging.admit(buffer.capacity()) {
                        blocked = true;
                        return Err(message.into());
                    }
                }
                staging.stage(key, |delivery, account| {
                    match message {
                        Frame::Slice(bytes) => {
                            delivery.buf[..bytes.len()].copy_from_slice(bytes);
                            delivery.len = bytes.len();
                        }
                        Frame::Owned(buffer) => account.place(delivery, buffer),
                    }
                    (Some(delivery.len), ())
                });
                staged += 1;
                Ok(())
            };
            match read {
                Some(n) => decoder.feed(&scratch[..n], pool, sink),
                None => decoder.pump(pool, sink),
            }
        });
        conn.delivered(staged);
        self.counters.messages_received += u64::from(staged);
        if blocked {
            self.outbox.block();
        }
        outcome
    }

    /// Notes when the message `key` is receiving started, and arms its
    /// message timeout. A decoder holding messages the ring could not take is
    /// waiting for the server, not for the peer: the clock does not run then.
    pub(super) fn track_message(&mut self, key: ConnKey) {
        let Some(timeout) = self.deadlines.message_timeout() else {
            return;
        };
        let now = self.now;
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if let Some(started) = conn.track_message(now) {
            self.deadlines
                .schedule(key, Deadline::Message, started + timeout);
        }
    }
}
