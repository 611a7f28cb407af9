//! Framing a payload for sending: the [`Envelope`] of bytes written before
//! and after it.

use std::fmt;

use super::Framing;

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
