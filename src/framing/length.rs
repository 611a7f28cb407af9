//! Length framing: a big-endian prefix of 4 or 8 bytes, checked against
//! `max_message_size` as soon as it is complete, then that many bytes of
//! payload, offered in place when whole in the input and otherwise assembled in
//! a pooled buffer of exactly the declared size.

use super::decoder::{Decoder, Offer, State};
use super::{Frame, FrameError, Refused};
use crate::pool::BufferPool;

impl Decoder {
    pub(super) fn decode_lengths<S>(
        &mut self,
        data: &[u8],
        width: usize,
        pool: &mut BufferPool,
        sink: &mut S,
    ) -> Result<Option<usize>, FrameError>
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
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

    /// Parses a complete length prefix and checks it against the limit.
    pub(super) fn check_declared(&mut self, prefix: &[u8]) -> Result<usize, FrameError> {
        let declared = prefix
            .iter()
            .fold(0u64, |len, &byte| (len << 8) | u64::from(byte));
        match usize::try_from(declared) {
            Ok(len) if len <= self.max_message_size => Ok(len),
            _ => Err(self.too_large(declared)),
        }
    }

    /// Enters the payload of a `len`-byte message, with an assembly buffer
    /// large enough for all of it.
    pub(super) fn start_payload(&mut self, len: usize, pool: &mut BufferPool) {
        debug_assert!(self.assembly.capacity() == 0);
        if len > 0 {
            self.assembly = pool.take(len);
        }
        self.state = State::Payload { len };
    }
}
