//! The requests the load generator sends and the replies it expects.
//!
//! Every request is one well-formed message of exactly `size` bytes on the
//! wire (the approach of `benchmarks/loadgen`):
//!
//! - [`Framing::Raw`]: the whole request is payload;
//! - [`Framing::Line`]: `size - 1` payload bytes, none of them `\n` or `\r`,
//!   then `\n`;
//! - [`Framing::Length`]: a 4-byte big-endian length holding `size - 4`, then
//!   the payload.
//!
//! The payload's body differs between connections, so crossed streams show,
//! and its first and last 8 bytes carry the request's sequence number (in
//! line framing 7 bits a byte with the high bit set, so that no stamp holds a
//! line end). The expected reply follows [`Verify`]: the request itself, or
//! its payload reversed inside the same framing, which is what the
//! `python -m rsepoll` reverse server sends back.

use std::ops::Range;

/// How a request is cut into a message on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// The bytes as they are.
    Raw,
    /// A line ended by `\n`.
    Line,
    /// A 4-byte big-endian length, then that many bytes.
    Length,
}

/// What a reply must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// The very bytes of the request.
    Echo,
    /// The request with its payload reversed (the framing bytes in place).
    Reverse,
    /// Anything of the request's length.
    None,
}

impl Framing {
    /// Parses `raw`, `line` or `length`.
    pub fn parse(name: &str) -> Option<Framing> {
        match name {
            "raw" => Some(Framing::Raw),
            "line" => Some(Framing::Line),
            "length" => Some(Framing::Length),
            _ => None,
        }
    }

    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Raw => "raw",
            Framing::Line => "line",
            Framing::Length => "length",
        }
    }

    /// The smallest request that has at least one payload byte.
    pub fn min_size(self) -> usize {
        match self {
            Framing::Raw => 1,
            Framing::Line => 2,
            Framing::Length => 5,
        }
    }

    /// The payload's range in a request of `size` bytes.
    pub fn payload(self, size: usize) -> Range<usize> {
        match self {
            Framing::Raw => 0..size,
            Framing::Line => 0..size - 1,
            Framing::Length => 4..size,
        }
    }

    /// The stamp for `seq`: no byte of it is `\n` or `\r` in line framing.
    fn stamp(self, seq: u64) -> [u8; 8] {
        match self {
            Framing::Line => std::array::from_fn(|i| 0x80 | ((seq >> (7 * i)) & 0x7f) as u8),
            Framing::Raw | Framing::Length => seq.to_le_bytes(),
        }
    }
}

impl Verify {
    /// Parses `echo`, `reverse` or `none`.
    pub fn parse(name: &str) -> Option<Verify> {
        match name {
            "echo" => Some(Verify::Echo),
            "reverse" => Some(Verify::Reverse),
            "none" => Some(Verify::None),
            _ => None,
        }
    }

    /// What a reply must be, in words.
    pub fn expectation(self) -> &'static str {
        match self {
            Verify::Reverse => "the request with its payload reversed",
            Verify::Echo | Verify::None => "the request",
        }
    }

    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Verify::Echo => "echo",
            Verify::Reverse => "reverse",
            Verify::None => "none",
        }
    }
}

/// Checks that requests of `size` bytes can be messages in `framing`.
pub fn check_size(framing: Framing, size: usize) -> Result<(), String> {
    if size < framing.min_size() {
        return Err(format!(
            "--size must be at least {} with {} framing",
            framing.min_size(),
            framing.name()
        ));
    }
    if framing == Framing::Length && size - 4 > u32::MAX as usize {
        return Err("--size less the 4-byte prefix must fit in 32 bits".into());
    }
    Ok(())
}

/// One connection's request and the reply it expects, re-stamped for every
/// round trip.
#[derive(Clone, Debug)]
pub struct Message {
    request: Vec<u8>,
    /// Empty unless the reply differs from the request (reverse).
    reversed: Vec<u8>,
    payload: Range<usize>,
    framing: Framing,
    verify: Verify,
}

impl Message {
    /// The request of `size` bytes for connection `id`, stamped with sequence
    /// number 0. `size` must be at least [`Framing::min_size`].
    pub fn new(id: usize, size: usize, framing: Framing, verify: Verify) -> Message {
        let payload = framing.payload(size);
        let mut request: Vec<u8> = (0..size).map(|i| (i * 31 + id * 7 + 1) as u8).collect();
        match framing {
            Framing::Raw => {}
            Framing::Line => {
                // No line end inside the payload: `\n` would cut the message
                // short, and a `\r` before the final `\n` would be dropped.
                for b in &mut request[payload.clone()] {
                    if *b == b'\n' || *b == b'\r' {
                        *b ^= 0x20;
                    }
                }
                request[size - 1] = b'\n';
            }
            Framing::Length => {
                let len = u32::try_from(size - 4).expect("checked by check_size");
                request[..4].copy_from_slice(&len.to_be_bytes());
            }
        }
        let reversed = if verify == Verify::Reverse {
            let mut r = request.clone();
            r[payload.clone()].reverse();
            r
        } else {
            Vec::new()
        };
        let mut message = Message {
            request,
            reversed,
            payload,
            framing,
            verify,
        };
        message.stamp(0);
        message
    }

    /// Writes `seq` into the first and last 8 bytes of the payload (of the
    /// expected reply too).
    pub fn stamp(&mut self, seq: u64) {
        let stamp = self.framing.stamp(seq);
        let (lo, hi) = (self.payload.start, self.payload.end);
        let n = (hi - lo).min(8);
        self.request[lo..lo + n].copy_from_slice(&stamp[..n]);
        self.request[hi - n..hi].copy_from_slice(&stamp[..n]);
        if self.verify == Verify::Reverse {
            // The stamped ranges mirror each other in the reversed payload.
            for i in (lo..lo + n).chain(hi - n..hi) {
                self.reversed[lo + hi - 1 - i] = self.request[i];
            }
        }
    }

    /// The bytes to send.
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// The reply [`Verify::Echo`] or [`Verify::Reverse`] expects (the request
    /// for [`Verify::None`], which compares nothing).
    pub fn expected(&self) -> &[u8] {
        match self.verify {
            Verify::Reverse => &self.reversed,
            Verify::Echo | Verify::None => &self.request,
        }
    }

    /// The length of a request (and of its reply).
    pub fn len(&self) -> usize {
        self.request.len()
    }

    /// Never true: a request has at least one payload byte.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty()
    }

    /// Whether `chunk`, received at `offset` into the reply, is what the reply
    /// should hold there. The caller makes sure that `offset + chunk.len()`
    /// does not pass the reply's end.
    pub fn check(&self, offset: usize, chunk: &[u8]) -> bool {
        self.verify == Verify::None || self.expected()[offset..offset + chunk.len()] == *chunk
    }
}

/// `count` consecutive requests of connection `id` (stamped 1 to `count`)
/// and their expected replies, for streaming: a connection sends the
/// requests over and over and checks the replies against the same cycle.
pub fn cycle(
    id: usize,
    size: usize,
    count: usize,
    framing: Framing,
    verify: Verify,
) -> (Vec<u8>, Vec<u8>) {
    let mut message = Message::new(id, size, framing, verify);
    let (mut requests, mut replies) = (Vec::with_capacity(size * count), Vec::new());
    for seq in 1..=count as u64 {
        message.stamp(seq);
        requests.extend_from_slice(message.request());
        if verify != Verify::None {
            replies.extend_from_slice(message.expected());
        }
    }
    (requests, replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAMINGS: [Framing; 3] = [Framing::Raw, Framing::Line, Framing::Length];

    fn reverse_payload(framing: Framing, message: &[u8]) -> Vec<u8> {
        let mut r = message.to_vec();
        r[framing.payload(message.len())].reverse();
        r
    }

    #[test]
    fn requests_are_well_formed_messages_of_exactly_size_bytes() {
        for framing in FRAMINGS {
            for size in framing.min_size()..300 {
                for id in [0, 1, 77] {
                    let mut m = Message::new(id, size, framing, Verify::Echo);
                    for seq in [0, 1, 10, 0x0a0d, u64::MAX] {
                        m.stamp(seq);
                        let r = m.request();
                        assert_eq!(r.len(), size);
                        match framing {
                            Framing::Raw => {}
                            Framing::Line => {
                                assert_eq!(r[size - 1], b'\n');
                                assert!(!r[..size - 1].iter().any(|b| *b == b'\n' || *b == b'\r'));
                            }
                            Framing::Length => {
                                let len = u32::from_be_bytes(r[..4].try_into().unwrap());
                                assert_eq!(len as usize, size - 4);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stamps_tell_requests_and_connections_apart() {
        for framing in FRAMINGS {
            let mut m = Message::new(3, 64, framing, Verify::Echo);
            m.stamp(1);
            let first = m.request().to_vec();
            m.stamp(2);
            assert_ne!(first, m.request());
            let mut other = Message::new(4, 64, framing, Verify::Echo);
            other.stamp(2);
            assert_ne!(other.request(), m.request());
        }
    }

    #[test]
    fn expected_replies_follow_verify() {
        for framing in FRAMINGS {
            for size in framing.min_size()..100 {
                let mut echo = Message::new(5, size, framing, Verify::Echo);
                let mut rev = Message::new(5, size, framing, Verify::Reverse);
                let none = Message::new(5, size, framing, Verify::None);
                for seq in [1, 2, 999_999] {
                    echo.stamp(seq);
                    rev.stamp(seq);
                    assert_eq!(echo.request(), rev.request());
                    assert_eq!(echo.expected(), echo.request());
                    assert_eq!(rev.expected(), reverse_payload(framing, rev.request()));
                    // Whole, and in any two pieces.
                    assert!(echo.check(0, echo.request()));
                    assert!(rev.check(0, &reverse_payload(framing, rev.request())));
                    let reply = rev.expected().to_vec();
                    for cut in 0..=size {
                        assert!(rev.check(0, &reply[..cut]) && rev.check(cut, &reply[cut..]));
                    }
                    // Anything of the right length passes with none.
                    assert!(none.check(0, &vec![0xee; size]));
                }
            }
        }
    }

    #[test]
    fn wrong_replies_fail() {
        for framing in FRAMINGS {
            let mut echo = Message::new(1, 40, framing, Verify::Echo);
            let mut rev = Message::new(1, 40, framing, Verify::Reverse);
            echo.stamp(7);
            rev.stamp(7);
            // A reversed reply is not an echo, and the other way round.
            assert!(!echo.check(0, rev.expected()));
            assert!(!rev.check(0, echo.expected()));
            // One flipped byte anywhere, even in the framing.
            for i in 0..40 {
                let mut bad = echo.expected().to_vec();
                bad[i] ^= 1;
                assert!(!echo.check(0, &bad), "byte {i}");
                assert!(!echo.check(i, &bad[i..]), "byte {i} from {i}");
            }
            // The previous request's reply.
            let old = echo.expected().to_vec();
            echo.stamp(8);
            assert!(!echo.check(0, &old));
        }
    }

    #[test]
    fn cycles_are_consecutive_requests() {
        for framing in FRAMINGS {
            let (requests, replies) = cycle(2, 50, 4, framing, Verify::Reverse);
            assert_eq!((requests.len(), replies.len()), (200, 200));
            let mut m = Message::new(2, 50, framing, Verify::Reverse);
            for (i, seq) in (1..=4).enumerate() {
                m.stamp(seq);
                assert_eq!(&requests[i * 50..(i + 1) * 50], m.request());
                assert_eq!(&replies[i * 50..(i + 1) * 50], m.expected());
            }
            let (_, none) = cycle(2, 50, 4, framing, Verify::None);
            assert!(none.is_empty());
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(check_size(Framing::Raw, 1).is_ok());
        assert!(check_size(Framing::Raw, 0).is_err());
        assert!(check_size(Framing::Line, 1).is_err());
        assert!(check_size(Framing::Line, 2).is_ok());
        assert_eq!(
            check_size(Framing::Length, 4).unwrap_err(),
            "--size must be at least 5 with length framing"
        );
        assert!(check_size(Framing::Length, 5).is_ok());
    }
}
