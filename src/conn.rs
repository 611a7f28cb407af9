//! The I/O thread's connection table: each open socket with its write queue
//! and where it is in its life.
//!
//! Only the I/O thread touches this table, and only the I/O thread closes
//! sockets, always deregistering them first. The Python side refers to a
//! connection by [`ConnKey`] (slot index plus unique id); a key whose id no
//! longer matches the slot's tenant is stale and resolves to nothing, so a
//! message for a closed connection can never reach the next connection that gets
//! the same slot or the same fd number.

use std::time::Instant;

use socket2::Socket;

use crate::message::ConnKey;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading and writing.
    Open,
    /// The peer shut down its side; `Eof` was delivered and the Python side will
    /// ask for the close once it has answered what came before it.
    PeerDone,
    /// The application asked for a close: input is discarded, the write queue
    /// drains, then the sending side is shut down.
    Closing,
    /// Closed as far as the application knows (`Closed` was delivered). The
    /// socket lingers, reading and discarding until the peer's EOF or the
    /// deadline, so that unread input cannot make the kernel reset the
    /// connection and destroy the reply the peer has not read yet.
    Lingering {
        /// When to give up waiting for the peer's EOF.
        deadline: Instant,
    },
}

/// Bytes accepted for sending that the socket has not taken yet, in order.
///
/// Allocated the first time a send is partial and reused after that; a
/// connection whose sends always go through at once never allocates.
#[derive(Debug, Default)]
pub struct WriteQueue {
    bytes: Vec<u8>,
    start: usize,
}

impl WriteQueue {
    /// True if nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.start == self.bytes.len()
    }

    /// Number of bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// The bytes to send next.
    pub fn front(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// Appends `data` behind everything already waiting.
    pub fn push(&mut self, data: &[u8]) {
        // Reclaim the sent prefix before growing, so a queue that keeps cycling
        // stays within the size it needed once.
        if self.start > 0 && self.bytes.capacity() - self.bytes.len() < data.len() {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        self.bytes.extend_from_slice(data);
    }

    /// Drops the first `n` bytes, which the socket took.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.bytes.len());
        if self.start == self.bytes.len() {
            self.bytes.clear();
            self.start = 0;
        }
    }

    /// Frees the memory (when the connection is gone).
    pub fn discard(&mut self) {
        self.bytes = Vec::new();
        self.start = 0;
    }
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The socket; closed when the connection is dropped.
    pub socket: Socket,
    /// The unique id of this tenant of the slot.
    pub id: u64,
    /// Where it is in its life.
    pub phase: Phase,
    /// What waits to be sent.
    pub queue: WriteQueue,
    /// The kernel may hold more input than was read: the last read stopped
    /// before `EAGAIN` (a budget or a full ring). Such a connection is on the
    /// reactor's ready list, because an edge-triggered poller will not report it
    /// again.
    pub unread_input: bool,
    /// The connection is on the reactor's ready list (at most once).
    pub in_ready_list: bool,
    /// The poller said a short read may leave input behind (see
    /// [`crate::sys::Event::read_fully`]): read until `EAGAIN` or EOF, because
    /// edge triggering will not report that input again.
    pub read_fully: bool,
    /// The peer's EOF was read. The socket then stays readable for good, so a
    /// one-shot registration must stop watching it for input.
    pub eof_seen: bool,
}

impl Connection {
    /// True while sends for this connection are still accepted.
    pub fn accepts_output(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::PeerDone | Phase::Closing)
    }
}

/// The table: a vector of slots with a free list, so keys stay small and
/// lookups are O(1).
#[derive(Debug, Default)]
pub struct ConnectionTable {
    slots: Vec<Option<Connection>>,
    free: Vec<u32>,
    next_id: u64,
    len: usize,
}

impl ConnectionTable {
    /// An empty table.
    pub fn new() -> Self {
        ConnectionTable {
            next_id: 1,
            ..Default::default()
        }
    }

    /// Number of connections in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the table holds no connection.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a connection for `socket` and returns its key.
    pub fn insert(&mut self, socket: Socket) -> ConnKey {
        let id = self.next_id;
        self.next_id += 1;
        let connection = Connection {
            socket,
            id,
            phase: Phase::Open,
            queue: WriteQueue::default(),
            unread_input: false,
            in_ready_list: false,
            read_fully: false,
            eof_seen: false,
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = Some(connection);
                index
            }
            None => {
                let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 connections");
                self.slots.push(Some(connection));
                index
            }
        };
        self.len += 1;
        ConnKey { index, id }
    }

    /// The connection `key` names, unless it has gone.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut Connection> {
        self.slots
            .get_mut(key.index as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.id == key.id)
    }

    /// The connection in slot `index`, whoever it is.
    pub fn slot_mut(&mut self, index: u32) -> Option<&mut Connection> {
        self.slots.get_mut(index as usize).and_then(Option::as_mut)
    }

    /// Removes the connection `key` names and returns it (the caller
    /// deregisters and drops it).
    pub fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.as_ref().is_some_and(|c| c.id == key.id) {
            self.free.push(key.index);
            self.len -= 1;
            slot.take()
        } else {
            None
        }
    }

    /// Keys of every connection in the table.
    pub fn keys(&self) -> impl Iterator<Item = ConnKey> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.as_ref().map(|c| ConnKey {
                index: index as u32,
                id: c.id,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Type};

    fn socket() -> Socket {
        Socket::new(Domain::IPV4, Type::STREAM, None).unwrap()
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_key() {
        let mut table = ConnectionTable::new();
        let old = table.insert(socket());
        assert!(table.remove(old).is_some());
        let new = table.insert(socket());
        assert_eq!(new.index, old.index);
        assert_ne!(new.id, old.id);
        assert!(table.get_mut(old).is_none());
        assert!(table.remove(old).is_none());
        assert!(table.get_mut(new).is_some());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn write_queue_keeps_order_across_partial_consumes() {
        let mut queue = WriteQueue::default();
        queue.push(b"hello ");
        queue.consume(3);
        queue.push(b"world");
        assert_eq!(queue.front(), b"lo world");
        queue.consume(queue.len());
        assert!(queue.is_empty());
        queue.push(b"again");
        assert_eq!(queue.front(), b"again");
    }

    #[test]
    fn write_queue_reuses_its_allocation_when_cycling() {
        let mut queue = WriteQueue::default();
        queue.push(&[1; 1000]);
        let capacity = queue.bytes.capacity();
        for _ in 0..100 {
            queue.consume(600);
            queue.push(&[2; 600]);
        }
        assert_eq!(queue.len(), 1000);
        assert_eq!(queue.bytes.capacity(), capacity);
    }
}
