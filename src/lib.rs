//! rsepoll: a TCP server whose network I/O runs on its own thread, for
//! applications whose logic runs on another (a Python thread, in the package
//! this crate builds).
//!
//! ```text
//!            sockets                      delivery ring (SPSC)
//!  clients ◀────────▶  I/O thread  ──────────────────────────▶  consumer thread
//!                      (reactor)   ◀──────────────────────────  (Python callbacks)
//!                                       command ring (SPSC)
//! ```
//!
//! The I/O thread ([`reactor`]) waits on a readiness [`sys::Selector`]
//! (edge-triggered epoll on Linux, a one-shot portable poller elsewhere),
//! accepts, reads into the slots of the delivery [`ring`] and writes what the
//! command ring brings, queueing per connection ([`conn`]) what a socket does not
//! take at once. The consumer side ([`server::Running`]) takes deliveries in
//! batches and answers with commands. Neither side blocks the other: each
//! sleeps only when it has nothing to do and is woken through [`wake`].
//!
//! [`bench`] is the load generator behind `python -m rsepoll.bench`.
//!
//! The Python bindings live in `python` (behind the `python` feature); every
//! other module is plain Rust, tested with `cargo test`.

#![deny(missing_docs)]

pub mod bench;
pub(crate) mod blank;
pub mod close_reason;
pub mod config;
pub mod conn;
pub mod framing;
pub mod handover;
pub(crate) mod inbound;
pub mod message;
pub mod pool;
pub(crate) mod reactor;
pub mod ring;
pub mod server;
pub(crate) mod shared;
pub mod stats;
pub(crate) mod sync;
pub mod sys;
pub mod timer;
pub mod token;
pub mod wake;

#[cfg(feature = "python")]
mod python;

/// The loop's delivery side, for the model checks of `tests/loom.rs`.
#[cfg(loom)]
#[doc(hidden)]
pub use reactor::LoomOutbox;
