//! The outbox on a bare ring: no sockets, no connection table.

use super::*;
use crate::close_reason::CloseReason;
use crate::ring::{ring, Consumer};

/// An outbox of `ring_slots` slots of `slot_size` bytes, and the
/// consumer's end of its ring.
fn new(framing: Framing, ring_slots: usize, slot_size: usize) -> (Outbox, Consumer<Delivery>) {
    let config = Config {
        framing,
        ring_slots,
        slot_size,
        max_message_size: 4 * slot_size,
        ..Config::default()
    };
    let (producer, consumer) = ring(ring_slots, || Delivery::with_capacity(slot_size));
    (Outbox::new(&config, producer, Default::default()), consumer)
}

fn key(index: u32) -> ConnKey {
    ConnKey {
        index,
        engine: 0,
        id: u64::from(index) + 1,
    }
}

/// Stages a data delivery of `len` bytes for `conn`.
fn stage(outbox: &mut Outbox, conn: ConnKey, len: usize) {
    outbox.with_pool(|_, mut staging| {
        assert!(staging.has_slot());
        staging.stage(conn, |delivery, _| {
            delivery.len = len;
            (Some(len), ())
        });
    });
}

/// Stages a data delivery for `conn` in a spill buffer of `size` bytes.
fn stage_spilled(outbox: &mut Outbox, conn: ConnKey, size: usize) {
    outbox.with_pool(|pool, mut staging| {
        staging.stage(conn, |delivery, account| {
            let mut buffer = pool.take(size);
            buffer.resize(size, 7);
            account.place(delivery, buffer);
            (Some(delivery.len), ())
        });
    });
}

fn publish(outbox: &mut Outbox) {
    outbox.publish(&mut Counters::default());
}

/// Takes and releases `n` deliveries: their kinds and connections.
fn consume(consumer: &mut Consumer<Delivery>, n: usize) -> Vec<(DeliveryKind, ConnKey)> {
    let taken: Vec<_> = (0..n)
        .map_while(|_| consumer.take_with(|delivery| (delivery.kind, delivery.conn)))
        .collect();
    consumer.release();
    taken
}

fn control(kind: DeliveryKind, conn: ConnKey) -> Pending {
    Pending {
        kind,
        conn,
        opened: None,
        detail: None,
    }
}

#[test]
fn a_connection_at_its_share_waits_for_the_consumer_and_others_do_not() {
    let (mut outbox, mut consumer) = new(Framing::Raw, 64, 16);
    assert_eq!(outbox.share(), 8);
    let (a, b) = (key(1), key(2));
    for _ in 0..8 {
        stage(&mut outbox, a, 16);
    }
    publish(&mut outbox);
    let mut released = Vec::new();
    assert!(!outbox.has_share(a, Some(8), |k| released.push(k)));
    assert!(released.is_empty());
    // Slots are free, but the loop waits for the consumer to move on.
    assert!(!outbox.has_room());
    assert!(outbox.has_share(b, Some(0), |_| unreachable!()));
    assert!(
        !outbox.has_share(b, None, |_| {}),
        "a connection gone has no share"
    );

    assert_eq!(consume(&mut consumer, 3).len(), 3);
    assert!(outbox.has_room());
    assert!(outbox.has_share(a, Some(8), |k| released.push(k)));
    assert_eq!(released, vec![a, a, a]);
    // Settled once: nothing is told twice.
    outbox.settle(|_| unreachable!());
}

#[test]
fn a_wait_for_the_consumer_ends_at_a_release_the_outbox_had_not_seen() {
    let (mut outbox, mut consumer) = new(Framing::Line, 8, 16);
    let a = key(1);
    for _ in 0..4 {
        stage(&mut outbox, a, 1);
    }
    publish(&mut outbox);
    // The loop looks: `a` holds its share ...
    outbox.settle(|_| unreachable!());
    // ... the consumer takes and releases everything ...
    assert_eq!(consume(&mut consumer, 4).len(), 4);
    // ... and the loop, deciding on what it saw, waits for the consumer
    // (as framed input does once a connection is at its share). The
    // release it has not seen yet ends that wait: no other would come.
    outbox.block();
    assert!(outbox.has_room());
    outbox.settle(|_| {});
    outbox.block();
    assert!(!outbox.has_room(), "now it waits for the next release");
}

#[test]
fn a_read_spills_only_while_the_buffers_in_the_ring_are_within_budget() {
    // Raw slots of 1 KiB: a read that fills one goes on into a 256 KiB
    // buffer, and the ring may hold 512 KiB of them.
    let (mut outbox, mut consumer) = new(Framing::Raw, 512, 1024);
    let spill = outbox.spill_size();
    assert_eq!(spill, LARGE_READ);
    for _ in 0..2 {
        assert!(outbox.may_spill());
        stage_spilled(&mut outbox, key(1), spill);
    }
    assert!(!outbox.may_spill());
    // Until the consumer moves on, the answer stands without a scan.
    assert!(!outbox.may_spill());
    publish(&mut outbox);
    assert_eq!(consume(&mut consumer, 1).len(), 1);
    // The released slot's buffer is taken back: one more fits.
    assert!(outbox.may_spill());

    let (mut framed, _consumer) = new(Framing::Line, 8, 16);
    assert_eq!(framed.spill_size(), 0);
    assert!(!framed.may_spill(), "framed reads never spill");
}

#[test]
fn spills_take_back_their_buffers_and_allocate_no_more_than_the_budget_holds() {
    // Slots of 64 KiB: two 256 KiB spill buffers fill the budget, and
    // the pool caches as many.
    let (mut outbox, mut consumer) = new(Framing::Raw, 8, 64 << 10);
    let (a, spill) = (key(1), outbox.spill_size());
    for round in 0..3 {
        // Spills until the budget is full; the consumer takes them.
        while outbox.may_spill() {
            stage_spilled(&mut outbox, a, spill);
        }
        publish(&mut outbox);
        consume(&mut consumer, 8);
        // One spill, which takes the two back, then plain reads round
        // the ring: reusing its slot gives its buffer back too.
        assert!(outbox.may_spill());
        stage_spilled(&mut outbox, a, spill);
        for _ in 0..8 {
            publish(&mut outbox);
            consume(&mut consumer, 8);
            stage(&mut outbox, a, 1);
        }
        assert_eq!(outbox.pool().misses(), 2, "round {round}");
    }
}

#[test]
fn a_control_delivery_that_finds_the_ring_full_goes_out_before_anything_later() {
    let (mut outbox, mut consumer) = new(Framing::Raw, 4, 16);
    let (a, b) = (key(1), key(2));
    for _ in 0..4 {
        stage(&mut outbox, a, 1);
    }
    assert!(!outbox.has_slot());
    outbox.emit(control(DeliveryKind::Closed(CloseReason::Local), a));
    outbox.emit(control(DeliveryKind::Eof, b));
    assert!(outbox.has_backlog());
    publish(&mut outbox);

    assert_eq!(consume(&mut consumer, 1), vec![(DeliveryKind::Data, a)]);
    // A slot is free, but data waits behind the backlog.
    assert!(!outbox.has_slot());
    outbox.drain_backlog();
    assert!(outbox.has_backlog(), "only one slot was free");
    // A later control delivery queues behind those that wait.
    outbox.emit(control(DeliveryKind::Opened, key(3)));
    publish(&mut outbox);

    assert_eq!(consume(&mut consumer, 4).len(), 4);
    outbox.drain_backlog();
    assert!(!outbox.has_backlog());
    assert!(outbox.has_slot());
    stage(&mut outbox, b, 1);
    publish(&mut outbox);
    let kinds: Vec<_> = consume(&mut consumer, 4)
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(
        kinds,
        vec![DeliveryKind::Eof, DeliveryKind::Opened, DeliveryKind::Data]
    );
}

#[test]
fn ring_room_keeps_the_bytes_in_the_ring_within_its_own_size() {
    // 8 slots of 16 bytes: at most 128 payload bytes in the ring.
    let (mut outbox, mut consumer) = new(Framing::Raw, 8, 16);
    let a = key(1);
    assert_eq!(outbox.ring_room(|_| unreachable!()), 128);
    stage(&mut outbox, a, 60);
    assert_eq!(outbox.ring_room(|_| unreachable!()), 68);
    stage(&mut outbox, a, 60);
    // 8 bytes left: less than a slot, so reads wait for the consumer
    // although six slots are free.
    assert_eq!(outbox.ring_room(|_| {}), 0);
    assert!(outbox.has_slot());
    assert!(!outbox.has_room());
    publish(&mut outbox);

    assert_eq!(consume(&mut consumer, 1).len(), 1);
    assert!(outbox.has_room());
    let mut released = Vec::new();
    assert_eq!(outbox.ring_room(|k| released.push(k)), 68);
    assert_eq!(released, vec![a]);
}
