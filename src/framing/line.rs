//! Line framing: bytes up to `\n`, less a `\r` just before it. The search
//! looks no further than `max_message_size` could reach, the line so far is
//! kept (and scanned) once, and a trailing `\r` is held back as a flag.

use super::decoder::{Decoder, Offer, State};
use super::{Frame, FrameError, Refused};
use crate::pool::BufferPool;

impl Decoder {
    pub(super) fn decode_lines<S>(
        &mut self,
        data: &[u8],
        pool: &mut BufferPool,
        sink: &mut S,
    ) -> Result<Option<usize>, FrameError>
    where
        S: FnMut(Frame<'_>) -> Result<(), Refused>,
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

    /// Appends a line's bytes (after a `\r` if `cr` is set) to the assembly,
    /// growing it through the pool.
    pub(super) fn append_to_assembly(&mut self, cr: bool, bytes: &[u8], pool: &mut BufferPool) {
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
}

/// Index of the first `\n` in `bytes`, eight bytes at a time.
pub(super) fn find_newline(bytes: &[u8]) -> Option<usize> {
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
