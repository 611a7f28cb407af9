//! What the dispatcher reads out of each delivery slot: [`Item`], with the
//! `Connection` object it concerns, made by [`ConnectionFactory`] when the
//! connection opens and found in [`Connections`] for every delivery after.
//!
//! An item owns what the callback needs (the payload is copied into a
//! `bytes` object here, or is the object it was read into: `blanks.rs`),
//! so that the slot can go back to the I/O thread before the callback runs.

use std::sync::atomic::Ordering::SeqCst;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::blanks::Blanks;
use super::connection::PyConnection;
use super::loans::Loans;
use crate::close_reason::CloseReason;
use crate::framing::Framing;
use crate::message::{Delivery, DeliveryKind};
use crate::server::WeakSender;
use crate::token::ConnKey;

/// Makes the `Connection` objects of one run.
pub(super) struct ConnectionFactory {
    pub(super) server_id: u64,
    pub(super) framing: Framing,
    pub(super) sender: WeakSender,
    pub(super) loans: std::sync::Weak<Loans>,
}

/// The `Connection` objects of the open connections, by engine and table
/// slot: one lookup per delivery, without hashing.
#[derive(Default)]
pub(super) struct Connections {
    by_engine: Vec<Vec<Option<Py<PyConnection>>>>,
}

impl Connections {
    pub(super) fn slot(&mut self, key: ConnKey) -> &mut Option<Py<PyConnection>> {
        let engine = usize::from(key.engine);
        if self.by_engine.len() <= engine {
            self.by_engine.resize_with(engine + 1, Vec::new);
        }
        let slots = &mut self.by_engine[engine];
        let index = key.index as usize;
        if slots.len() <= index {
            slots.resize_with(index + 1, || None);
        }
        &mut slots[index]
    }

    /// The connection `key` names, if it is open.
    pub(super) fn get(&self, py: Python<'_>, key: ConnKey) -> Option<Py<PyConnection>> {
        self.by_engine
            .get(usize::from(key.engine))?
            .get(key.index as usize)?
            .as_ref()
            .filter(|c| c.get().key == key)
            .map(|c| c.clone_ref(py))
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Py<PyConnection>> {
        self.by_engine.iter().flatten().flatten()
    }

    pub(super) fn drain(&mut self) -> impl Iterator<Item = Py<PyConnection>> + '_ {
        self.by_engine.drain(..).flatten().flatten()
    }
}

/// A delivery, read out of its slot.
pub(super) enum Item<'py> {
    Opened(Py<PyConnection>),
    Data(Py<PyConnection>, Bound<'py, PyBytes>),
    Eof(Py<PyConnection>),
    WritingPaused(Py<PyConnection>),
    WritingResumed(Py<PyConnection>),
    Closed(Py<PyConnection>, CloseReason),
    Error(String),
    TooLarge(Py<PyConnection>, String),
    Failed(String),
    Nothing,
}

impl<'py> Item<'py> {
    /// Reads `delivery`, making or finding its connection's object; a
    /// payload read into a blank goes through `blanks`.
    pub(super) fn read(
        py: Python<'py>,
        factory: &ConnectionFactory,
        connections: &mut Connections,
        blanks: &mut Blanks,
        delivery: &mut Delivery,
    ) -> Item<'py> {
        let key = delivery.conn;
        match delivery.kind {
            DeliveryKind::Opened => {
                let Some(opened) = delivery.opened.clone() else {
                    return Item::Nothing;
                };
                let conn = PyConnection::new(
                    key,
                    factory.server_id,
                    opened,
                    factory.framing,
                    factory.sender.clone(),
                    factory.loans.clone(),
                );
                match Py::new(py, conn) {
                    Ok(conn) => {
                        *connections.slot(key) = Some(conn.clone_ref(py));
                        Item::Opened(conn)
                    }
                    Err(_) => Item::Error("could not create a Connection object".into()),
                }
            }
            DeliveryKind::Data => match (connections.get(py, key), delivery.take_blank()) {
                (Some(conn), Some(blank)) => Item::Data(conn, blanks.deliver(py, blank)),
                (Some(conn), None) => Item::Data(conn, PyBytes::new(py, delivery.data())),
                (None, blank) => {
                    if let Some(blank) = blank {
                        blanks.give_back(blank);
                    }
                    Item::Nothing
                }
            },
            DeliveryKind::Eof => connections.get(py, key).map_or(Item::Nothing, Item::Eof),
            DeliveryKind::WritingPaused => connections
                .get(py, key)
                .map_or(Item::Nothing, Item::WritingPaused),
            DeliveryKind::WritingResumed => connections
                .get(py, key)
                .map_or(Item::Nothing, Item::WritingResumed),
            DeliveryKind::Closed(reason) => match connections.get(py, key) {
                Some(conn) => {
                    *connections.slot(key) = None;
                    Item::Closed(conn, reason)
                }
                None => Item::Nothing,
            },
            DeliveryKind::Error => Item::Error(delivery.detail.clone().unwrap_or_default()),
            DeliveryKind::TooLarge => match connections.get(py, key) {
                Some(conn) => Item::TooLarge(conn, delivery.detail.clone().unwrap_or_default()),
                None => Item::Nothing,
            },
            DeliveryKind::Failed => Item::Failed(delivery.detail.clone().unwrap_or_default()),
            DeliveryKind::Draining => {
                // Every connection of this engine (`key.engine`) is about to
                // close: sends from now on are refused. `Running` answers with
                // `Shutdown` right after this, so the latch is set before that
                // command is queued. Other engines' connections may still
                // have input to answer, ahead of their own `Draining`.
                for conn in connections
                    .iter()
                    .filter(|c| c.get().key.engine == key.engine)
                {
                    conn.get().closing.store(true, SeqCst);
                }
                Item::Nothing
            }
            DeliveryKind::Stopped => Item::Nothing,
        }
    }
}
