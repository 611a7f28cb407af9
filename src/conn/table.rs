//! The I/O thread's connection table: a vector of slots with a free list,
//! addressed by [`ConnKey`], whose unique id tells a connection from later
//! tenants of the same slot.

use std::time::Instant;

use socket2::Socket;

use super::Connection;
use crate::framing::Decoder;
use crate::token::ConnKey;

/// The table: a vector of slots with a free list, so keys stay small and
/// lookups are O(1).
#[derive(Debug, Default)]
pub struct ConnectionTable {
    slots: Vec<Option<Connection>>,
    free: Vec<u32>,
    /// The I/O thread whose table this is, for the keys it hands out.
    engine: u16,
    len: usize,
}

impl ConnectionTable {
    /// An empty table of I/O thread `engine`.
    pub fn new(engine: u16) -> Self {
        ConnectionTable {
            engine,
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

    /// Adds a connection for `socket`, opened at `now`, under `id` (unique
    /// for the server's life), and returns its key.
    pub fn insert(
        &mut self,
        socket: Socket,
        id: u64,
        decoder: Option<Decoder>,
        now: Instant,
    ) -> ConnKey {
        let connection = Connection::new(socket, id, decoder, now);
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
        ConnKey {
            index,
            engine: self.engine,
            id,
        }
    }

    /// The connection `key` names, unless it has gone.
    pub fn get(&self, key: ConnKey) -> Option<&Connection> {
        self.slots
            .get(key.index as usize)
            .and_then(Option::as_ref)
            .filter(|c| c.id == key.id)
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

    /// Every connection in the table.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> + '_ {
        self.slots.iter().flatten()
    }

    /// Keys of every connection in the table.
    pub fn keys(&self) -> impl Iterator<Item = ConnKey> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.as_ref().map(|c| ConnKey {
                index: index as u32,
                engine: self.engine,
                id: c.id,
            })
        })
    }
}
