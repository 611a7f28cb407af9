//! Unit tests of the decoders and of the envelopes.

use super::line::find_newline;
use super::*;
use crate::pool::BufferPool;

pub(super) const LENGTH4: Framing = Framing::Length(PrefixWidth::Four);
pub(super) const LENGTH8: Framing = Framing::Length(PrefixWidth::Eight);

/// Types a closure as a sink (closures bound by `let` need the hint).
pub(super) fn sink<F>(f: F) -> F
where
    F: FnMut(Frame<'_>) -> Result<(), Refused>,
{
    f
}

/// A sink that refuses everything.
fn refuse(message: Frame<'_>) -> Result<(), Refused> {
    Err(message.into())
}

/// A sink that takes one message into `taken`, then refuses.
fn take_one(taken: &mut Vec<Vec<u8>>) -> impl FnMut(Frame<'_>) -> Result<(), Refused> + '_ {
    let mut first = true;
    move |message| {
        if !std::mem::take(&mut first) {
            return Err(message.into());
        }
        taken.push(message.as_bytes().to_vec());
        Ok(())
    }
}

fn pool() -> BufferPool {
    BufferPool::new(16, 1 << 20, usize::MAX)
}

/// `messages` framed for sending.
fn encode(framing: Framing, messages: &[&[u8]]) -> Vec<u8> {
    let mut stream = Vec::new();
    for message in messages {
        let envelope = envelope(framing, message.len()).unwrap();
        stream.extend_from_slice(envelope.header());
        stream.extend_from_slice(message);
        stream.extend_from_slice(envelope.trailer());
    }
    stream
}

/// Feeds `chunks` with a sink that takes everything, checking that small
/// messages come lent and large ones owned; returns the messages.
fn decode_all(decoder: &mut Decoder, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, FrameError> {
    let mut pool = pool();
    let mut messages = Vec::new();
    let inline_limit = decoder.inline_limit;
    for chunk in chunks {
        decoder.feed(chunk, &mut pool, |message| {
            match &message {
                Frame::Slice(bytes) => assert!(bytes.len() <= inline_limit),
                Frame::Owned(buf) => assert!(buf.len() > inline_limit),
            }
            messages.push(message.as_bytes().to_vec());
            Ok(())
        })?;
    }
    Ok(messages)
}

fn decode_bytewise(decoder: &mut Decoder, stream: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = stream.chunks(1).collect();
    decode_all(decoder, &chunks).unwrap()
}

fn owned(messages: &[&[u8]]) -> Vec<Vec<u8>> {
    messages.iter().map(|m| m.to_vec()).collect()
}

#[test]
fn lines_lose_their_terminator_and_only_it() {
    let stream = b"a\nbb\r\n\nc\r\r\n\r\n";
    let expected = owned(&[b"a", b"bb", b"", b"c\r", b""]);
    for inline_limit in [0, 1, 100] {
        let mut decoder = Decoder::new(Framing::Line, 100, inline_limit);
        assert_eq!(decode_all(&mut decoder, &[stream]).unwrap(), expected);
        let mut decoder = Decoder::new(Framing::Line, 100, inline_limit);
        assert_eq!(decode_bytewise(&mut decoder, stream), expected);
    }
}

#[test]
fn a_cr_not_before_a_newline_is_data_wherever_the_reads_split() {
    type Chunks<'a> = &'a [&'a [u8]];
    let cases: [(Chunks, Chunks); 5] = [
        (&[b"a\rb\n"], &[b"a\rb"]),
        (&[b"a\r", b"b\n"], &[b"a\rb"]),
        (&[b"a\r", b"\n"], &[b"a"]),
        (&[b"\r", b"\r", b"\n"], &[b"\r"]),
        (&[b"\r", b"\r", b"x", b"\r", b"\r\n"], &[b"\r\rx\r"]),
    ];
    for (chunks, expected) in cases {
        for inline_limit in [0, 100] {
            let mut decoder = Decoder::new(Framing::Line, 100, inline_limit);
            assert_eq!(decode_all(&mut decoder, chunks).unwrap(), owned(expected));
        }
    }
}

#[test]
fn length_prefixed_messages_of_both_widths() {
    let messages: [&[u8]; 4] = [b"hello", b"", b"x", &[0; 300]];
    for framing in [LENGTH4, LENGTH8] {
        let stream = encode(framing, &messages);
        for inline_limit in [0, 5, 1000] {
            let mut decoder = Decoder::new(framing, 1000, inline_limit);
            assert_eq!(
                decode_all(&mut decoder, &[&stream]).unwrap(),
                owned(&messages)
            );
            let mut decoder = Decoder::new(framing, 1000, inline_limit);
            assert_eq!(decode_bytewise(&mut decoder, &stream), owned(&messages));
        }
    }
    assert_eq!(encode(LENGTH4, &[b"ab"]), b"\0\0\0\x02ab");
    assert_eq!(encode(LENGTH8, &[b"ab"]), b"\0\0\0\0\0\0\0\x02ab");
}

#[test]
fn every_split_of_a_stream_gives_the_same_messages() {
    let messages: [&[u8]; 3] = [b"first", b"", b"third message"];
    for framing in [Framing::Line, LENGTH4, LENGTH8] {
        let stream = encode(framing, &messages);
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let mut decoder = Decoder::new(framing, 100, 8);
            assert_eq!(
                decode_all(&mut decoder, &[a, b]).unwrap(),
                owned(&messages),
                "{framing:?} split at {split}"
            );
        }
    }
}

#[test]
fn a_line_may_fill_the_limit_but_not_one_byte_more() {
    let mut pool = pool();
    let mut decoder = Decoder::new(Framing::Line, 8, 4);
    let mut got = Vec::new();
    // Exactly at the limit, even with the `\r\n` arriving late.
    for bytes in [&b"12345678"[..], b"\r", b"\n"] {
        decoder
            .feed(bytes, &mut pool, |m| {
                got.push(m.as_bytes().to_vec());
                Ok(())
            })
            .unwrap();
        if bytes == b"\r" {
            assert_eq!(decoder.buffered(), 9);
        }
    }
    assert_eq!(got, owned(&[b"12345678"]));
    // One byte more without a terminator fails at once.
    decoder.feed(b"12345678", &mut pool, |_| Ok(())).unwrap();
    assert_eq!(
        decoder.feed(b"9", &mut pool, |_| Ok(())),
        Err(FrameError::TooLarge { size: 9, limit: 8 })
    );
    // A held-back `\r` that turns out to be data counts too.
    let mut decoder = Decoder::new(Framing::Line, 8, 4);
    decoder.feed(b"12345678\r", &mut pool, |_| Ok(())).unwrap();
    assert_eq!(
        decoder.feed(b"x", &mut pool, |_| Ok(())),
        Err(FrameError::TooLarge { size: 10, limit: 8 })
    );
    // And within one read, whatever follows.
    let mut decoder = Decoder::new(Framing::Line, 8, 4);
    assert_eq!(
        decoder.feed(b"ok\n123456789\n", &mut pool, |_| Ok(())),
        Err(FrameError::TooLarge { size: 9, limit: 8 })
    );
}

#[test]
fn an_endless_line_fails_after_scanning_just_past_the_limit() {
    let mut pool = pool();
    let mut decoder = Decoder::new(Framing::Line, 100, 10);
    let flood = vec![b'x'; 1 << 20];
    let mut offered = 0;
    let result = decoder.feed(b"fine\n", &mut pool, |_| {
        offered += 1;
        Ok(())
    });
    assert_eq!(result, Ok(()));
    let result = decoder.feed(&flood, &mut pool, |_| {
        offered += 1;
        Ok(())
    });
    assert!(matches!(result, Err(FrameError::TooLarge { limit: 100, size }) if size > 100));
    assert_eq!(offered, 1);
    assert!(decoder.bytes_scanned <= 5 + 102);
    // Nothing kept by a failed decoder.
    assert_eq!(decoder.buffered(), 0);
    assert_eq!(decoder.heap_capacity(), 0);
}

#[test]
fn a_declared_length_over_the_limit_fails_before_its_payload() {
    let mut pool = pool();
    for (framing, header) in [
        (LENGTH4, &b"\0\0\x04\x01"[..]),
        (LENGTH8, &b"\xff\xff\xff\xff\xff\xff\xff\xff"[..]),
    ] {
        let mut decoder = Decoder::new(framing, 1024, 10);
        let (first, last) = header.split_at(header.len() - 1);
        decoder.feed(first, &mut pool, |_| Ok(())).unwrap();
        assert!(decoder.in_message());
        let size = u64::from_be_bytes({
            let mut wide = [0; 8];
            wide[8 - header.len()..].copy_from_slice(header);
            wide
        });
        assert_eq!(
            decoder.feed(last, &mut pool, |_| Ok(())),
            Err(FrameError::TooLarge { size, limit: 1024 })
        );
    }
}

#[test]
fn the_limit_counts_payload_bytes_only() {
    let message: &[u8] = b"12345";
    for framing in [Framing::Line, LENGTH4, LENGTH8] {
        let stream = encode(framing, &[message, message]);
        let mut decoder = Decoder::new(framing, 5, 2);
        assert_eq!(decoder.framing(), framing);
        assert_eq!(
            decode_bytewise(&mut decoder, &stream),
            owned(&[message, message])
        );
        let mut decoder = Decoder::new(framing, 4, 2);
        assert!(decode_all(&mut decoder, &[&stream]).is_err());
    }
}

#[test]
fn small_messages_are_lent_and_large_ones_come_in_pooled_buffers() {
    let mut pool = pool();
    for framing in [Framing::Line, LENGTH4] {
        let stream = encode(framing, &[b"abcd", b"abcde"]);
        let mut decoder = Decoder::new(framing, 100, 4);
        let mut kinds = Vec::new();
        decoder
            .feed(&stream, &mut pool, |message| {
                kinds.push(match message {
                    Frame::Slice(bytes) => (false, bytes.to_vec()),
                    Frame::Owned(buf) => (true, buf),
                });
                Ok(())
            })
            .unwrap();
        assert_eq!(
            kinds,
            [(false, b"abcd".to_vec()), (true, b"abcde".to_vec())]
        );
        assert_eq!(kinds[1].1.capacity(), 16, "a buffer of the pool's class");
    }
}

/// Feeds `chunks`, refusing exactly the `refuse_at`-th offer (counting from
/// 0 across the whole run), pumping after each feed; returns the messages
/// taken and how many offers were made.
fn decode_refusing_once(
    framing: Framing,
    inline_limit: usize,
    chunks: &[&[u8]],
    refuse_at: usize,
) -> (Vec<Vec<u8>>, usize) {
    let mut pool = pool();
    let mut decoder = Decoder::new(framing, 100, inline_limit);
    let mut taken = Vec::new();
    let mut offers = 0;
    let mut spare = Vec::new();
    let mut offer = sink(|message| {
        offers += 1;
        if offers - 1 == refuse_at {
            return Err(message.into());
        }
        taken.push(message.as_bytes().to_vec());
        if let Frame::Owned(buf) = message {
            spare.push(buf);
        }
        Ok(())
    });
    for chunk in chunks {
        decoder.feed(chunk, &mut pool, &mut offer).unwrap();
        while decoder.has_backlog() {
            decoder.pump(&mut pool, &mut offer).unwrap();
        }
    }
    assert!(!decoder.in_message());
    assert_eq!(decoder.heap_capacity(), 0);
    (taken, offers)
}

#[test]
fn a_refused_message_is_offered_again_and_nothing_is_lost_or_repeated() {
    for framing in [Framing::Line, LENGTH4, LENGTH8] {
        let messages: [&[u8]; 4] = [b"first", b"", b"third", b"fourth"];
        let stream = encode(framing, &messages);
        // Splits that leave the last message unfinished after the first
        // read, or the second message split, or everything in one read.
        let splits = [stream.len(), stream.len() - 3, 7, 1];
        for split in splits {
            let (a, b) = stream.split_at(split);
            for inline_limit in [0, 3, 100] {
                for refuse_at in 0..=messages.len() {
                    let (taken, offers) =
                        decode_refusing_once(framing, inline_limit, &[a, b], refuse_at);
                    assert_eq!(
                        taken,
                        owned(&messages),
                        "{framing:?}, split {split}, inline {inline_limit}, refusing offer {refuse_at}"
                    );
                    let refused = usize::from(refuse_at < messages.len());
                    assert_eq!(offers, messages.len() + refused);
                }
            }
        }
    }
}

#[test]
fn a_refused_large_message_keeps_its_buffer() {
    let mut pool = pool();
    let stream = encode(LENGTH4, &[&[7; 50], b"next"]);
    let mut decoder = Decoder::new(LENGTH4, 100, 10);
    let mut address = None;
    decoder
        .feed(&stream, &mut pool, |message| {
            address = Some(message.as_bytes().as_ptr());
            Err(message.into())
        })
        .unwrap();
    assert!(decoder.has_backlog());
    assert!(!decoder.in_message());
    assert_eq!(decoder.buffered(), stream.len() - 4);
    let misses = pool.misses();
    let mut taken = Vec::new();
    decoder
        .pump(&mut pool, |message| {
            taken.push((message.as_bytes().as_ptr(), message.len()));
            Ok(())
        })
        .unwrap();
    assert_eq!(taken[0], (address.unwrap(), 50));
    assert_eq!(taken[1].1, 4);
    assert_eq!(pool.misses(), misses, "no new buffer for the second offer");
    assert!(!decoder.has_backlog());
}

#[test]
fn pump_stops_again_at_the_next_refusal() {
    let mut pool = pool();
    let mut decoder = Decoder::new(Framing::Line, 100, 100);
    let mut taken = Vec::new();
    decoder.feed(b"a\nb\nc\nd", &mut pool, refuse).unwrap();
    for expected in [&b"a"[..], b"b", b"c"] {
        decoder.pump(&mut pool, take_one(&mut taken)).unwrap();
        assert_eq!(taken.last().unwrap(), expected);
    }
    // "d" is unfinished: not a backlog, but a message in progress.
    decoder.pump(&mut pool, refuse).unwrap();
    assert!(!decoder.has_backlog());
    assert!(decoder.in_message());
    assert_eq!(decoder.buffered(), 1);
    decoder
        .feed(b"\n", &mut pool, |message| {
            taken.push(message.as_bytes().to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(taken, owned(&[b"a", b"b", b"c", b"d"]));
}

#[test]
fn feeding_despite_a_backlog_loses_nothing() {
    let stream = encode(LENGTH4, &[b"one", b"two", b"three"]);
    let (a, b) = stream.split_at(16);
    for inline_limit in [2, 100] {
        for pump_first in [false, true] {
            let mut pool = pool();
            let mut decoder = Decoder::new(LENGTH4, 100, inline_limit);
            decoder.feed(a, &mut pool, refuse).unwrap();
            assert!(decoder.has_backlog());
            let mut taken = Vec::new();
            if pump_first {
                // Takes "one"; "two" stays behind, partly consumed backlog.
                decoder.pump(&mut pool, take_one(&mut taken)).unwrap();
                assert!(decoder.has_backlog());
            }
            decoder
                .feed(b, &mut pool, |message| {
                    taken.push(message.as_bytes().to_vec());
                    Ok(())
                })
                .unwrap();
            assert_eq!(taken, owned(&[b"one", b"two", b"three"]));
            assert_eq!(decoder.heap_capacity(), 0);
        }
    }
}

#[test]
fn no_heap_memory_is_kept_between_messages() {
    let mut pool = pool();
    for framing in [Framing::Line, LENGTH4] {
        let first: &[u8] = &[b'a'; 40];
        let boundaries = [
            encode(framing, &[first]).len(),
            encode(framing, &[first, b"b"]).len(),
        ];
        let stream = encode(framing, &[first, b"b"]);
        let mut decoder = Decoder::new(framing, 100, 10);
        for (i, byte) in stream.iter().enumerate() {
            decoder.feed(&[*byte], &mut pool, |_| Ok(())).unwrap();
            if boundaries.contains(&(i + 1)) {
                assert!(!decoder.in_message());
                assert_eq!(decoder.buffered(), 0);
                assert_eq!(decoder.heap_capacity(), 0);
            } else {
                assert!(decoder.in_message(), "{framing:?} after byte {i}");
            }
        }
    }
}

#[test]
fn a_failed_decoder_stays_failed_until_cleared() {
    let mut pool = pool();
    let mut decoder = Decoder::new(LENGTH4, 10, 10);
    let error = FrameError::TooLarge {
        size: 11,
        limit: 10,
    };
    assert_eq!(
        decoder.feed(b"\0\0\0\x0b", &mut pool, |_| Ok(())),
        Err(error)
    );
    assert_eq!(
        decoder.feed(b"\0\0\0\x01x", &mut pool, |_| Ok(())),
        Err(error)
    );
    assert_eq!(decoder.pump(&mut pool, |_| Ok(())), Err(error));
    assert!(!decoder.in_message() && !decoder.has_backlog());
    decoder.clear(&mut pool);
    let mut taken = Vec::new();
    decoder
        .feed(b"\0\0\0\x01x", &mut pool, |m| {
            taken.push(m.as_bytes().to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(taken, owned(&[b"x"]));
    assert_eq!(
        error.to_string(),
        "message too large: 11 bytes (declared, or received so far without an end of \
         line) exceeds max_message_size of 10 bytes"
    );
}

#[test]
fn clear_gives_the_kept_buffers_back() {
    let mut pool = pool();
    let mut decoder = Decoder::new(LENGTH4, 1000, 10);
    decoder
        .feed(b"\0\0\x01\0partial", &mut pool, |_| Ok(()))
        .unwrap();
    assert!(decoder.heap_capacity() >= 256);
    let cached = pool.cached_bytes();
    decoder.clear(&mut pool);
    assert_eq!(decoder.heap_capacity(), 0);
    assert_eq!(decoder.buffered(), 0);
    assert!(!decoder.in_message());
    assert_eq!(pool.cached_bytes(), cached + 256);
}

#[test]
fn raw_offers_each_input_whole() {
    let mut pool = pool();
    let mut decoder = Decoder::new(Framing::Raw, 0, 4);
    let mut taken = Vec::new();
    for input in [&b"ab\ncd"[..], b"", b"xy"] {
        decoder
            .feed(input, &mut pool, |m| {
                taken.push((matches!(m, Frame::Owned(_)), m.as_bytes().to_vec()));
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(taken, [(true, b"ab\ncd".to_vec()), (false, b"xy".to_vec())]);
    assert!(!decoder.in_message());
    // Refused, then pumped.
    decoder.feed(b"abc", &mut pool, refuse).unwrap();
    assert!(decoder.has_backlog());
    decoder
        .pump(&mut pool, |m| {
            assert_eq!(m.as_bytes(), b"abc");
            Ok(())
        })
        .unwrap();
    assert!(!decoder.has_backlog());
    assert_eq!(decoder.heap_capacity(), 0);
}

#[test]
fn a_long_line_fed_byte_by_byte_is_scanned_once() {
    let mut pool = pool();
    let mut decoder = Decoder::new(Framing::Line, 1 << 20, 100);
    let line = vec![b'y'; 200_000];
    for byte in &line {
        decoder
            .feed(std::slice::from_ref(byte), &mut pool, |_| Ok(()))
            .unwrap();
    }
    let mut len = 0;
    decoder
        .feed(b"\n", &mut pool, |m| {
            len = m.len();
            Ok(())
        })
        .unwrap();
    assert_eq!(len, line.len());
    assert_eq!(decoder.bytes_scanned, line.len() + 1);
}

#[test]
fn steady_state_large_messages_reuse_pool_buffers() {
    for framing in [Framing::Line, LENGTH4] {
        let mut pool = BufferPool::new(128, 64 * 1024, usize::MAX);
        let mut decoder = Decoder::new(framing, 64 * 1024, 64);
        let sizes = [100, 1000, 5000, 60_000, 10];
        let bodies: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![b'm'; n]).collect();
        let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        let stream = encode(framing, &refs);
        let mut round = |pool: &mut BufferPool| {
            let mut given_back = Vec::new();
            let mut count = 0;
            for chunk in stream.chunks(1500) {
                decoder
                    .feed(chunk, pool, |message| {
                        count += 1;
                        if let Frame::Owned(buf) = message {
                            given_back.push(buf);
                        }
                        Ok(())
                    })
                    .unwrap();
                // The consumer is done with them: back to the pool.
                for buf in given_back.drain(..) {
                    pool.give(buf);
                }
            }
            assert_eq!(count, sizes.len());
        };
        round(&mut pool);
        round(&mut pool);
        let misses = pool.misses();
        for _ in 0..50 {
            round(&mut pool);
        }
        assert_eq!(pool.misses(), misses, "{framing:?}");
        assert!(pool.hits() > 50 * 4);
    }
}

#[test]
fn envelopes_frame_payloads_for_sending() {
    let raw = envelope(Framing::Raw, 5).unwrap();
    assert_eq!(
        (raw.header(), raw.trailer(), raw.overhead()),
        (&b""[..], &b""[..], 0)
    );
    let line = envelope(Framing::Line, 5).unwrap();
    assert_eq!(
        (line.header(), line.trailer(), line.overhead()),
        (&b""[..], &b"\n"[..], 1)
    );
    let four = envelope(LENGTH4, 0x0102_0304).unwrap();
    assert_eq!(four.header(), b"\x01\x02\x03\x04");
    assert_eq!((four.trailer(), four.overhead()), (&b""[..], 4));
    let eight = envelope(LENGTH8, 0x0102).unwrap();
    assert_eq!(eight.header(), b"\0\0\0\0\0\0\x01\x02");
    assert_eq!(PrefixWidth::from_bytes(4), Some(PrefixWidth::Four));
    assert_eq!(PrefixWidth::from_bytes(8), Some(PrefixWidth::Eight));
    assert_eq!(PrefixWidth::from_bytes(2), None);
}

#[cfg(target_pointer_width = "64")]
#[test]
fn a_payload_too_long_for_a_four_byte_prefix_cannot_be_framed() {
    let too_long = u32::MAX as usize + 1;
    let error = envelope(LENGTH4, too_long).unwrap_err();
    assert_eq!(
        error,
        EncodeError {
            len: too_long,
            max: u32::MAX as u64
        }
    );
    assert!(error.to_string().contains("4294967296 bytes"));
    assert!(envelope(LENGTH8, too_long).is_ok());
    assert!(envelope(LENGTH4, u32::MAX as usize).is_ok());
}

#[test]
fn find_newline_agrees_with_a_plain_search() {
    let mut bytes = vec![0u8; 40];
    assert_eq!(find_newline(&bytes), None);
    for i in 0..bytes.len() {
        for j in i..bytes.len() {
            bytes.fill(0xff);
            bytes[j] = b'\n';
            bytes[i] = b'\n';
            // Bytes just around '\n' (0x0a) that the word trick could confuse.
            if i > 0 {
                bytes[i - 1] = 0x0b;
            }
            assert_eq!(find_newline(&bytes), Some(i));
            assert_eq!(
                find_newline(&bytes[..i]),
                bytes[..i].iter().position(|&b| b == b'\n')
            );
        }
    }
}
