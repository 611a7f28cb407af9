//! Cutting a connection's byte stream into messages, and framing messages to
//! send.
//!
//! A [`Decoder`] per connection turns whatever chunks the socket yields into
//! whole messages, in order, each exactly once: with [`Framing::Line`] a line
//! without its `\n` or `\r\n`, with [`Framing::Length`] the payload after a
//! big-endian length prefix. Messages are handed to a *sink* (the code that
//! fills delivery slots) as they complete. A message of at most `inline_limit`
//! bytes that lies wholly in the bytes at hand is lent as a
//! [`Message::Slice`], for the sink to copy into a slot; a larger one is
//! assembled in a buffer from the [`BufferPool`] and handed over as a
//! [`Message::Owned`], which the consumer gives back to the pool when done, so
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

use std::fmt;

use crate::pool::BufferPool;

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

/// One decoded message, as offered to the sink.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// At most `inline_limit` bytes, lent from the decoder's input or kept
    /// bytes: copy them.
    Slice(&'a [u8]),
    /// More than `inline_limit` bytes, in a buffer from the pool whose length is
    /// exactly the message's. Give it back with [`BufferPool::give`] when done.
    Owned(Vec<u8>),
}

/// A message the sink did not take, handed back to the decoder (made with
/// `Refused::from(message)` or `message.into()`): a refused
/// [`Message::Owned`] gives its buffer back, so that nothing is copied again.
#[derive(Debug)]
pub struct Refused(Option<Vec<u8>>);

impl From<Message<'_>> for Refused {
    fn from(message: Message<'_>) -> Refused {
        match message {
            Message::Slice(_) => Refused(None),
            Message::Owned(buf) => Refused(Some(buf)),
        }
    }
}

impl Message<'_> {
    /// The message's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Slice(bytes) => bytes,
            Message::Owned(buf) => buf,
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

/// Where the decoder is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
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
enum Offer {
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
    max_message_size: usize,
    inline_limit: usize,
    state: State,
    /// The payload so far of an unfinished message, or the whole of a ready
    /// one. No heap memory when empty: taken from the pool when needed and
    /// given back as soon as the message is delivered.
    assembly: Vec<u8>,
    /// Input after a refused message, not decoded yet: `backlog[backlog_start..]`.
    /// Always starts at a message boundary.
    backlog: Vec<u8>,
    backlog_start: usize,
    /// Bytes examined looking for `\n`, to test that scanning is linear.
    #[cfg(test)]
    bytes_scanned: usize,
}

impl Decoder {
    /// A decoder at the start of a stream. Messages of at most `inline_limit`
    /// bytes are offered as [`Message::Slice`] when they can be; payloads above
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
        S: FnMut(Message<'_>) -> Result<(), Refused>,
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
        S: FnMut(Message<'_>) -> Result<(), Refused>,
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
        S: FnMut(Message<'_>) -> Result<(), Refused>,
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
        S: FnMut(Message<'_>) -> Result<(), Refused>,
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

    fn decode_lengths<S>(
        &mut self,
        data: &[u8],
        width: usize,
        pool: &mut BufferPool,
        sink: &mut S,
    ) -> Result<Option<usize>, FrameError>
    where
        S: FnMut(Message<'_>) -> Result<(), Refused>,
    {
        let mut pos = 0;
        loop {
            match self.state {
                State::Idle => {
                    let rest = &data[pos..];
                    if rest.len() < width {
                        // Even an empty rest lands here: nothing of the next
                        // message yet, and `have == 0` means Idle.
                        if !rest.is_empty() {
                            let mut bytes = [0; 8];
                            bytes[..rest.len()].copy_from_slice(rest);
                            self.state = State::Header {
                                bytes,
                                have: rest.len() as u8,
                            };
                        }
                        return Ok(None);
                    }
                    let len = self.check_declared(&rest[..width])?;
                    let body = &rest[width..];
                    if body.len() >= len {
                        // The whole message is at hand: offered in place.
                        match self.offer_slice(&body[..len], pool, sink) {
                            Offer::Accepted => pos += width + len,
                            Offer::RefusedKept => return Ok(Some(pos + width + len)),
                            Offer::RefusedNotKept => return Ok(Some(pos)),
                        }
                    } else {
                        pos += width;
                        self.start_payload(len, pool);
                    }
                }
                State::Header { mut bytes, have } => {
                    let have = usize::from(have);
                    let n = (width - have).min(data.len() - pos);
                    bytes[have..have + n].copy_from_slice(&data[pos..pos + n]);
                    pos += n;
                    if have + n < width {
                        self.state = State::Header {
                            bytes,
                            have: (have + n) as u8,
                        };
                        return Ok(None);
                    }
                    let len = self.check_declared(&bytes[..width])?;
                    self.start_payload(len, pool);
                }
                State::Payload { len } => {
                    let n = (len - self.assembly.len()).min(data.len() - pos);
                    // The assembly was taken with room for `len` bytes: this
                    // never reallocates.
                    self.assembly.extend_from_slice(&data[pos..pos + n]);
                    pos += n;
                    if self.assembly.len() < len {
                        return Ok(None);
                    }
                    if !self.offer_assembly(pool, sink) {
                        return Ok(Some(pos));
                    }
                }
                State::Ready => {
                    if !self.offer_assembly(pool, sink) {
                        return Ok(Some(pos));
                    }
                }
                State::Line { .. } => unreachable!("line state under length framing"),
                State::Failed(error) => return Err(error),
            }
        }
    }

    fn decode_lines<S>(
        &mut self,
        data: &[u8],
        pool: &mut BufferPool,
        sink: &mut S,
    ) -> Result<Option<usize>, FrameError>
    where
        S: FnMut(Message<'_>) -> Result<(), Refused>,
    {
        let max = self.max_message_size;
        let mut pos = 0;
        loop {
            let (have, cr_pending) = match self.state {
                State::Idle => (0, false),
                State::Line { cr_pending } => (self.assembly.len(), cr_pending),
                State::Ready => {
                    if !self.offer_assembly(pool, sink) {
                        return Ok(Some(pos));
                    }
                    continue;
                }
                State::Failed(error) => return Err(error),
                State::Header { .. } | State::Payload { .. } => {
                    unreachable!("length state under line framing")
                }
            };
            let rest = &data[pos..];
            if rest.is_empty() {
                return Ok(None);
            }
            // Look no further than a line of `max` bytes plus `\r\n` could
            // reach: past that the line is too large whatever follows.
            let reach = max.saturating_add(2) - have - usize::from(cr_pending);
            let window = &rest[..reach.min(rest.len())];
            #[cfg(test)]
            {
                self.bytes_scanned += window.len();
            }
            let Some(newline) = find_newline(window) else {
                // No end of line yet. A last `\r` may start one: hold it back.
                let last_is_cr = window.last() == Some(&b'\r');
                let tail = &window[..window.len() - usize::from(last_is_cr)];
                // A `\r` held back from before is data: more bytes followed it.
                let seen = have + usize::from(cr_pending) + tail.len();
                if seen > max {
                    return Err(self.too_large(seen as u64));
                }
                // `window` is all of `rest` here, or `seen` would exceed `max`.
                self.append_to_assembly(cr_pending, tail, pool);
                self.state = State::Line {
                    cr_pending: last_is_cr,
                };
                return Ok(None);
            };
            let line = &window[..newline];
            let line = match line.split_last() {
                Some((b'\r', init)) => init,
                _ => line,
            };
            // The held-back `\r` is data if anything came between it and `\n`.
            let cr_is_data = cr_pending && newline > 0;
            let size = have + usize::from(cr_is_data) + line.len();
            if size > max {
                return Err(self.too_large(size as u64));
            }
            let next = pos + newline + 1;
            if self.state == State::Idle {
                match self.offer_slice(line, pool, sink) {
                    Offer::Accepted => pos = next,
                    Offer::RefusedKept => return Ok(Some(next)),
                    Offer::RefusedNotKept => return Ok(Some(pos)),
                }
            } else {
                self.append_to_assembly(cr_is_data, line, pool);
                pos = next;
                if !self.offer_assembly(pool, sink) {
                    return Ok(Some(pos));
                }
            }
        }
    }

    /// Parses a complete length prefix and checks it against the limit.
    fn check_declared(&mut self, prefix: &[u8]) -> Result<usize, FrameError> {
        let declared = prefix
            .iter()
            .fold(0u64, |len, &byte| (len << 8) | u64::from(byte));
        match usize::try_from(declared) {
            Ok(len) if len <= self.max_message_size => Ok(len),
            _ => Err(self.too_large(declared)),
        }
    }

    fn too_large(&self, size: u64) -> FrameError {
        FrameError::TooLarge {
            size,
            limit: self.max_message_size,
        }
    }

    /// Enters the payload of a `len`-byte message, with an assembly buffer
    /// large enough for all of it.
    fn start_payload(&mut self, len: usize, pool: &mut BufferPool) {
        debug_assert!(self.assembly.capacity() == 0);
        if len > 0 {
            self.assembly = pool.take(len);
        }
        self.state = State::Payload { len };
    }

    /// Appends a line's bytes (after a `\r` if `cr` is set) to the assembly,
    /// growing it through the pool.
    fn append_to_assembly(&mut self, cr: bool, bytes: &[u8], pool: &mut BufferPool) {
        let needed = self.assembly.len() + usize::from(cr) + bytes.len();
        if needed > self.assembly.capacity() {
            // At least double, so that growth stays linear overall even if the
            // pool serves this size exactly rather than by power-of-two class.
            let size = needed
                .max(self.assembly.capacity().saturating_mul(2))
                .min(self.max_message_size.max(needed));
            let mut grown = pool.take(size);
            grown.extend_from_slice(&self.assembly);
            let old = std::mem::replace(&mut self.assembly, grown);
            if old.capacity() > 0 {
                pool.give(old);
            }
        }
        if cr {
            self.assembly.push(b'\r');
        }
        self.assembly.extend_from_slice(bytes);
    }

    /// Offers `message`, which lies in the data being decoded.
    fn offer_slice<S>(&mut self, message: &[u8], pool: &mut BufferPool, sink: &mut S) -> Offer
    where
        S: FnMut(Message<'_>) -> Result<(), Refused>,
    {
        if message.len() <= self.inline_limit {
            return match sink(Message::Slice(message)) {
                Ok(()) => Offer::Accepted,
                Err(_) => Offer::RefusedNotKept,
            };
        }
        let mut owned = pool.take(message.len());
        owned.extend_from_slice(message);
        match sink(Message::Owned(owned)) {
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
    fn offer_assembly<S>(&mut self, pool: &mut BufferPool, sink: &mut S) -> bool
    where
        S: FnMut(Message<'_>) -> Result<(), Refused>,
    {
        if self.assembly.len() <= self.inline_limit {
            if sink(Message::Slice(&self.assembly)).is_err() {
                self.state = State::Ready;
                return false;
            }
            self.release_assembly(pool);
        } else {
            let owned = std::mem::take(&mut self.assembly);
            match sink(Message::Owned(owned)) {
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

/// Index of the first `\n` in `bytes`, eight bytes at a time.
fn find_newline(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const NEWLINES: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("chunks of 8"));
        // A byte of `x` is zero where `word` has a `\n`. The classic test flags
        // the lowest zero byte exactly (higher flags may be false positives, but
        // only above a true zero), and little-endian order makes the lowest byte
        // the first.
        let x = word ^ NEWLINES;
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return Some(offset + zeros.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&byte| byte == b'\n')
        .map(|i| offset + i)
}

/// The bytes that go around a payload on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    header: [u8; 8],
    header_len: u8,
    trailer: &'static [u8],
}

impl Envelope {
    /// What to write before the payload: the length prefix, if any.
    pub fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }

    /// What to write after the payload: `\n` for lines, else nothing.
    pub fn trailer(&self) -> &'static [u8] {
        self.trailer
    }

    /// Bytes the framing adds to the payload.
    pub fn overhead(&self) -> usize {
        usize::from(self.header_len) + self.trailer.len()
    }
}

/// A payload that its framing cannot carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeError {
    /// The payload's length.
    pub len: usize,
    /// The largest length the prefix can express.
    pub max: u64,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a message of {} bytes cannot be framed: the length prefix holds at most {}",
            self.len, self.max
        )
    }
}

impl std::error::Error for EncodeError {}

/// The envelope that frames a payload of `payload_len` bytes for sending.
///
/// Line framing does not look inside the payload: a `\n` in it reaches the
/// peer as the end of a line.
///
/// # Errors
/// [`EncodeError`] if `payload_len` does not fit the length prefix.
pub fn envelope(framing: Framing, payload_len: usize) -> Result<Envelope, EncodeError> {
    let mut envelope = Envelope {
        header: [0; 8],
        header_len: 0,
        trailer: b"",
    };
    match framing {
        Framing::Raw => {}
        Framing::Line => envelope.trailer = b"\n",
        Framing::Length(width) => {
            let len = payload_len as u64;
            if len > width.max_payload() {
                return Err(EncodeError {
                    len: payload_len,
                    max: width.max_payload(),
                });
            }
            let bytes = width.bytes();
            envelope.header[..bytes].copy_from_slice(&len.to_be_bytes()[8 - bytes..]);
            envelope.header_len = bytes as u8;
        }
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LENGTH4: Framing = Framing::Length(PrefixWidth::Four);
    const LENGTH8: Framing = Framing::Length(PrefixWidth::Eight);

    /// Types a closure as a sink (closures bound by `let` need the hint).
    fn sink<F>(f: F) -> F
    where
        F: FnMut(Message<'_>) -> Result<(), Refused>,
    {
        f
    }

    /// A sink that refuses everything.
    fn refuse(message: Message<'_>) -> Result<(), Refused> {
        Err(message.into())
    }

    /// A sink that takes one message into `taken`, then refuses.
    fn take_one(taken: &mut Vec<Vec<u8>>) -> impl FnMut(Message<'_>) -> Result<(), Refused> + '_ {
        let mut first = true;
        move |message| {
            if !std::mem::take(&mut first) {
                return Err(message.into());
            }
            taken.push(message.as_bytes().to_vec());
            Ok(())
        }
    }

    fn pool() -> BufferPool {
        BufferPool::new(16, 1 << 20, usize::MAX)
    }

    /// `messages` framed for sending.
    fn encode(framing: Framing, messages: &[&[u8]]) -> Vec<u8> {
        let mut stream = Vec::new();
        for message in messages {
            let envelope = envelope(framing, message.len()).unwrap();
            stream.extend_from_slice(envelope.header());
            stream.extend_from_slice(message);
            stream.extend_from_slice(envelope.trailer());
        }
        stream
    }

    /// Feeds `chunks` with a sink that takes everything, checking that small
    /// messages come lent and large ones owned; returns the messages.
    fn decode_all(decoder: &mut Decoder, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut pool = pool();
        let mut messages = Vec::new();
        let inline_limit = decoder.inline_limit;
        for chunk in chunks {
            decoder.feed(chunk, &mut pool, |message| {
                match &message {
                    Message::Slice(bytes) => assert!(bytes.len() <= inline_limit),
                    Message::Owned(buf) => assert!(buf.len() > inline_limit),
                }
                messages.push(message.as_bytes().to_vec());
                Ok(())
            })?;
        }
        Ok(messages)
    }

    fn decode_bytewise(decoder: &mut Decoder, stream: &[u8]) -> Vec<Vec<u8>> {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        decode_all(decoder, &chunks).unwrap()
    }

    fn owned(messages: &[&[u8]]) -> Vec<Vec<u8>> {
        messages.iter().map(|m| m.to_vec()).collect()
    }

    #[test]
    fn lines_lose_their_terminator_and_only_it() {
        let stream = b"a\nbb\r\n\nc\r\r\n\r\n";
        let expected = owned(&[b"a", b"bb", b"", b"c\r", b""]);
        for inline_limit in [0, 1, 100] {
            let mut decoder = Decoder::new(Framing::Line, 100, inline_limit);
            assert_eq!(decode_all(&mut decoder, &[stream]).unwrap(), expected);
            let mut decoder = Decoder::new(Framing::Line, 100, inline_limit);
            assert_eq!(decode_bytewise(&mut decoder, stream), expected);
        }
    }

    #[test]
    fn a_cr_not_before_a_newline_is_data_wherever_the_reads_split() {
        type Chunks<'a> = &'a [&'a [u8]];
        let cases: [(Chunks, Chunks); 5] = [
            (&[b"a\rb\n"], &[b"a\rb"]),
            (&[b"a\r", b"b\n"], &[b"a\rb"]),
            (&[b"a\r", b"\n"], &[b"a"]),
            (&[b"\r", b"\r", b"\n"], &[b"\r"]),
            (&[b"\r", b"\r", b"x", b"\r", b"\r\n"], &[b"\r\rx\r"]),
        ];
        for (chunks, expected) in cases {
            for inline_limit in [0, 100] {
                let mut decoder = Decoder::new(Framing::Line, 100, inline_limit);
                assert_eq!(decode_all(&mut decoder, chunks).unwrap(), owned(expected));
            }
        }
    }

    #[test]
    fn length_prefixed_messages_of_both_widths() {
        let messages: [&[u8]; 4] = [b"hello", b"", b"x", &[0; 300]];
        for framing in [LENGTH4, LENGTH8] {
            let stream = encode(framing, &messages);
            for inline_limit in [0, 5, 1000] {
                let mut decoder = Decoder::new(framing, 1000, inline_limit);
                assert_eq!(
                    decode_all(&mut decoder, &[&stream]).unwrap(),
                    owned(&messages)
                );
                let mut decoder = Decoder::new(framing, 1000, inline_limit);
                assert_eq!(decode_bytewise(&mut decoder, &stream), owned(&messages));
            }
        }
        assert_eq!(encode(LENGTH4, &[b"ab"]), b"\0\0\0\x02ab");
        assert_eq!(encode(LENGTH8, &[b"ab"]), b"\0\0\0\0\0\0\0\x02ab");
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_messages() {
        let messages: [&[u8]; 3] = [b"first", b"", b"third message"];
        for framing in [Framing::Line, LENGTH4, LENGTH8] {
            let stream = encode(framing, &messages);
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                let mut decoder = Decoder::new(framing, 100, 8);
                assert_eq!(
                    decode_all(&mut decoder, &[a, b]).unwrap(),
                    owned(&messages),
                    "{framing:?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn a_line_may_fill_the_limit_but_not_one_byte_more() {
        let mut pool = pool();
        let mut decoder = Decoder::new(Framing::Line, 8, 4);
        let mut got = Vec::new();
        // Exactly at the limit, even with the `\r\n` arriving late.
        for bytes in [&b"12345678"[..], b"\r", b"\n"] {
            decoder
                .feed(bytes, &mut pool, |m| {
                    got.push(m.as_bytes().to_vec());
                    Ok(())
                })
                .unwrap();
            if bytes == b"\r" {
                assert_eq!(decoder.buffered(), 9);
            }
        }
        assert_eq!(got, owned(&[b"12345678"]));
        // One byte more without a terminator fails at once.
        decoder.feed(b"12345678", &mut pool, |_| Ok(())).unwrap();
        assert_eq!(
            decoder.feed(b"9", &mut pool, |_| Ok(())),
            Err(FrameError::TooLarge { size: 9, limit: 8 })
        );
        // A held-back `\r` that turns out to be data counts too.
        let mut decoder = Decoder::new(Framing::Line, 8, 4);
        decoder.feed(b"12345678\r", &mut pool, |_| Ok(())).unwrap();
        assert_eq!(
            decoder.feed(b"x", &mut pool, |_| Ok(())),
            Err(FrameError::TooLarge { size: 10, limit: 8 })
        );
        // And within one read, whatever follows.
        let mut decoder = Decoder::new(Framing::Line, 8, 4);
        assert_eq!(
            decoder.feed(b"ok\n123456789\n", &mut pool, |_| Ok(())),
            Err(FrameError::TooLarge { size: 9, limit: 8 })
        );
    }

    #[test]
    fn an_endless_line_fails_after_scanning_just_past_the_limit() {
        let mut pool = pool();
        let mut decoder = Decoder::new(Framing::Line, 100, 10);
        let flood = vec![b'x'; 1 << 20];
        let mut offered = 0;
        let result = decoder.feed(b"fine\n", &mut pool, |_| {
            offered += 1;
            Ok(())
        });
        assert_eq!(result, Ok(()));
        let result = decoder.feed(&flood, &mut pool, |_| {
            offered += 1;
            Ok(())
        });
        assert!(matches!(result, Err(FrameError::TooLarge { limit: 100, size }) if size > 100));
        assert_eq!(offered, 1);
        assert!(decoder.bytes_scanned <= 5 + 102);
        // Nothing kept by a failed decoder.
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.heap_capacity(), 0);
    }

    #[test]
    fn a_declared_length_over_the_limit_fails_before_its_payload() {
        let mut pool = pool();
        for (framing, header) in [
            (LENGTH4, &b"\0\0\x04\x01"[..]),
            (LENGTH8, &b"\xff\xff\xff\xff\xff\xff\xff\xff"[..]),
        ] {
            let mut decoder = Decoder::new(framing, 1024, 10);
            let (first, last) = header.split_at(header.len() - 1);
            decoder.feed(first, &mut pool, |_| Ok(())).unwrap();
            assert!(decoder.in_message());
            let size = u64::from_be_bytes({
                let mut wide = [0; 8];
                wide[8 - header.len()..].copy_from_slice(header);
                wide
            });
            assert_eq!(
                decoder.feed(last, &mut pool, |_| Ok(())),
                Err(FrameError::TooLarge { size, limit: 1024 })
            );
        }
    }

    #[test]
    fn the_limit_counts_payload_bytes_only() {
        let message: &[u8] = b"12345";
        for framing in [Framing::Line, LENGTH4, LENGTH8] {
            let stream = encode(framing, &[message, message]);
            let mut decoder = Decoder::new(framing, 5, 2);
            assert_eq!(decoder.framing(), framing);
            assert_eq!(
                decode_bytewise(&mut decoder, &stream),
                owned(&[message, message])
            );
            let mut decoder = Decoder::new(framing, 4, 2);
            assert!(decode_all(&mut decoder, &[&stream]).is_err());
        }
    }

    #[test]
    fn small_messages_are_lent_and_large_ones_come_in_pooled_buffers() {
        let mut pool = pool();
        for framing in [Framing::Line, LENGTH4] {
            let stream = encode(framing, &[b"abcd", b"abcde"]);
            let mut decoder = Decoder::new(framing, 100, 4);
            let mut kinds = Vec::new();
            decoder
                .feed(&stream, &mut pool, |message| {
                    kinds.push(match message {
                        Message::Slice(bytes) => (false, bytes.to_vec()),
                        Message::Owned(buf) => (true, buf),
                    });
                    Ok(())
                })
                .unwrap();
            assert_eq!(
                kinds,
                [(false, b"abcd".to_vec()), (true, b"abcde".to_vec())]
            );
            assert_eq!(kinds[1].1.capacity(), 16, "a buffer of the pool's class");
        }
    }

    /// Feeds `chunks`, refusing exactly the `refuse_at`-th offer (counting from
    /// 0 across the whole run), pumping after each feed; returns the messages
    /// taken and how many offers were made.
    fn decode_refusing_once(
        framing: Framing,
        inline_limit: usize,
        chunks: &[&[u8]],
        refuse_at: usize,
    ) -> (Vec<Vec<u8>>, usize) {
        let mut pool = pool();
        let mut decoder = Decoder::new(framing, 100, inline_limit);
        let mut taken = Vec::new();
        let mut offers = 0;
        let mut spare = Vec::new();
        let mut offer = sink(|message| {
            offers += 1;
            if offers - 1 == refuse_at {
                return Err(message.into());
            }
            taken.push(message.as_bytes().to_vec());
            if let Message::Owned(buf) = message {
                spare.push(buf);
            }
            Ok(())
        });
        for chunk in chunks {
            decoder.feed(chunk, &mut pool, &mut offer).unwrap();
            while decoder.has_backlog() {
                decoder.pump(&mut pool, &mut offer).unwrap();
            }
        }
        assert!(!decoder.in_message());
        assert_eq!(decoder.heap_capacity(), 0);
        (taken, offers)
    }

    #[test]
    fn a_refused_message_is_offered_again_and_nothing_is_lost_or_repeated() {
        for framing in [Framing::Line, LENGTH4, LENGTH8] {
            let messages: [&[u8]; 4] = [b"first", b"", b"third", b"fourth"];
            let stream = encode(framing, &messages);
            // Splits that leave the last message unfinished after the first
            // read, or the second message split, or everything in one read.
            let splits = [stream.len(), stream.len() - 3, 7, 1];
            for split in splits {
                let (a, b) = stream.split_at(split);
                for inline_limit in [0, 3, 100] {
                    for refuse_at in 0..=messages.len() {
                        let (taken, offers) =
                            decode_refusing_once(framing, inline_limit, &[a, b], refuse_at);
                        assert_eq!(
                            taken,
                            owned(&messages),
                            "{framing:?}, split {split}, inline {inline_limit}, refusing offer {refuse_at}"
                        );
                        let refused = usize::from(refuse_at < messages.len());
                        assert_eq!(offers, messages.len() + refused);
                    }
                }
            }
        }
    }

    #[test]
    fn a_refused_large_message_keeps_its_buffer() {
        let mut pool = pool();
        let stream = encode(LENGTH4, &[&[7; 50], b"next"]);
        let mut decoder = Decoder::new(LENGTH4, 100, 10);
        let mut address = None;
        decoder
            .feed(&stream, &mut pool, |message| {
                address = Some(message.as_bytes().as_ptr());
                Err(message.into())
            })
            .unwrap();
        assert!(decoder.has_backlog());
        assert!(!decoder.in_message());
        assert_eq!(decoder.buffered(), stream.len() - 4);
        let misses = pool.misses();
        let mut taken = Vec::new();
        decoder
            .pump(&mut pool, |message| {
                taken.push((message.as_bytes().as_ptr(), message.len()));
                Ok(())
            })
            .unwrap();
        assert_eq!(taken[0], (address.unwrap(), 50));
        assert_eq!(taken[1].1, 4);
        assert_eq!(pool.misses(), misses, "no new buffer for the second offer");
        assert!(!decoder.has_backlog());
    }

    #[test]
    fn pump_stops_again_at_the_next_refusal() {
        let mut pool = pool();
        let mut decoder = Decoder::new(Framing::Line, 100, 100);
        let mut taken = Vec::new();
        decoder.feed(b"a\nb\nc\nd", &mut pool, refuse).unwrap();
        for expected in [&b"a"[..], b"b", b"c"] {
            decoder.pump(&mut pool, take_one(&mut taken)).unwrap();
            assert_eq!(taken.last().unwrap(), expected);
        }
        // "d" is unfinished: not a backlog, but a message in progress.
        decoder.pump(&mut pool, refuse).unwrap();
        assert!(!decoder.has_backlog());
        assert!(decoder.in_message());
        assert_eq!(decoder.buffered(), 1);
        decoder
            .feed(b"\n", &mut pool, |message| {
                taken.push(message.as_bytes().to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(taken, owned(&[b"a", b"b", b"c", b"d"]));
    }

    #[test]
    fn feeding_despite_a_backlog_loses_nothing() {
        let stream = encode(LENGTH4, &[b"one", b"two", b"three"]);
        let (a, b) = stream.split_at(16);
        for inline_limit in [2, 100] {
            for pump_first in [false, true] {
                let mut pool = pool();
                let mut decoder = Decoder::new(LENGTH4, 100, inline_limit);
                decoder.feed(a, &mut pool, refuse).unwrap();
                assert!(decoder.has_backlog());
                let mut taken = Vec::new();
                if pump_first {
                    // Takes "one"; "two" stays behind, partly consumed backlog.
                    decoder.pump(&mut pool, take_one(&mut taken)).unwrap();
                    assert!(decoder.has_backlog());
                }
                decoder
                    .feed(b, &mut pool, |message| {
                        taken.push(message.as_bytes().to_vec());
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(taken, owned(&[b"one", b"two", b"three"]));
                assert_eq!(decoder.heap_capacity(), 0);
            }
        }
    }

    #[test]
    fn no_heap_memory_is_kept_between_messages() {
        let mut pool = pool();
        for framing in [Framing::Line, LENGTH4] {
            let first: &[u8] = &[b'a'; 40];
            let boundaries = [
                encode(framing, &[first]).len(),
                encode(framing, &[first, b"b"]).len(),
            ];
            let stream = encode(framing, &[first, b"b"]);
            let mut decoder = Decoder::new(framing, 100, 10);
            for (i, byte) in stream.iter().enumerate() {
                decoder.feed(&[*byte], &mut pool, |_| Ok(())).unwrap();
                if boundaries.contains(&(i + 1)) {
                    assert!(!decoder.in_message());
                    assert_eq!(decoder.buffered(), 0);
                    assert_eq!(decoder.heap_capacity(), 0);
                } else {
                    assert!(decoder.in_message(), "{framing:?} after byte {i}");
                }
            }
        }
    }

    #[test]
    fn a_failed_decoder_stays_failed_until_cleared() {
        let mut pool = pool();
        let mut decoder = Decoder::new(LENGTH4, 10, 10);
        let error = FrameError::TooLarge {
            size: 11,
            limit: 10,
        };
        assert_eq!(
            decoder.feed(b"\0\0\0\x0b", &mut pool, |_| Ok(())),
            Err(error)
        );
        assert_eq!(
            decoder.feed(b"\0\0\0\x01x", &mut pool, |_| Ok(())),
            Err(error)
        );
        assert_eq!(decoder.pump(&mut pool, |_| Ok(())), Err(error));
        assert!(!decoder.in_message() && !decoder.has_backlog());
        decoder.clear(&mut pool);
        let mut taken = Vec::new();
        decoder
            .feed(b"\0\0\0\x01x", &mut pool, |m| {
                taken.push(m.as_bytes().to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(taken, owned(&[b"x"]));
        assert_eq!(
            error.to_string(),
            "message too large: 11 bytes (declared, or received so far without an end of \
             line) exceeds max_message_size of 10 bytes"
        );
    }

    #[test]
    fn clear_gives_the_kept_buffers_back() {
        let mut pool = pool();
        let mut decoder = Decoder::new(LENGTH4, 1000, 10);
        decoder
            .feed(b"\0\0\x01\0partial", &mut pool, |_| Ok(()))
            .unwrap();
        assert!(decoder.heap_capacity() >= 256);
        let cached = pool.cached_bytes();
        decoder.clear(&mut pool);
        assert_eq!(decoder.heap_capacity(), 0);
        assert_eq!(decoder.buffered(), 0);
        assert!(!decoder.in_message());
        assert_eq!(pool.cached_bytes(), cached + 256);
    }

    #[test]
    fn raw_offers_each_input_whole() {
        let mut pool = pool();
        let mut decoder = Decoder::new(Framing::Raw, 0, 4);
        let mut taken = Vec::new();
        for input in [&b"ab\ncd"[..], b"", b"xy"] {
            decoder
                .feed(input, &mut pool, |m| {
                    taken.push((matches!(m, Message::Owned(_)), m.as_bytes().to_vec()));
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(taken, [(true, b"ab\ncd".to_vec()), (false, b"xy".to_vec())]);
        assert!(!decoder.in_message());
        // Refused, then pumped.
        decoder.feed(b"abc", &mut pool, refuse).unwrap();
        assert!(decoder.has_backlog());
        decoder
            .pump(&mut pool, |m| {
                assert_eq!(m.as_bytes(), b"abc");
                Ok(())
            })
            .unwrap();
        assert!(!decoder.has_backlog());
        assert_eq!(decoder.heap_capacity(), 0);
    }

    #[test]
    fn a_long_line_fed_byte_by_byte_is_scanned_once() {
        let mut pool = pool();
        let mut decoder = Decoder::new(Framing::Line, 1 << 20, 100);
        let line = vec![b'y'; 200_000];
        for byte in &line {
            decoder
                .feed(std::slice::from_ref(byte), &mut pool, |_| Ok(()))
                .unwrap();
        }
        let mut len = 0;
        decoder
            .feed(b"\n", &mut pool, |m| {
                len = m.len();
                Ok(())
            })
            .unwrap();
        assert_eq!(len, line.len());
        assert_eq!(decoder.bytes_scanned, line.len() + 1);
    }

    #[test]
    fn steady_state_large_messages_reuse_pool_buffers() {
        for framing in [Framing::Line, LENGTH4] {
            let mut pool = BufferPool::new(128, 64 * 1024, usize::MAX);
            let mut decoder = Decoder::new(framing, 64 * 1024, 64);
            let sizes = [100, 1000, 5000, 60_000, 10];
            let bodies: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![b'm'; n]).collect();
            let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            let stream = encode(framing, &refs);
            let mut round = |pool: &mut BufferPool| {
                let mut given_back = Vec::new();
                let mut count = 0;
                for chunk in stream.chunks(1500) {
                    decoder
                        .feed(chunk, pool, |message| {
                            count += 1;
                            if let Message::Owned(buf) = message {
                                given_back.push(buf);
                            }
                            Ok(())
                        })
                        .unwrap();
                    // The consumer is done with them: back to the pool.
                    for buf in given_back.drain(..) {
                        pool.give(buf);
                    }
                }
                assert_eq!(count, sizes.len());
            };
            round(&mut pool);
            round(&mut pool);
            let misses = pool.misses();
            for _ in 0..50 {
                round(&mut pool);
            }
            assert_eq!(pool.misses(), misses, "{framing:?}");
            assert!(pool.hits() > 50 * 4);
        }
    }

    #[test]
    fn envelopes_frame_payloads_for_sending() {
        let raw = envelope(Framing::Raw, 5).unwrap();
        assert_eq!(
            (raw.header(), raw.trailer(), raw.overhead()),
            (&b""[..], &b""[..], 0)
        );
        let line = envelope(Framing::Line, 5).unwrap();
        assert_eq!(
            (line.header(), line.trailer(), line.overhead()),
            (&b""[..], &b"\n"[..], 1)
        );
        let four = envelope(LENGTH4, 0x0102_0304).unwrap();
        assert_eq!(four.header(), b"\x01\x02\x03\x04");
        assert_eq!((four.trailer(), four.overhead()), (&b""[..], 4));
        let eight = envelope(LENGTH8, 0x0102).unwrap();
        assert_eq!(eight.header(), b"\0\0\0\0\0\0\x01\x02");
        assert_eq!(PrefixWidth::from_bytes(4), Some(PrefixWidth::Four));
        assert_eq!(PrefixWidth::from_bytes(8), Some(PrefixWidth::Eight));
        assert_eq!(PrefixWidth::from_bytes(2), None);
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_payload_too_long_for_a_four_byte_prefix_cannot_be_framed() {
        let too_long = u32::MAX as usize + 1;
        let error = envelope(LENGTH4, too_long).unwrap_err();
        assert_eq!(
            error,
            EncodeError {
                len: too_long,
                max: u32::MAX as u64
            }
        );
        assert!(error.to_string().contains("4294967296 bytes"));
        assert!(envelope(LENGTH8, too_long).is_ok());
        assert!(envelope(LENGTH4, u32::MAX as usize).is_ok());
    }

    #[test]
    fn find_newline_agrees_with_a_plain_search() {
        let mut bytes = vec![0u8; 40];
        assert_eq!(find_newline(&bytes), None);
        for i in 0..bytes.len() {
            for j in i..bytes.len() {
                bytes.fill(0xff);
                bytes[j] = b'\n';
                bytes[i] = b'\n';
                // Bytes just around '\n' (0x0a) that the word trick could confuse.
                if i > 0 {
                    bytes[i - 1] = 0x0b;
                }
                assert_eq!(find_newline(&bytes), Some(i));
                assert_eq!(
                    find_newline(&bytes[..i]),
                    bytes[..i].iter().position(|&b| b == b'\n')
                );
            }
        }
    }

    /// One run of the property test: messages, how they are sent, and how the
    /// sink behaves.
    #[derive(Clone, Debug)]
    struct Scenario {
        framing: Framing,
        inline_limit: usize,
        max_message_size: usize,
        messages: Vec<Vec<u8>>,
        /// Line framing: which messages end with `\r\n` rather than `\n`.
        crlf: Vec<bool>,
        /// Read sizes, cycled.
        chunks: Vec<usize>,
        /// Whether the sink takes each offer, cycled; ends with `true` so that
        /// pumping always progresses.
        accepts: Vec<bool>,
    }

    fn message(framing: Framing, max_len: usize) -> impl Strategy<Value = Vec<u8>> {
        let bytes = match framing {
            // No '\n' in a line, and '\r' often, to exercise the terminator.
            Framing::Line => prop::sample::select(vec![b'a', b'\r', b'z', 0, 0xff]).boxed(),
            _ => any::<u8>().boxed(),
        };
        prop::collection::vec(bytes, 0..=max_len).prop_map(move |mut message| {
            // A line cannot end with '\r': it would merge with its terminator.
            if framing == Framing::Line && message.last() == Some(&b'\r') {
                *message.last_mut().unwrap() = b'a';
            }
            message
        })
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        let framing = prop_oneof![Just(Framing::Line), Just(LENGTH4), Just(LENGTH8)];
        (framing, 1usize..=12)
            .prop_flat_map(|(framing, inline_limit)| {
                (
                    Just(framing),
                    Just(inline_limit),
                    // Sometimes every message fits, sometimes some do not.
                    prop_oneof![Just(3 * inline_limit), inline_limit..=3 * inline_limit],
                    prop::collection::vec(message(framing, 3 * inline_limit), 0..12),
                    prop::collection::vec(any::<bool>(), 1..5),
                    prop_oneof![Just(vec![1]), prop::collection::vec(1usize..=40, 1..6)],
                    prop::collection::vec(any::<bool>(), 0..8),
                )
            })
            .prop_map(
                |(framing, inline_limit, max_message_size, messages, crlf, chunks, mut accepts)| {
                    accepts.push(true);
                    Scenario {
                        framing,
                        inline_limit,
                        max_message_size,
                        messages,
                        crlf,
                        chunks,
                        accepts,
                    }
                },
            )
    }

    /// Checks one scenario; `Err` describes the first violation.
    fn check(scenario: &Scenario) -> Result<(), TestCaseError> {
        let Scenario {
            framing,
            inline_limit,
            max_message_size: max,
            ref messages,
            ref crlf,
            ref chunks,
            ref accepts,
        } = *scenario;
        // Encode, noting where each message starts.
        let mut stream = Vec::new();
        let mut starts = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            starts.push(stream.len());
            let envelope = envelope(framing, message.len()).unwrap();
            stream.extend_from_slice(envelope.header());
            stream.extend_from_slice(message);
            if framing == Framing::Line && crlf[i % crlf.len()] {
                stream.push(b'\r');
            }
            stream.extend_from_slice(envelope.trailer());
        }
        let first_too_large = messages.iter().position(|m| m.len() > max);
        let expected = &messages[..first_too_large.unwrap_or(messages.len())];
        // The last byte at which the decoder must have noticed the oversized
        // message: its prefix's last byte, or the line's byte past max + 1
        // bytes (max + 1 may be a '\r' that the next byte shows to be data).
        let deadline = first_too_large.map(|i| match framing {
            Framing::Length(width) => starts[i] + width.bytes() - 1,
            _ => starts[i] + max + 1,
        });
        let memory_bound = max + chunks.iter().max().unwrap() + 8;

        let mut pool = BufferPool::new(inline_limit + 1, max, usize::MAX);
        let mut decoder = Decoder::new(framing, max, inline_limit);
        let mut taken: Vec<Vec<u8>> = Vec::new();
        let mut verdicts = accepts.iter().copied().cycle();
        let mut spare = Vec::new();
        let mut misfiled = None;
        let mut offer = sink(|message| {
            if !verdicts.next().unwrap() {
                return Err(message.into());
            }
            let lent = matches!(message, Message::Slice(_));
            if lent != (message.len() <= inline_limit) {
                misfiled = Some(message.len());
            }
            taken.push(message.as_bytes().to_vec());
            if let Message::Owned(buf) = message {
                spare.push(buf);
            }
            Ok(())
        });
        let mut error = None;
        let mut offset = 0;
        let mut sizes = chunks.iter().cycle();
        'reading: while offset < stream.len() {
            prop_assert!(!decoder.has_backlog());
            let chunk_start = offset;
            let len = (*sizes.next().unwrap()).min(stream.len() - offset);
            offset += len;
            let mut result = decoder.feed(&stream[chunk_start..offset], &mut pool, &mut offer);
            for pumps in 0.. {
                // Each pump takes at least one message unless the sink refuses
                // it, and the sink takes one offer in `accepts.len()`.
                prop_assert!(pumps <= accepts.len() * (messages.len() + 1), "pump stalls");
                prop_assert!(decoder.buffered() <= memory_bound);
                if let Err(e) = result {
                    error = Some((e, chunk_start));
                    break 'reading;
                }
                if !decoder.has_backlog() {
                    break;
                }
                result = decoder.pump(&mut pool, &mut offer);
            }
        }
        prop_assert_eq!(misfiled, None);
        prop_assert_eq!(&taken[..], expected);
        match (first_too_large, error) {
            (None, None) => {
                prop_assert!(!decoder.in_message());
                prop_assert_eq!(decoder.buffered(), 0);
                prop_assert_eq!(decoder.heap_capacity(), 0);
            }
            (Some(_), Some((FrameError::TooLarge { size, limit }, chunk_start))) => {
                prop_assert_eq!(limit, max);
                prop_assert!(size > max as u64);
                prop_assert!(chunk_start <= deadline.unwrap(), "noticed late");
            }
            (expected, got) => prop_assert!(false, "expected error at {expected:?}, got {got:?}"),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_chunking_and_any_refusals_give_the_messages_once_in_order(s in scenario()) {
            check(&s)?;
        }
    }
}
