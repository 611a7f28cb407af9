//! The decoder's state and what every framing shares: feeding and pumping,
//! offering messages to the sink, keeping a refused message and the input
//! after it, and the raw framing, which has no loop of its own.

use super::{Frame, FrameError, Framing, Refused};
use crate::pool::BufferPool;

/// Where the decoder is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// At a message boundary, nothing of the next message seen.
    Idle,
    /// Length framing: `have` bytes of the prefix seen, in `bytes`.
    Header { bytes: [u8; 8], have: u8 },
    /// Length framing: a payload of `len` bytes, the part seen in the assembly.
    Payload { len: usize },
    /// Line framing: the line so far is in the assembly, except a last `\r`,
    /// held back (`cr_pending`) until the next byte tells whether it ends the
    /// line.
    Line { cr_pending: bool },
    /// A complete message in the assembly, refused by the sink.
    Ready,
    /// The stream broke the framing; nothing more will be decoded.
    Failed(FrameError),
}

/// What became of a message offered to the sink.
pub(super) enum Offer {
    /// The sink took it.
    Accepted,
    /// The sink refused it and the decoder kept it as the ready message: the
    /// input is consumed up to the message's end.
    RefusedKept,
    /// The sink refused it and it was not kept: the input is consumed only up
    /// to the message's start.
    RefusedNotKept,
}

/// A connection's decoding state: the framing, the limits, and the bytes kept
/// between reads.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    pub(super) max_message_size: usize,
    pub(super) inline_limit: usize,
    pub(super) state: State,
    /// The payload so far of an unfinished message, or the whole of a ready
    /// one. No heap memory when empty: taken from the pool when needed and
    /// given back as soon as the message is delivered.
    pub(super) assembly: Vec<u8>,
    /// Input after a refused message, not decoded yet: `backlog[backlog_start..]`.
    /// Always starts at a message boundary.
    backlog: Vec<u8>,
    backlog_start: usize,
    /// Bytes examined looking for `\n`, to test that scanning is linear.
    #[cfg(test)]
    pub(super) bytes_scanned: usize,
}

impl Decoder {
    /// A decoder at the start of a stream. Messages of at most `inline_limit`
    /// bytes are offered as [`Frame::Slice`] when they can be; payloads above
    /// `max_message_size` are an error (except with [`Framing::Raw`]).
    pub fn new(framing: Framing, max_message_size: usize, inline_limit: usize) -> Decoder {
        Decoder {
            framing,
            max_message_size,
            inline_limit,
            state: State::Idle,
            assembly: Vec::new(),
            backlog: Vec::new(),
            backlog_start: 0,
            #[cfg(test)]
            bytes_scanned: 0,
        }
    }

    /// The framing this decoder applies.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Decodes `input`, bytes just read, offering each complete message to
    /// `sink` in order. The sink returns `Ok(())` if it took the message, or
    /// `Err(message.into())`, a [`Refused`] made of the very message it was
    /// given, to refuse it (the ring is full); the decoder then
    /// keeps that message and everything after it for [`pump`](Self::pump),
    /// offering nothing more in this call. The tail of an unfinished message is
    /// kept for the next call.
    ///
    /// Call it only while [`has_backlog`](Self::has_backlog) is false: that is
    /// what bounds the memory kept. (Called anyway, it keeps `input` behind the
    /// backlog and pumps; nothing is lost.)
    ///
    /// # Errors
    /// [`FrameError`] if the stream breaks the framing; the messages before the
    /// offending one have been offered. Every later call fails the same way.
    pub fn feed<S>(
        &mut self,
        input: &[u8],
        pool: &mut BufferPool,
        mut sink: S,
    ) -> Result<(), FrameError>
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
    {
        if let State::Failed(error) = self.state {
            return Err(error);
        }
        if self.has_backlog() {
            self.keep(input, pool);
            return self.pump(pool, sink);
        }
        match self.decode(input, pool, &mut sink) {
            Ok(None) => Ok(()),
            Ok(Some(consumed)) => {
                self.keep(&input[consumed..], pool);
                Ok(())
            }
            Err(error) => Err(self.fail(error, pool)),
        }
    }

    /// Offers the messages kept by earlier calls, in order, until the sink
    /// refuses one or none is left.
    ///
    /// # Errors
    /// As [`feed`](Self::feed).
    pub fn pump<S>(&mut self, pool: &mut BufferPool, mut sink: S) -> Result<(), FrameError>
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
    {
        if let State::Failed(error) = self.state {
            return Err(error);
        }
        if self.state == State::Ready && !self.offer_assembly(pool, &mut sink) {
            return Ok(());
        }
        if self.backlog_start == self.backlog.len() {
            return Ok(());
        }
        // Decoded from a buffer moved out of `self`, so that the decoder's state
        // can change while slices of it are lent to the sink.
        let backlog = std::mem::take(&mut self.backlog);
        let result = self.decode(&backlog[self.backlog_start..], pool, &mut sink);
        self.backlog = backlog;
        match result {
            Ok(None) => {
                self.release_backlog(pool);
                Ok(())
            }
            Ok(Some(consumed)) => {
                self.backlog_start += consumed;
                if self.backlog_start == self.backlog.len() {
                    self.release_backlog(pool);
                }
                Ok(())
            }
            Err(error) => Err(self.fail(error, pool)),
        }
    }

    /// True if complete messages wait for the sink (it refused one): read no
    /// more input until [`pump`](Self::pump) has cleared them.
    pub fn has_backlog(&self) -> bool {
        self.state == State::Ready || self.backlog_start < self.backlog.len()
    }

    /// True if part of a message has been decoded and the rest has not come:
    /// the peer owes the remainder (for a per-message timeout). While
    /// [`has_backlog`](Self::has_backlog) is true the kept input is not decoded
    /// yet and this reflects only what has been; the caller, not the peer, is
    /// behind then.
    pub fn in_message(&self) -> bool {
        matches!(
            self.state,
            State::Header { .. } | State::Payload { .. } | State::Line { .. }
        )
    }

    /// Bytes of the stream kept: an unfinished or refused message and the
    /// backlog.
    pub fn buffered(&self) -> usize {
        let held_back = match self.state {
            State::Header { have, .. } => usize::from(have),
            State::Line { cr_pending } => usize::from(cr_pending),
            _ => 0,
        };
        held_back + self.assembly.len() + (self.backlog.len() - self.backlog_start)
    }

    /// Heap memory held (the capacities of the kept buffers); zero between
    /// messages when nothing is kept.
    pub fn heap_capacity(&self) -> usize {
        self.assembly.capacity() + self.backlog.capacity()
    }

    /// Gives the kept buffers back to the pool and returns to the start of a
    /// stream (the connection is gone, or is being reused).
    pub fn clear(&mut self, pool: &mut BufferPool) {
        self.release_assembly(pool);
        self.release_backlog(pool);
        self.state = State::Idle;
    }

    /// Decodes `data`, which continues the stream from the current state.
    /// Returns `None` if all of it was consumed (an unfinished tail is now in
    /// the assembly), or `Some(consumed)` if the sink refused a message and
    /// `data[consumed..]` must be kept.
    fn decode<S>(
        &mut self,
        data: &[u8],
        pool: &mut BufferPool,
        sink: &mut S,
    ) -> Result<Option<usize>, FrameError>
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
    {
        if self.state == State::Ready && !self.offer_assembly(pool, sink) {
            return Ok(Some(0));
        }
        match self.framing {
            Framing::Raw => Ok(self.decode_raw(data, pool, sink)),
            Framing::Line => self.decode_lines(data, pool, sink),
            Framing::Length(width) => self.decode_lengths(data, width.bytes(), pool, sink),
        }
    }

    fn decode_raw<S>(&mut self, data: &[u8], pool: &mut BufferPool, sink: &mut S) -> Option<usize>
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
    {
        if data.is_empty() {
            return None;
        }
        match self.offer_slice(data, pool, sink) {
            Offer::Accepted => None,
            Offer::RefusedKept => Some(data.len()),
            Offer::RefusedNotKept => Some(0),
        }
    }

    pub(super) fn too_large(&self, size: u64) -> FrameError {
        FrameError::TooLarge {
            size,
            limit: self.max_message_size,
        }
    }

    /// Offers `message`, which lies in the data being decoded.
    pub(super) fn offer_slice<S>(
        &mut self,
        message: &[u8],
        pool: &mut BufferPool,
        sink: &mut S,
    ) -> Offer
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
    {
        if message.len() <= self.inline_limit {
            return match sink(Frame::Slice(message)) {
                Ok(()) => Offer::Accepted,
                Err(_) => Offer::RefusedNotKept,
            };
        }
        let mut owned = pool.take(message.len());
        owned.extend_from_slice(message);
        match sink(Frame::Owned(owned)) {
            Ok(()) => Offer::Accepted,
            Err(Refused(Some(owned))) => {
                // Keep the copy rather than making it again next time.
                self.assembly = owned;
                self.state = State::Ready;
                Offer::RefusedKept
            }
            Err(Refused(None)) => {
                debug_assert!(false, "the sink must refuse with the message it got");
                Offer::RefusedNotKept
            }
        }
    }

    /// Offers the complete message in the assembly; true if the sink took it.
    /// Either way the state moves on: to `Idle`, or to `Ready`.
    pub(super) fn offer_assembly<S>(&mut self, pool: &mut BufferPool, sink: &mut S) -> bool
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
    {
        if self.assembly.len() <= self.inline_limit {
            if sink(Frame::Slice(&self.assembly)).is_err() {
                self.state = State::Ready;
                return false;
            }
            self.release_assembly(pool);
        } else {
            let owned = std::mem::take(&mut self.assembly);
            match sink(Frame::Owned(owned)) {
                Ok(()) => {}
                Err(Refused(Some(owned))) => {
                    self.assembly = owned;
                    self.state = State::Ready;
                    return false;
                }
                Err(Refused(None)) => {
                    debug_assert!(false, "the sink must refuse with the message it got");
                    self.state = State::Ready;
                    return false;
                }
            }
        }
        self.state = State::Idle;
        true
    }

    /// Keeps `bytes`, not decoded yet, behind the backlog.
    fn keep(&mut self, bytes: &[u8], pool: &mut BufferPool) {
        if bytes.is_empty() {
            return;
        }
        let kept = self.backlog.len() - self.backlog_start;
        if self.backlog.capacity() - self.backlog.len() < bytes.len() {
            let mut grown = pool.take(kept + bytes.len());
            grown.extend_from_slice(&self.backlog[self.backlog_start..]);
            let old = std::mem::replace(&mut self.backlog, grown);
            self.backlog_start = 0;
            if old.capacity() > 0 {
                pool.give(old);
            }
        }
        self.backlog.extend_from_slice(bytes);
    }

    fn release_assembly(&mut self, pool: &mut BufferPool) {
        let assembly = std::mem::take(&mut self.assembly);
        if assembly.capacity() > 0 {
            pool.give(assembly);
        }
    }

    fn release_backlog(&mut self, pool: &mut BufferPool) {
        let backlog = std::mem::take(&mut self.backlog);
        self.backlog_start = 0;
        if backlog.capacity() > 0 {
            pool.give(backlog);
        }
    }

    /// Enters the failed state for good, giving the buffers back at once: the
    /// connection is about to close and will decode nothing more.
    fn fail(&mut self, error: FrameError, pool: &mut BufferPool) -> FrameError {
        self.clear(pool);
        self.state = State::Failed(error);
        error
    }
}
