//! The slots of the two rings: what the I/O thread tells the Python side
//! ([`Delivery`]) and what the Python side asks of the I/O thread
//! ([`Command`]).
//!
//! Every slot owns a byte buffer allocated once, when the ring is made. Data is
//! copied into it in place (by `recv` on the I/O thread, by `memcpy` from a
//! Python object on the other side), so passing messages allocates nothing.
//! A delivery larger than a slot carries a pooled buffer instead (see
//! [`crate::inbound`]); a command larger than a slot spans several
//! consecutive slots, unless its bytes are lent ([`Loan`]): then the slot
//! points at them. [`PendingBytes`], the output count both sides keep for a
//! connection, lives here too: [`Opened`] carries it across the ring.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::blank::Blank;
use crate::close_reason::CloseReason;
use crate::token::ConnKey;

/// What a [`Delivery`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeliveryKind {
    /// A connection was accepted; `opened` is set.
    #[default]
    Opened,
    /// `len` bytes the peer sent are in `buf`.
    Data,
    /// The peer shut down its sending side; more data will not come.
    Eof,
    /// The connection's write queue rose above `write_buffer_high` (reading
    /// it stops). `WritingResumed` follows if it falls to `write_buffer_low`
    /// before the connection closes, never after `Closed`.
    WritingPaused,
    /// The write queue of a connection whose writing was paused fell to
    /// `write_buffer_low` or below.
    WritingResumed,
    /// The connection is closed, for this reason; nothing more will be
    /// delivered for it.
    Closed(CloseReason),
    /// A problem the application should hear of; `detail` says what.
    Error,
    /// The peer sent a message larger than `max_message_size`; `detail` says
    /// how large. No more input is delivered; the consumer closes the
    /// connection (`Close`) once it has answered the messages before this,
    /// and `Closed(TooLarge)` follows.
    TooLarge,
    /// The I/O thread failed (a panic); `detail` says why. `Closed` for every
    /// connection and then `Stopped` follow.
    Failed,
    /// The server is stopping: it accepts no more connections and reads no
    /// more input, so every `Data` was delivered before this. The consumer
    /// answers with [`CommandKind::Shutdown`] once it has handled them.
    Draining,
    /// The I/O thread has shut down; it was the last delivery.
    Stopped,
}

/// Facts about a freshly accepted connection.
#[derive(Clone, Debug)]
pub struct Opened {
    /// The socket's fd (the SOCKET handle on Windows), for display only.
    pub fd: i64,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// The local address the connection arrived on.
    pub local: Option<SocketAddr>,
    /// Its count of bytes accepted and not yet sent.
    pub pending: PendingBytes,
}

/// Bytes accepted for a connection and not yet written to its socket, counted
/// where the application can read them (`conn.pending_bytes`): the sender
/// adds before it queues a send, the I/O thread subtracts what the socket
/// takes or what is dropped.
#[derive(Clone, Debug, Default)]
pub struct PendingBytes(Arc<AtomicUsize>);

impl PendingBytes {
    /// The count now.
    pub fn get(&self) -> usize {
        self.0.load(Relaxed)
    }

    /// `n` more bytes were accepted.
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n, Relaxed);
    }

    /// `n` bytes were written or dropped.
    pub fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Relaxed);
    }

    /// `n` bytes the sender counted were not queued after all. Saturating:
    /// when the server stops in the middle of a long send, the I/O thread may
    /// have subtracted the parts it applied already.
    pub fn withdraw(&self, n: usize) {
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |count| Some(count.saturating_sub(n)));
    }
}

/// One slot of the I/O thread → Python ring.
#[derive(Debug)]
pub struct Delivery {
    /// What happened.
    pub kind: DeliveryKind,
    /// To which connection (unused for `Error`, `Failed` and `Stopped`).
    pub conn: ConnKey,
    /// For `Opened`.
    pub opened: Option<Opened>,
    /// For `Error` and `Failed`: a description. Allocated only on those rare
    /// paths.
    pub detail: Option<String>,
    /// For `Data`: how many payload bytes there are.
    pub len: usize,
    /// Pre-allocated payload buffer.
    pub buf: Box<[u8]>,
    /// For `Data` larger than `buf`: the payload, in a buffer of the I/O
    /// thread's pool, which takes it back when it reuses the slot.
    pub large: Option<Vec<u8>>,
    /// For `Data` larger than `buf`, instead of `large`: the payload, in
    /// storage the consumer lent ([`Blank`]). The consumer may take it out
    /// of the slot; the I/O thread gives back to the stock what it leaves.
    blank: Option<Blank>,
}

impl Delivery {
    /// An empty slot with a payload buffer of `slot_size` bytes.
    pub fn with_capacity(slot_size: usize) -> Delivery {
        Delivery {
            kind: DeliveryKind::default(),
            conn: ConnKey::default(),
            opened: None,
            detail: None,
            len: 0,
            buf: vec![0; slot_size].into_boxed_slice(),
            large: None,
            blank: None,
        }
    }

    /// Makes `blank`, which holds the payload, this slot's payload.
    pub(crate) fn put_blank(&mut self, blank: Blank) {
        self.len = blank.len();
        self.blank = Some(blank);
    }

    /// Takes out the blank that holds the payload, if there is one: the
    /// payload goes with it, and the slot's is empty.
    pub(crate) fn take_blank(&mut self) -> Option<Blank> {
        let blank = self.blank.take()?;
        self.len = 0;
        Some(blank)
    }

    /// True if a blank holds the payload.
    #[cfg(test)]
    pub(crate) fn has_blank(&self) -> bool {
        self.blank.is_some()
    }

    /// The valid payload bytes.
    pub fn data(&self) -> &[u8] {
        match (&self.large, &self.blank) {
            (Some(large), _) => &large[..self.len],
            (None, Some(blank)) => &blank.filled()[..self.len],
            (None, None) => &self.buf[..self.len],
        }
    }
}

/// What a [`Command`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CommandKind {
    /// Append the `len` bytes in `buf` to what the connection sends.
    #[default]
    Send,
    /// Flush what is queued for the connection, then close it.
    Close,
    /// Drop what is queued for the connection and reset it (RST) at once.
    Abort,
    /// Close every connection once its queue has drained (by the stop
    /// deadline at the latest). Sent in answer to [`DeliveryKind::Draining`],
    /// behind every reply to the input delivered before it.
    Shutdown,
    /// Stop reading the connection until `ResumeReading`.
    PauseReading,
    /// Read the connection again.
    ResumeReading,
    /// Panic on the I/O thread (tests of the failure path only).
    #[cfg(test)]
    Panic,
    /// Hold the I/O thread inside this command until the test lets it go
    /// (see `Shared::test_hold`; tests only).
    #[cfg(test)]
    Hold,
}

/// Bytes a `Send` command points to instead of carrying them: lent by the
/// sender, which keeps them alive and unchanged until the I/O thread has
/// released the command's slot (see [`Sender::lend`](crate::server::Sender::lend)).
#[derive(Clone, Copy, Debug)]
pub struct Loan {
    ptr: *const u8,
    len: usize,
    /// How many of the command's own bytes go before the lent ones (a
    /// framing header); the rest of them go after (a trailer).
    pub head: usize,
}

// SAFETY: a loan is a pointer to bytes that nobody writes while it exists
// (the lender's promise), so reading them from the I/O thread is sound.
unsafe impl Send for Loan {}

impl Loan {
    /// A loan of `bytes`, with `head` of the command's own bytes before them.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged until the command that carries
    /// the loan has been released by the I/O thread.
    pub unsafe fn new(bytes: &[u8], head: usize) -> Loan {
        Loan {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            head,
        }
    }

    /// The lent bytes.
    ///
    /// # Safety
    /// Only while the command that carries the loan has not been released.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        // SAFETY: `ptr` and `len` came from a valid slice, which the lender
        // keeps alive and unchanged until the command is released (the
        // caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// One slot of the Python → I/O thread ring.
#[derive(Debug)]
pub struct Command {
    /// What to do.
    pub kind: CommandKind,
    /// To which connection.
    pub conn: ConnKey,
    /// For `Send`: how many bytes of `buf` are valid.
    pub len: usize,
    /// For `Send`: more parts of the same message follow in later slots.
    pub more: bool,
    /// For `Send`: bytes sent from where the sender keeps them, around which
    /// the `len` bytes of `buf` go (see [`Loan::head`]).
    pub loan: Option<Loan>,
    /// Pre-allocated payload buffer.
    pub buf: Box<[u8]>,
}

impl Command {
    /// An empty slot with a payload buffer of `slot_size` bytes.
    pub fn with_capacity(slot_size: usize) -> Command {
        Command {
            kind: CommandKind::default(),
            conn: ConnKey::default(),
            len: 0,
            more: false,
            loan: None,
            buf: vec![0; slot_size].into_boxed_slice(),
        }
    }

    /// The valid payload bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
