//! The property test: any messages, any chunking of the stream, any pattern of
//! refusals by the sink, against what the messages say should come out.

use proptest::prelude::*;

use super::tests::{sink, LENGTH4, LENGTH8};
use super::*;
use crate::pool::BufferPool;

/// One run of the property test: messages, how they are sent, and how the
/// sink behaves.
#[derive(Clone, Debug)]
struct Scenario {
    framing: Framing,
    inline_limit: usize,
    max_message_size: usize,
    messages: Vec<Vec<u8>>,
    /// Line framing: which messages end with `\r\n` rather than `\n`.
    crlf: Vec<bool>,
    /// Read sizes, cycled.
    chunks: Vec<usize>,
    /// Whether the sink takes each offer, cycled; ends with `true` so that
    /// pumping always progresses.
    accepts: Vec<bool>,
}

fn message(framing: Framing, max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    let bytes = match framing {
        // No '\n' in a line, and '\r' often, to exercise the terminator.
        Framing::Line => prop::sample::select(vec![b'a', b'\r', b'z', 0, 0xff]).boxed(),
        _ => any::<u8>().boxed(),
    };
    prop::collection::vec(bytes, 0..=max_len).prop_map(move |mut message| {
        // A line cannot end with '\r': it would merge with its terminator.
        if framing == Framing::Line && message.last() == Some(&b'\r') {
            *message.last_mut().unwrap() = b'a';
        }
        message
    })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let framing = prop_oneof![Just(Framing::Line), Just(LENGTH4), Just(LENGTH8)];
    (framing, 1usize..=12)
        .prop_flat_map(|(framing, inline_limit)| {
            (
                Just(framing),
                Just(inline_limit),
                // Sometimes every message fits, sometimes some do not.
                prop_oneof![Just(3 * inline_limit), inline_limit..=3 * inline_limit],
                prop::collection::vec(message(framing, 3 * inline_limit), 0..12),
                prop::collection::vec(any::<bool>(), 1..5),
                prop_oneof![Just(vec![1]), prop::collection::vec(1usize..=40, 1..6)],
                prop::collection::vec(any::<bool>(), 0..8),
            )
        })
        .prop_map(
            |(framing, inline_limit, max_message_size, messages, crlf, chunks, mut accepts)| {
                accepts.push(true);
                Scenario {
                    framing,
                    inline_limit,
                    max_message_size,
                    messages,
                    crlf,
                    chunks,
                    accepts,
                }
            },
        )
}

/// Checks one scenario; `Err` describes the first violation.
fn check(scenario: &Scenario) -> Result<(), TestCaseError> {
    let Scenario {
        framing,
        inline_limit,
        max_message_size: max,
        ref messages,
        ref crlf,
        ref chunks,
        ref accepts,
    } = *scenario;
    // Encode, noting where each message starts.
    let mut stream = Vec::new();
    let mut starts = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        starts.push(stream.len());
        let envelope = envelope(framing, message.len()).unwrap();
        stream.extend_from_slice(envelope.header());
        stream.extend_from_slice(message);
        if framing == Framing::Line && crlf[i % crlf.len()] {
            stream.push(b'\r');
        }
        stream.extend_from_slice(envelope.trailer());
    }
    let first_too_large = messages.iter().position(|m| m.len() > max);
    let expected = &messages[..first_too_large.unwrap_or(messages.len())];
    // The last byte at which the decoder must have noticed the oversized
    // message: its prefix's last byte, or the line's byte past max + 1
    // bytes (max + 1 may be a '\r' that the next byte shows to be data).
    let deadline = first_too_large.map(|i| match framing {
        Framing::Length(width) => starts[i] + width.bytes() - 1,
        _ => starts[i] + max + 1,
    });
    let memory_bound = max + chunks.iter().max().unwrap() + 8;

    let mut pool = BufferPool::new(inline_limit + 1, max, usize::MAX);
    let mut decoder = Decoder::new(framing, max, inline_limit);
    let mut taken: Vec<Vec<u8>> = Vec::new();
    let mut verdicts = accepts.iter().copied().cycle();
    let mut spare = Vec::new();
    let mut misfiled = None;
    let mut offer = sink(|message| {
        if !verdicts.next().unwrap() {
            return Err(message.into());
        }
        let lent = matches!(message, Frame::Slice(_));
        if lent != (message.len() <= inline_limit) {
            misfiled = Some(message.len());
        }
        taken.push(message.as_bytes().to_vec());
        if let Frame::Owned(buf) = message {
            spare.push(buf);
        }
        Ok(())
    });
    let mut error = None;
    let mut offset = 0;
    let mut sizes = chunks.iter().cycle();
    'reading: while offset < stream.len() {
        prop_assert!(!decoder.has_backlog());
        let chunk_start = offset;
        let len = (*sizes.next().unwrap()).min(stream.len() - offset);
        offset += len;
        let mut result = decoder.feed(&stream[chunk_start..offset], &mut pool, &mut offer);
        for pumps in 0.. {
            // Each pump takes at least one message unless the sink refuses
            // it, and the sink takes one offer in `accepts.len()`.
            prop_assert!(pumps <= accepts.len() * (messages.len() + 1), "pump stalls");
            prop_assert!(decoder.buffered() <= memory_bound);
            if let Err(e) = result {
                error = Some((e, chunk_start));
                break 'reading;
            }
            if !decoder.has_backlog() {
                break;
            }
            result = decoder.pump(&mut pool, &mut offer);
        }
    }
    prop_assert_eq!(misfiled, None);
    prop_assert_eq!(&taken[..], expected);
    match (first_too_large, error) {
        (None, None) => {
            prop_assert!(!decoder.in_message());
            prop_assert_eq!(decoder.buffered(), 0);
            prop_assert_eq!(decoder.heap_capacity(), 0);
        }
        (Some(_), Some((FrameError::TooLarge { size, limit }, chunk_start))) => {
            prop_assert_eq!(limit, max);
            prop_assert!(size > max as u64);
            prop_assert!(chunk_start <= deadline.unwrap(), "noticed late");
        }
        (expected, got) => prop_assert!(false, "expected error at {expected:?}, got {got:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_chunking_and_any_refusals_give_the_messages_once_in_order(s in scenario()) {
        check(&s)?;
    }
}
