//! The connection state machine and its bookkeeping, without a reactor.

use socket2::{Domain, Type};

use super::*;

fn socket() -> Socket {
    Socket::new(Domain::IPV4, Type::STREAM, None).unwrap()
}

#[test]
fn a_reused_slot_does_not_answer_to_the_old_key() {
    let mut table = ConnectionTable::new(3);
    let old = table.insert(socket(), 1, None, Instant::now());
    assert!(table.remove(old).is_some());
    let new = table.insert(socket(), 2, None, Instant::now());
    assert_eq!((old.engine, new.engine), (3, 3));
    assert_eq!(new.index, old.index);
    assert_ne!(new.id, old.id);
    assert!(table.get_mut(old).is_none());
    assert!(table.remove(old).is_none());
    assert!(table.get_mut(new).is_some());
    assert_eq!(table.len(), 1);
}

#[test]
fn the_peer_ending_first_makes_a_local_close_a_peer_close() {
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    assert_eq!(conn.input(), Input::Deliver);
    assert_eq!(conn.peer_finished(), AfterEof::Deliver);
    assert_eq!(conn.input(), Input::Ended);
    assert!(conn.accepts_output());
    assert!(conn.begin_close(CloseReason::Local));
    assert!(!conn.accepts_output());
    assert!(
        !conn.begin_close(CloseReason::Shutdown),
        "the first close stands"
    );
    assert_eq!(conn.linger(Instant::now()), Some(CloseReason::Peer));
    assert!(conn.reported_closed());
    assert_eq!(conn.peer_finished(), AfterEof::Forget);
}

#[test]
fn a_failed_write_still_delivers_input_then_reports_a_reset() {
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    conn.queue_output(b"unsent");
    assert!(!conn.write_failed(), "input may still wait in the kernel");
    assert!(!conn.has_queued_output());
    assert_eq!(conn.input(), Input::Deliver);
    assert!(!conn.accepts_output());
    assert!(!conn.begin_close(CloseReason::Local));
    assert_eq!(conn.peer_finished(), AfterEof::Close(CloseReason::Reset));
}

#[test]
fn a_closing_connection_discards_input_until_the_peer_ends() {
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    assert!(conn.begin_close(CloseReason::IdleTimeout));
    assert_eq!(conn.input(), Input::Discard);
    assert_eq!(conn.peer_finished(), AfterEof::Continue);
    assert_eq!(conn.input(), Input::Ended);
    assert!(conn.write_failed(), "nothing more can arrive: close now");
    assert_eq!(conn.closing_reason(), Some(CloseReason::IdleTimeout));
}

#[test]
fn interest_follows_the_phase() {
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    let none = Interest {
        readable: false,
        writable: false,
        hangup: true,
    };
    assert!(conn.interest(true).readable);
    assert_eq!(
        conn.interest(false),
        none,
        "a stopping server reads no input"
    );
    conn.queue_output(b"x");
    assert!(conn.interest(false).writable);
    conn.peer_finished();
    assert!(
        !conn.interest(true).readable,
        "after EOF a socket stays readable"
    );
    conn.begin_close(CloseReason::Local);
    conn.linger(Instant::now());
    assert!(conn.interest(false).readable, "lingering discards input");
}

#[test]
fn a_held_back_connection_watches_for_a_reset_and_reads_once_the_peer_is_gone() {
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    conn.set_paused(true);
    // Input came while paused: it stays unread, and only a reset is heard.
    conn.hold_input();
    let held = conn.interest(true);
    assert!(!held.readable, "a paused connection reads nothing");
    assert!(held.hangup, "a paused connection still hears of a reset");
    conn.peer_gone();
    assert!(
        conn.reads_input(),
        "nothing is held back from a peer that is gone"
    );
    // On the ready list now: reading finds the reset, no report needed.
    assert!(!conn.interest(true).hangup);
}

#[test]
fn a_failed_write_reads_the_input_to_its_end_even_while_paused() {
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    conn.set_paused(true);
    assert!(!conn.write_failed(), "input may still wait in the kernel");
    assert!(conn.reads_input());
}

#[test]
fn the_watermarks_are_crossed_once_each_way_and_not_by_an_ending() {
    let marks = Watermarks { high: 8, low: 2 };
    let rose = Checked {
        crossed: Some(Crossing::Rose),
        reads_again: false,
    };
    let mut conn = Connection::new(socket(), 1, None, Instant::now());
    conn.queue_output(b"12345678");
    assert_eq!(
        conn.check_watermarks(marks),
        Checked::default(),
        "not above"
    );
    conn.queue_output(b"9");
    assert_eq!(conn.check_watermarks(marks), rose);
    assert!(!conn.reads_input());
    conn.queue_output(b"more");
    assert_eq!(
        conn.check_watermarks(marks),
        Checked::default(),
        "still above"
    );
    conn.sent_queued(10);
    assert_eq!(
        conn.check_watermarks(marks),
        Checked::default(),
        "in between"
    );
    conn.sent_queued(1);
    let fell = conn.check_watermarks(marks);
    assert_eq!(fell.crossed, Some(Crossing::Fell));
    assert!(fell.reads_again);

    // Paused by the application: the crossings are the same, reading stays off.
    conn.set_paused(true);
    conn.queue_output(b"123456789");
    assert_eq!(conn.check_watermarks(marks), rose);
    conn.sent_queued(conn.queue.len());
    let fell = conn.check_watermarks(marks);
    assert_eq!(fell.crossed, Some(Crossing::Fell));
    assert!(!fell.reads_again);

    // A failed write drops the queue of a paused connection: no crossing.
    conn.queue_output(b"123456789");
    assert_eq!(conn.check_watermarks(marks), rose);
    assert!(!conn.write_failed());
    assert_eq!(conn.check_watermarks(marks), Checked::default());
}
