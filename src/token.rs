//! How a connection is named: [`ConnKey`] across the rings and the
//! tables, and [`Token`], what the poller hands back with each event (which
//! listener or which connection it is about).
//!
//! The kernel reuses fd numbers at once, and one `epoll_wait` batch can hold an
//! event for a connection that an earlier event in the same batch closed and
//! whose table slot a new connection has already taken. So a connection's token
//! carries, besides its slot index, the low bits of the connection's unique id,
//! and the reactor drops events whose id bits do not match the slot's current
//! tenant.

/// Identifies one connection for the whole life of a server.
///
/// `engine` is the I/O thread that serves it, `index` its slot in that
/// thread's table, for O(1) lookup; `id` is unique for the server's life
/// (across its I/O threads) and tells this connection from earlier and later
/// tenants of the same slot (and of the same fd number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// Slot in the connection table.
    pub index: u32,
    /// The I/O thread, counting from 0.
    pub engine: u16,
    /// Unique id, counting from 1.
    pub id: u64,
}

/// A poller registration key. Fits in 64 bits; the top bit tells listeners from
/// connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

const LISTENER_BIT: u64 = 1 << 63;
const ID_BITS_MASK: u64 = (1 << 31) - 1;

/// What a [`Token`] refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The listener at this index of the reactor's listener list.
    Listener(usize),
    /// The connection table slot `index`, as long as its tenant's id matches
    /// `id_bits` (see [`Token::connection`]).
    Connection {
        /// Slot in the connection table.
        index: u32,
        /// The low 31 bits of the connection id the token was made for.
        id_bits: u32,
    },
}

impl Token {
    /// The token of listener number `index`.
    pub fn listener(index: usize) -> Token {
        Token(LISTENER_BIT | index as u64)
    }

    /// The token of connection `id` living in table slot `index`.
    pub fn connection(index: u32, id: u64) -> Token {
        Token(((id & ID_BITS_MASK) << 32) | u64::from(index))
    }

    /// Decodes the token.
    pub fn target(self) -> Target {
        if self.0 & LISTENER_BIT != 0 {
            Target::Listener((self.0 & !LISTENER_BIT) as usize)
        } else {
            Target::Connection {
                index: self.0 as u32,
                id_bits: (self.0 >> 32) as u32,
            }
        }
    }
}

/// True if a token made with `id_bits` belongs to connection `id`.
pub fn id_matches(id: u64, id_bits: u32) -> bool {
    id & ID_BITS_MASK == u64::from(id_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_and_connection_tokens_round_trip() {
        assert_eq!(Token::listener(3).target(), Target::Listener(3));
        let token = Token::connection(7, 0xdead_beef_1234);
        match token.target() {
            Target::Connection { index, id_bits } => {
                assert_eq!(index, 7);
                assert!(id_matches(0xdead_beef_1234, id_bits));
                assert!(!id_matches(0xdead_beef_1235, id_bits));
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn connection_tokens_never_look_like_listeners() {
        for id in [0, 1, u64::MAX, u64::MAX >> 1] {
            let token = Token::connection(u32::MAX, id);
            assert!(matches!(token.target(), Target::Connection { .. }));
        }
    }
}
