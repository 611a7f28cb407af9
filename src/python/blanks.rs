//! The `bytes` objects a server reads large input into, so that
//! `on_message_received` gets the object the bytes arrived in rather than a
//! copy (the engines' side is `blank.rs`).
//!
//! [`Blanks`] makes `bytes` objects of [`ROOM`] bytes and lends their room
//! to each engine's stock as blanks; a raw read that starts in a spill
//! buffer goes straight into one, on the I/O thread or inline. What such a delivery becomes
//! ([`Blanks::deliver`]):
//!
//! - bytes that fill at least half the room: the object itself, its length
//!   set to theirs. A message the application keeps holds at most twice its
//!   size;
//! - fewer: a copy in a new object of their size, as every other payload is
//!   made, and the blank, never seen by Python, goes back to the stock.
//!
//! An object handed to a callback is watched ([`WATCHED`] per engine at
//! most, in one queue, the oldest let go first). Once this side holds its only reference, nothing
//! else can reach it, and it is lent again ([`Blanks::restock`]): its
//! length set back to the room and its cached hash forgotten. That reuse is
//! the point: a new object of this size per read costs more than the copy
//! it saves (glibc hands the memory back to the kernel and faults it in
//! again; see `benchmarks/README.md`). CPython itself resizes a string in
//! place on the same condition (`Py_REFCNT == 1`, in `+=`), and with the
//! GIL held no other thread can take a reference meanwhile: a kept object,
//! referenced by the application, never changes.
//!
//! Writing a `bytes` object's length and hash relies on CPython's layout of
//! `PyBytesObject` (`ob_size`, `ob_shash`, `ob_sval`), the same from 3.9 to
//! 3.15; [`layout_holds`] checks it once on a probe object, and a server
//! where it does not hold makes no blanks, nor one whose CPython runs
//! without the GIL, where a reference count of 1 would prove nothing.
//!
//! Nothing here runs for a server whose reads never spill: an engine's
//! stock is filled only once one of its reads has looked for a blank. Then
//! the dispatcher refills it at the end of each of its batches, with the
//! GIL it holds, so that I/O threads never need it. The blanks out in the
//! stocks and the rings are counted, at most [`OUT`] per engine, however
//! far the callbacks fall behind.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::blank::{Blank, BlankStock};

/// Size of a blank's room: a read goes into one blank, so this caps the
/// reads that go into one (the spill buffers it stands in for hold 256 KiB;
/// 128 KiB measured better, as half of it is the most a kept message
/// wastes).
pub(super) const ROOM: usize = 128 * 1024;
/// Most blanks kept in each engine's stock.
const STOCK: usize = 16;
/// Most objects handed to callbacks that are watched, per engine, to be
/// lent again.
const WATCHED: usize = 16;
/// Most blanks per engine in the stocks and in deliveries not yet taken.
const OUT: usize = 2 * STOCK;

/// What keeps a blank's room alive: a reference to its `bytes` object.
struct Owner(Py<PyBytes>);

/// The objects of one run; see the module docs.
pub(super) struct Blanks {
    /// Each engine's stock; none where `PyBytesObject` is not laid out as
    /// this code expects.
    stocks: Vec<Arc<BlankStock>>,
    /// Per stock: one of its engine's reads has looked for a blank, and
    /// from then on the stock is kept full.
    active: Vec<bool>,
    /// Blanks in the stocks and in deliveries not yet taken: given to a
    /// stock, and not yet back through [`Blanks::deliver`] or
    /// [`Blanks::give_back`].
    out: usize,
    /// Objects handed to callbacks, oldest first.
    /// (In the boxes they were lent in, to lend them in again: no
    /// allocation per message.)
    watched: VecDeque<Box<Owner>>,
    /// Blanks taken out of deliveries and not handed on, for the stock.
    back: Vec<Blank>,
}

impl Blanks {
    /// The blanks of a run whose engines have `stocks`.
    pub(super) fn new(py: Python<'_>, mut stocks: Vec<Arc<BlankStock>>) -> Blanks {
        stocks.retain(|stock| stock.takes(ROOM));
        if !stocks.is_empty() && !layout_holds(py) {
            stocks.clear();
        }
        Blanks {
            watched: VecDeque::with_capacity(WATCHED * stocks.len()),
            active: vec![false; stocks.len()],
            stocks,
            out: 0,
            back: Vec::new(),
        }
    }

    /// The payload of a delivery whose bytes are in `blank`; see the module
    /// docs.
    pub(super) fn deliver<'py>(&mut self, py: Python<'py>, blank: Blank) -> Bound<'py, PyBytes> {
        self.out = self.out.saturating_sub(1);
        let len = blank.len();
        if len * 2 < blank.capacity() || !blank.is_owned_by::<Owner>() {
            let copy = PyBytes::new(py, blank.filled());
            self.back.push(blank);
            return copy;
        }
        let Ok(owner) = blank.into_owner().downcast::<Owner>() else {
            unreachable!("checked by is_owned_by");
        };
        // SAFETY: the blank held the only reference to the object (`lend`),
        // which the reactor filled with `len <= ROOM` bytes and gave up
        // with the delivery; the GIL is held.
        unsafe { set_len(owner.0.as_ptr(), len) };
        let object = owner.0.clone_ref(py).into_bound(py);
        if self.watched.len() >= WATCHED * self.stocks.len() {
            self.watched.pop_front();
        }
        self.watched.push_back(owner);
        object
    }

    /// Takes a blank out of a delivery no callback will see.
    pub(super) fn give_back(&mut self, blank: Blank) {
        self.out = self.out.saturating_sub(1);
        self.back.push(blank);
    }

    /// Fills each stock up to [`STOCK`] blanks, once one of its engine's
    /// reads has looked for one, within [`OUT`] blanks out per engine: with
    /// the blanks taken out of deliveries, then with the watched objects
    /// only this side references, then with new objects. Blanks back from
    /// deliveries that no stock has room for are let go.
    pub(super) fn restock(&mut self, py: Python<'_>) {
        for index in 0..self.stocks.len() {
            if !self.active[index] {
                if !self.stocks[index].was_wanted() {
                    continue;
                }
                self.active[index] = true;
            }
            let stock = Arc::clone(&self.stocks[index]);
            self.fill(py, &stock);
        }
        self.back.clear();
    }

    /// Fills `stock` up to [`STOCK`] blanks; see [`Blanks::restock`].
    fn fill(&mut self, py: Python<'_>, stock: &BlankStock) {
        let allowed = (OUT * self.stocks.len()).saturating_sub(self.out);
        let room = STOCK.saturating_sub(stock.len()).min(allowed);
        let mut missing = room.saturating_sub(self.back.len());
        let mut index = 0;
        while missing > 0 && index < self.watched.len() {
            // SAFETY: a live object; the GIL is held.
            if unsafe { ffi::Py_REFCNT(self.watched[index].0.as_ptr()) } == 1 {
                let owner = self.watched.remove(index).expect("index < len");
                self.back.push(lend(owner));
                missing -= 1;
            } else {
                index += 1;
            }
        }
        for _ in 0..missing {
            // SAFETY: a null pointer asks for an object whose bytes are not
            // set; the blank fills them before Python can see them.
            let made = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), ROOM as _) };
            // SAFETY: a new reference to a `bytes` object, or null with an
            // exception set.
            match unsafe { Bound::from_owned_ptr_or_err(py, made) } {
                Ok(object) => {
                    // SAFETY: `PyBytes_FromStringAndSize` makes `bytes`.
                    let object = unsafe { object.cast_into_unchecked::<PyBytes>() };
                    self.back.push(lend(Box::new(Owner(object.unbind()))));
                }
                // Out of memory: reads go into spill buffers, as before.
                Err(_) => break,
            }
        }
        let given = room.min(self.back.len());
        if given > 0 {
            stock.give_all(self.back.drain(..given));
            self.out += given;
        }
    }

    /// Lets go of every object this side and the stocks hold: the run is
    /// over. (Blanks in deliveries not taken go with the rings.)
    pub(super) fn clear(&mut self) {
        for stock in &self.stocks {
            drop(stock.take_all());
        }
        self.back.clear();
        self.watched.clear();
    }
}

impl Drop for Blanks {
    /// A run that ends without [`Blanks::clear`] (an error on the way)
    /// leaves nothing in the stocks either, which live as long as the
    /// engines' `Connection` objects may.
    fn drop(&mut self) {
        self.clear();
    }
}

/// Lends the room of the object `owner` holds the only reference to, as a
/// blank of [`ROOM`] bytes: its length set back to the room and its hash
/// forgotten.
fn lend(owner: Box<Owner>) -> Blank {
    let raw = owner.0.as_ptr();
    // SAFETY: the object was made with a room of `ROOM` bytes and is
    // referenced only by `owner`; the GIL is held.
    unsafe { set_len(raw, ROOM) };
    // SAFETY: `ob_sval` starts the object's room; a raw pointer to the
    // field, not a reference to its one declared byte, may reach all of it.
    let room = unsafe { std::ptr::addr_of_mut!((*raw.cast::<ffi::PyBytesObject>()).ob_sval) };
    let room = NonNull::new(room.cast::<u8>()).expect("an object's room");
    // SAFETY: the room is `ROOM` bytes long and lives as long as the
    // object, which the owner keeps alive wherever it is dropped (PyO3
    // defers a release without the GIL). The owner holds the only
    // reference, and nothing here reads the room until the owner is taken
    // back (`Blanks::deliver`), so the blank is the only way to it.
    unsafe { Blank::new(room, ROOM, owner) }
}

/// Makes `object`, a `bytes` object whose room holds at least `len` bytes,
/// `len` bytes long: its size, the NUL every `bytes` object ends with, and
/// its cached hash, forgotten.
///
/// # Safety
/// The GIL is held, and nothing but the caller references `object`, or has
/// since its bytes last changed: nobody has seen the length or hash it had.
unsafe fn set_len(object: *mut ffi::PyObject, len: usize) {
    let bytes = object.cast::<ffi::PyBytesObject>();
    // SAFETY: a `bytes` object (the caller's promise), laid out as
    // `layout_holds` checked, whose room has `len + 1` bytes: `len` at most
    // the size it was made with, and CPython allocates one more for the NUL.
    // Nobody else can see the writes (the caller's promise).
    unsafe {
        (*bytes).ob_base.ob_size = len as ffi::Py_ssize_t;
        *std::ptr::addr_of_mut!((*bytes).ob_sval)
            .cast::<u8>()
            .add(len) = 0;
        #[allow(deprecated)]
        {
            (*bytes).ob_shash = -1;
        }
    }
}

/// True if `PyBytesObject` is laid out as [`set_len`] expects: on a probe,
/// the room where `PyBytes_AsString` says, the size where `PyBytes_Size`
/// reads it, and the hash cached where `ob_shash` is. And false where the
/// GIL is off (a free-threaded CPython told to run without it): the
/// reference count then proves nothing.
fn layout_holds(py: Python<'_>) -> bool {
    let gil_enabled = py
        .import("sys")
        .and_then(|sys| sys.getattr("_is_gil_enabled"))
        .and_then(|is_enabled| is_enabled.call0())
        .and_then(|enabled| enabled.extract::<bool>());
    if matches!(gil_enabled, Ok(false)) {
        return false;
    }
    let probe = PyBytes::new(py, b"rsepoll blank probe");
    let Ok(hash) = probe.hash() else {
        return false;
    };
    let raw = probe.as_ptr();
    let bytes = raw.cast::<ffi::PyBytesObject>();
    // SAFETY: a live `bytes` object; the GIL is held; these only read.
    unsafe {
        #[allow(deprecated)]
        let cached = (*bytes).ob_shash;
        std::ptr::eq(
            std::ptr::addr_of!((*bytes).ob_sval).cast::<std::os::raw::c_char>(),
            ffi::PyBytes_AsString(raw),
        ) && (*bytes).ob_base.ob_size == ffi::PyBytes_Size(raw)
            && ffi::PyBytes_Size(raw) == 19
            && cached == hash
    }
}
