//! Cutting a connection's byte stream into messages, and framing messages to
//! send.
//!
//! A [`Decoder`] per connection turns whatever chunks the socket yields into
//! whole messages, in order, each exactly once: with [`Framing::Line`] a line
//! without its `\n` or `\r\n`, with [`Framing::Length`] the payload after a
//! big-endian length prefix. Messages are handed to a *sink* (the code that
//! fills delivery slots) as they complete. A message of at most `inline_limit`
//! bytes that lies wholly in the bytes at hand is lent as a
//! [`Frame::Slice`], for the sink to copy into a slot; a larger one is
//! assembled in a buffer from the [`BufferPool`] and handed over as a
//! [`Frame::Owned`], which the consumer gives back to the pool when done, so
//! steady traffic of large messages allocates nothing.
//!
//! The sink may refuse a message (the delivery ring is full) by handing it
//! back as a [`Refused`]. The decoder then keeps everything from that message
//! on: the refused message itself (a pooled buffer already holding it stays as
//! it is) and the rest of the input, copied into a pooled *backlog* buffer, to
//! be offered again by [`Decoder::pump`]. While [`Decoder::has_backlog`] says
//! so the caller reads no more input, which is what bounds a decoder's memory
//! to one message (`max_message_size`) plus one read.
//!
//! An unfinished message at the end of the input is kept in the *assembly*
//! buffer, taken from the pool once its size is known (length framing) or
//! grown class by class through the pool (line framing). Only the bytes of the
//! line so far are kept, and they are known to hold no `\n`, so a line fed one
//! byte at a time is scanned once in all, not once per byte. A trailing `\r`
//! that may begin a `\r\n` is held back as a flag rather than stored, so a line
//! never occupies more than `max_message_size` bytes. Between messages, with
//! nothing kept, a decoder owns no heap memory at all; in the middle of one it
//! holds one pooled buffer, at least of the pool's smallest class, so that
//! class is also what each connection in the middle of a small message costs.
//!
//! `max_message_size` bounds a line's payload and a declared length (the
//! terminator and the prefix do not count), and is enforced as early as
//! possible: a declared length as soon as its prefix is complete, a line as
//! soon as more than that many bytes have come without a terminator. The
//! decoder then fails for good with [`FrameError::TooLarge`].
//!
//! [`Framing::Raw`] has no message boundaries: each input is one message (a
//! copy into a pooled buffer if it is larger than `inline_limit`), and
//! `max_message_size` does not apply. The reactor may as well read raw input
//! straight into ring slots; the raw decoder exists so that every framing goes
//! through the same interface.
//!
//! The decoder's shared machinery (the state, offers to the sink, the kept
//! buffers) is in `decoder`; each framing's loop is in a file of its own
//! (`line`, `length`; raw needs no loop), and framing messages to send is in
//! `encode`. Besides the tests here, `fuzz/` at the repository's root fuzzes
//! the decoders against a reference model (its README says how).
//!
//! [`BufferPool`]: crate::pool::BufferPool

use std::fmt;

mod decoder;
mod encode;
mod length;
mod line;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decoder::Decoder;
pub use encode::{envelope, EncodeError, Envelope};

/// Width of the big-endian unsigned length prefix of [`Framing::Length`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixWidth {
    /// 4 bytes: payloads up to `u32::MAX` bytes.
    Four,
    /// 8 bytes.
    Eight,
}

impl PrefixWidth {
    /// The prefix of `bytes` bytes, if that is 4 or 8.
    pub const fn from_bytes(bytes: usize) -> Option<PrefixWidth> {
        match bytes {
            4 => Some(PrefixWidth::Four),
            8 => Some(PrefixWidth::Eight),
            _ => None,
        }
    }

    /// Number of bytes of the prefix.
    pub const fn bytes(self) -> usize {
        match self {
            PrefixWidth::Four => 4,
            PrefixWidth::Eight => 8,
        }
    }

    /// The largest payload length the prefix can express.
    pub const fn max_payload(self) -> u64 {
        match self {
            PrefixWidth::Four => u32::MAX as u64,
            PrefixWidth::Eight => u64::MAX,
        }
    }
}

/// How a connection's byte stream is cut into messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No framing: each read is one message.
    Raw,
    /// Lines ending with `\n` or `\r\n`; the message is the line without its
    /// terminator, and sending appends `\n`.
    Line,
    /// A big-endian unsigned length of the given width, then that many bytes.
    Length(PrefixWidth),
}

/// Why a stream cannot be decoded. The connection is beyond repair: the
/// caller closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A message exceeds `max_message_size`.
    TooLarge {
        /// The declared length, or the payload bytes of the line received so
        /// far (without a terminator).
        size: u64,
        /// `max_message_size`.
        limit: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { size, limit } => write!(
                f,
                "message too large: {size} bytes (declared, or received so far \
                 without an end of line) exceeds max_message_size of {limit} bytes"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// One decoded message, a *frame*, as offered to the sink. (Not to be confused
/// with [`crate::message`], what travels through the rings.)
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// At most `inline_limit` bytes, lent from the decoder's input or kept
    /// bytes: copy them.
    Slice(&'a [u8]),
    /// More than `inline_limit` bytes, in a buffer from the pool whose length is
    /// exactly the message's. Give it back with [`BufferPool::give`] when done.
    ///
    /// [`BufferPool::give`]: crate::pool::BufferPool::give
    Owned(Vec<u8>),
}

/// A message the sink did not take, handed back to the decoder (made with
/// `Refused::from(message)` or `message.into()`): a refused
/// [`Frame::Owned`] gives its buffer back, so that nothing is copied again.
#[derive(Debug)]
pub struct Refused(Option<Vec<u8>>);

impl From<Frame<'_>> for Refused {
    fn from(message: Frame<'_>) -> Refused {
        match message {
            Frame::Slice(_) => Refused(None),
            Frame::Owned(buf) => Refused(Some(buf)),
        }
    }
}

impl Frame<'_> {
    /// The message's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Frame::Slice(bytes) => bytes,
            Frame::Owned(buf) => buf,
        }
    }

    /// Length of the message in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// True for a zero-length message.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}
