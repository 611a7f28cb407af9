//! The epoll backend's place off Linux (after mio's `sys/shell`): a type
//! with the same name that fails to start, so that choosing a backend needs
//! no `#[cfg]` outside `sys/`. [`super::Backend::from_name`] already refuses
//! `"epoll"` here; this is the second guard, for Rust callers.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use super::{Event, Interest, Selector, Wake};
use crate::token::Token;

/// Never made: [`Selector::new`] fails with [`io::ErrorKind::Unsupported`].
pub enum Epoll {}

impl Selector for Epoll {
    fn new() -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the epoll backend exists only on Linux",
        ))
    }

    fn register(&self, _: &Socket, _: Token, _: Interest) -> io::Result<()> {
        match *self {}
    }

    fn set_interest(&self, _: &Socket, _: Token, _: Interest) -> io::Result<()> {
        match *self {}
    }

    fn deregister(&self, _: &Socket) -> io::Result<()> {
        match *self {}
    }

    fn select(&mut self, _: &mut Vec<Event>, _: Option<Duration>) -> io::Result<()> {
        match *self {}
    }

    fn waker(&self) -> Arc<dyn Wake> {
        match *self {}
    }

    fn pollable(&self) -> Option<i64> {
        match *self {}
    }
}
