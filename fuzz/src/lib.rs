//! The fuzz harness of rsepoll's decoders: one input is one *case*, a
//! framing, the limits, a byte stream, how it is cut into reads and how often
//! the sink refuses; [`check`] runs the case through a real
//! [`Decoder`] and compares everything that comes out with a reference model
//! written here, independently of the decoder: a plain scan of the whole
//! stream at once.
//!
//! What is checked, beyond "no panic" (every violation panics, which libFuzzer
//! and the smoke runner report as a crash):
//!
//! - the messages taken by the sink are exactly the model's, in order, each
//!   once, whatever the reads and the refusals (for raw framing, one message
//!   per read);
//! - a [`FrameError::TooLarge`] comes exactly when the model says the stream
//!   broke the limit, from the read that carried the first byte proving it
//!   (when the caller reads no more while there is a backlog), with the
//!   declared length (length framing) or a size just past the limit (lines);
//!   after it every call fails the same way, and the decoder holds nothing;
//! - small messages are lent, large ones owned;
//! - between reads the decoder keeps exactly the bytes of the unfinished
//!   message the model sees, and no heap memory between messages;
//! - memory: every byte buffer allocated during the case (watched by
//!   [`alloc`], a counting global allocator) is at most the pool class of the
//!   larger of `max_message_size` and one read, the bytes alive after each
//!   read are exactly what the decoder and the pool say they hold, and none
//!   are left once the decoder is cleared and the pool emptied.
//!
//! # The input
//! Eight header bytes, then the body; a shorter input reads as if padded with
//! zeros, so every input is a case.
//!
//! | byte | meaning |
//! | --- | --- |
//! | 0 | bits 0–1: framing (raw, line, length-4, length-8) unless the target fixes it; bit 2: *synthesize* the stream from records instead of taking the body as it is |
//! | 1 | `max_message_size`: 0–223 as is, above from a table of edges up to 2^30 |
//! | 2 | `inline_limit` (the slot size): 0–191 as is, above from a table |
//! | 3 | bits 0–3: the pool's smallest class, 2^n; bits 4–5: its cache limit; bit 6: *impatient*, feed despite a backlog and pump at random |
//! | 4 | refusals: the sink refuses an offer with probability n/256 (never more than 8 in a row) |
//! | 5 | how many bytes at the end of the body are read sizes, cycled (0 an empty read, 255 the rest) |
//! | 6–7 | seed of the sink's refusals and of the impatient pumping |

pub mod alloc;

use std::borrow::Cow;

use _rsepoll::framing::{envelope, Decoder, Frame, FrameError, Framing, PrefixWidth, Refused};
use _rsepoll::pool::BufferPool;

/// Bytes of the header.
pub const HEADER: usize = 8;

/// The largest stream a synthesized case grows to.
const SYNTH_LIMIT: usize = 16 * 1024;

/// What pads a synthesized payload when the input runs short (no `\n`).
const PAD: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";

/// One case: the decoder's settings, the stream, and how it is delivered.
#[derive(Clone, Debug)]
pub struct Case<'a> {
    /// The framing decoded.
    pub framing: Framing,
    /// The decoder's limit.
    pub max_message_size: usize,
    /// Messages up to this size are lent.
    pub inline_limit: usize,
    /// The pool's smallest class.
    pub pool_min: usize,
    /// The pool's cache limit.
    pub cache_limit: usize,
    /// Feed despite a backlog, and pump only now and then.
    pub impatient: bool,
    /// Refusals per 256 offers.
    pub refuse_rate: u8,
    /// Seed of the sink's and the pumping's choices.
    pub seed: u64,
    /// Read sizes, cycled: 0 is an empty read, `usize::MAX` the rest.
    pub reads: Vec<usize>,
    /// The bytes the peer sends.
    pub stream: Cow<'a, [u8]>,
}

const MAX_SIZES: [usize; 32] = [
    255,
    256,
    257,
    511,
    512,
    1023,
    1024,
    1025,
    4095,
    4096,
    4097,
    8191,
    16384,
    32767,
    65535,
    65536,
    65537,
    100_000,
    (1 << 20) - 1,
    1 << 20,
    (1 << 20) + 1,
    1 << 24,
    (1 << 30) - 1,
    1 << 30,
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    16,
];

const INLINE_LIMITS: [usize; 16] = [
    192,
    255,
    256,
    257,
    1024,
    4096,
    16384,
    65536,
    1 << 20,
    usize::MAX,
    0,
    1,
    2,
    8,
    64,
    128,
];

const CACHE_LIMITS: [usize; 4] = [usize::MAX, 0, 256, 1 << 16];

impl Case<'_> {
    /// The case an input describes; `framing` overrides byte 0's choice.
    pub fn parse(data: &[u8], framing: Option<Framing>) -> Case<'_> {
        let mut h = [0u8; HEADER];
        let n = data.len().min(HEADER);
        h[..n].copy_from_slice(&data[..n]);
        let body = data.get(HEADER..).unwrap_or(&[]);
        let framing = framing.unwrap_or(match h[0] & 3 {
            0 => Framing::Raw,
            1 => Framing::Line,
            2 => Framing::Length(PrefixWidth::Four),
            _ => Framing::Length(PrefixWidth::Eight),
        });
        let max_message_size = match h[1] {
            b @ 0..=223 => usize::from(b),
            b => MAX_SIZES[usize::from(b - 224)],
        };
        let inline_limit = match h[2] {
            b @ 0..=191 => usize::from(b),
            b => INLINE_LIMITS[usize::from(b - 192) % INLINE_LIMITS.len()],
        };
        let control = usize::from(h[5]).min(body.len());
        let (records, control) = body.split_at(body.len() - control);
        let mut reads: Vec<usize> = control
            .iter()
            .map(|&c| match c {
                255 => usize::MAX,
                c => usize::from(c),
            })
            .collect();
        if reads.iter().all(|&r| r == 0) {
            reads.push(usize::MAX);
        }
        let stream = if h[0] & 4 != 0 {
            Cow::Owned(synthesize(framing, records))
        } else {
            Cow::Borrowed(records)
        };
        Case {
            framing,
            max_message_size,
            inline_limit,
            pool_min: 1 << (h[3] & 15),
            cache_limit: CACHE_LIMITS[usize::from(h[3] >> 4) & 3],
            impatient: h[3] & 0x40 != 0,
            refuse_rate: h[4],
            seed: u64::from(u16::from_le_bytes([h[6], h[7]])),
            reads,
            stream,
        }
    }
}

/// A stream of well-formed messages made from `records`, so that the fuzzer
/// reaches deep into the framing without having to discover it. Each record
/// is a size byte then payload bytes (padded with a pattern when the input
/// runs short, with a pattern): line framing, `s & 0x3f` bytes (times 97 if bit 6), ended by
/// `\r\n` if bit 7 else `\n`; length framing, `s & 0x7f` bytes (plus 128 times
/// the next byte if bit 7) behind the prefix; raw, the records as they are.
pub fn synthesize(framing: Framing, records: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    let mut rest = records;
    if framing == Framing::Raw {
        return records.to_vec();
    }
    while let Some((&size, after)) = rest.split_first() {
        rest = after;
        let (len, crlf) = match framing {
            Framing::Line => {
                let len = usize::from(size & 0x3f) * if size & 0x40 != 0 { 97 } else { 1 };
                (len, size & 0x80 != 0)
            }
            _ => {
                let mut len = usize::from(size & 0x7f);
                if size & 0x80 != 0 {
                    if let Some((&high, after)) = rest.split_first() {
                        rest = after;
                        len += 128 * usize::from(high);
                    }
                }
                (len, false)
            }
        };
        if stream.len() + len > SYNTH_LIMIT {
            break;
        }
        let given = len.min(rest.len());
        let envelope = envelope(framing, len).expect("small payloads fit every prefix");
        stream.extend_from_slice(envelope.header());
        stream.extend_from_slice(&rest[..given]);
        let mut padded = given;
        while padded < len {
            let n = (len - padded).min(PAD.len());
            stream.extend_from_slice(&PAD[..n]);
            padded += n;
        }
        rest = &rest[given..];
        if crlf {
            stream.push(b'\r');
        }
        stream.extend_from_slice(envelope.trailer());
    }
    stream
}

/// Runs the case an input describes and checks it; panics on any violation.
pub fn check(data: &[u8], framing: Option<Framing>) {
    run(&Case::parse(data, framing));
}

/// What the reference model expects of a stream.
#[derive(Debug, Default)]
struct Expected {
    /// The messages' payloads, as ranges of the stream.
    messages: Vec<(usize, usize)>,
    /// Where each message's frame ends in the stream (a message boundary).
    boundaries: Vec<usize>,
    /// The stream breaks the limit: the position of the byte that proves it,
    /// and the declared length if there is one.
    error: Option<(usize, Option<u64>)>,
}

/// The reference decoder: the whole stream at once, one byte at a time.
fn model(framing: Framing, max: usize, stream: &[u8], reads: &[(usize, usize)]) -> Expected {
    let mut expected = Expected::default();
    match framing {
        Framing::Raw => {
            for &(start, end) in reads {
                if end > start {
                    expected.messages.push((start, end));
                    expected.boundaries.push(end);
                }
            }
        }
        Framing::Line => {
            let mut start = 0;
            loop {
                let newline = stream[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|i| start + i);
                // The line is too long once it has max + 1 bytes, unless the
                // last of them is a '\r' that may start its terminator: then
                // once the byte after it is not '\n'.
                let proof = match stream.get(start + max) {
                    Some(b'\r') => start + max + 1,
                    _ => start + max,
                };
                if proof < newline.unwrap_or(stream.len()) {
                    expected.error = Some((proof, None));
                    break;
                }
                let Some(newline) = newline else { break };
                let end = if newline > start && stream[newline - 1] == b'\r' {
                    newline - 1
                } else {
                    newline
                };
                assert!(end - start <= max, "the model missed a long line");
                expected.messages.push((start, end));
                expected.boundaries.push(newline + 1);
                start = newline + 1;
            }
        }
        Framing::Length(width) => {
            let width = width.bytes();
            let mut start = 0;
            while stream.len() - start >= width {
                let declared = stream[start..start + width]
                    .iter()
                    .fold(0u64, |n, &b| n << 8 | u64::from(b));
                if declared > max as u64 {
                    expected.error = Some((start + width - 1, Some(declared)));
                    break;
                }
                let payload = start + width;
                let len = declared as usize;
                if stream.len() - payload < len {
                    break;
                }
                expected.messages.push((payload, payload + len));
                expected.boundaries.push(payload + len);
                start = payload + len;
            }
        }
    }
    expected
}

/// Bytes a decoder keeps of the unfinished message in `tail`, the stream
/// after the last message boundary.
fn kept(framing: Framing, tail: usize) -> usize {
    match framing {
        Framing::Length(width) if tail >= width.bytes() => tail - width.bytes(),
        _ => tail,
    }
}

fn class(size: usize) -> usize {
    size.checked_next_power_of_two().unwrap_or(usize::MAX)
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The consumer: takes what the decoder offers unless it draws a refusal,
/// the bytes into a buffer reserved up front, so that it allocates no byte
/// buffer while watched.
struct Sink {
    /// The bytes of the messages taken, one after the other.
    taken: Vec<u8>,
    /// Where each message taken ends in `taken`.
    ends: Vec<usize>,
    /// Owned messages, until the consumer is done with them.
    owned: Vec<Vec<u8>>,
    /// The size of a message lent though large, or owned though small.
    misfiled: Option<usize>,
    rng: Rng,
    refuse_rate: u8,
    refused_in_a_row: u32,
    inline_limit: usize,
}

impl Sink {
    fn offer(&mut self, frame: Frame<'_>) -> Result<(), Refused> {
        if self.refused_in_a_row < 8 && (self.rng.next() & 0xff) < u64::from(self.refuse_rate) {
            self.refused_in_a_row += 1;
            return Err(frame.into());
        }
        self.refused_in_a_row = 0;
        let lent = matches!(frame, Frame::Slice(_));
        if lent != (frame.len() <= self.inline_limit) {
            self.misfiled.get_or_insert(frame.len());
        }
        self.taken.extend_from_slice(frame.as_bytes());
        self.ends.push(self.taken.len());
        if let Frame::Owned(buf) = frame {
            self.owned.push(buf);
        }
        Ok(())
    }
}

/// Runs `case` and checks it; panics on any violation.
pub fn run(case: &Case<'_>) {
    let Case {
        framing,
        max_message_size: max,
        inline_limit,
        pool_min,
        cache_limit,
        impatient,
        refuse_rate,
        seed,
        ref reads,
        ref stream,
    } = *case;
    let stream: &[u8] = stream;

    // Where each read starts and ends.
    let mut schedule = Vec::new();
    let mut offset = 0;
    for &read in reads.iter().cycle() {
        if offset == stream.len() {
            break;
        }
        let end = offset + read.min(stream.len() - offset);
        schedule.push((offset, end));
        offset = end;
    }
    let read_of = |position: usize| {
        schedule
            .iter()
            .position(|&(start, end)| start <= position && position < end)
            .expect("every byte is read")
    };
    let expected = model(framing, max, stream, &schedule);
    let largest_read = schedule.iter().map(|&(s, e)| e - s).max().unwrap_or(0);
    // One buffer holds at most a message or what the decoder keeps of the
    // input: one read, or, fed despite a backlog, all of them.
    let kept_input = if impatient {
        stream.len()
    } else {
        largest_read
    };
    let largest_request = match framing {
        Framing::Raw => kept_input,
        _ => max.max(kept_input),
    };
    let allocation_bound = class(pool_min).max(class(largest_request));
    let pool_max = if framing == Framing::Raw { 0 } else { max };

    let mut sink = Sink {
        taken: Vec::with_capacity(stream.len()),
        // Vectors of other alignments are not watched: these may grow.
        ends: Vec::new(),
        owned: Vec::new(),
        misfiled: None,
        rng: Rng(seed),
        refuse_rate,
        refused_in_a_row: 0,
        inline_limit,
    };
    let mut pump_rng = Rng(!seed);
    // Each pump takes a message unless refused, and at most 8 refusals come
    // in a row.
    let pump_limit = 9 * (stream.len() + 2);

    alloc::start();
    let mut pool = BufferPool::new(pool_min, pool_max, cache_limit);
    let mut decoder = Decoder::new(framing, max, inline_limit);
    let mut error = None;
    let mut pumps = 0;
    for (read, &(start, end)) in schedule.iter().enumerate() {
        assert!(
            impatient || !decoder.has_backlog(),
            "a backlog left after pumping"
        );
        let mut result = decoder.feed(&stream[start..end], &mut pool, |f| sink.offer(f));
        let mut wanted = if impatient {
            pump_rng.next() % 3
        } else {
            u64::MAX
        };
        while result.is_ok() && decoder.has_backlog() && wanted > 0 {
            result = decoder.pump(&mut pool, |f| sink.offer(f));
            wanted -= 1;
            pumps += 1;
            assert!(pumps <= pump_limit, "pump stalls");
        }
        // The consumer is done with the messages: their buffers go back.
        for buf in sink.owned.drain(..) {
            pool.give(buf);
        }
        if let Err(e) = result {
            error = Some((e, read));
            break;
        }
        alloc::pause();
        assert_eq!(
            alloc::live(),
            (decoder.heap_capacity() + pool.cached_bytes()) as isize,
            "byte buffers alive besides the decoder's and the pool's"
        );
        assert!(
            decoder.heap_capacity() <= 2 * allocation_bound,
            "the decoder holds {} bytes, bound {}",
            decoder.heap_capacity(),
            2 * allocation_bound
        );
        if !impatient {
            // No backlog: the decoder keeps the unfinished message, as the
            // model sees it at this point of the stream.
            let boundary = match expected.boundaries.partition_point(|&b| b <= end) {
                0 => 0,
                i => expected.boundaries[i - 1],
            };
            let keeps = match framing {
                Framing::Raw => 0,
                _ => kept(framing, end - boundary),
            };
            assert_eq!(decoder.buffered(), keeps, "bytes kept after read {read}");
            let between = framing == Framing::Raw || end == boundary;
            assert_eq!(
                decoder.in_message(),
                !between,
                "in_message after read {read}"
            );
            if between {
                assert_eq!(decoder.heap_capacity(), 0, "memory kept between messages");
            }
        }
        alloc::resume();
    }
    if error.is_none() {
        // Drain what the impatient caller left.
        let mut result = Ok(());
        while result.is_ok() && decoder.has_backlog() {
            result = decoder.pump(&mut pool, |f| sink.offer(f));
            pumps += 1;
            assert!(pumps <= pump_limit, "pump stalls");
        }
        for buf in sink.owned.drain(..) {
            pool.give(buf);
        }
        if let Err(e) = result {
            error = Some((e, schedule.len()));
        }
    }
    alloc::pause();

    assert_eq!(
        sink.misfiled, None,
        "a message lent or owned against inline_limit"
    );
    assert!(
        alloc::largest() <= allocation_bound,
        "a buffer of {} bytes, bound {allocation_bound}",
        alloc::largest()
    );
    // The messages.
    let Sink { taken, ends, .. } = sink;
    let mut got = Vec::with_capacity(ends.len());
    let mut from = 0;
    for &to in &ends {
        got.push(&taken[from..to]);
        from = to;
    }
    if framing == Framing::Raw && impatient {
        // Reads kept behind a backlog are offered together: only the bytes
        // and their order are promised.
        assert_eq!(&taken[..], stream, "raw bytes");
        assert!(got.iter().all(|m| !m.is_empty()), "an empty raw message");
    } else {
        let want: Vec<&[u8]> = expected
            .messages
            .iter()
            .map(|&(s, e)| &stream[s..e])
            .collect();
        if got != want {
            let first = got.iter().zip(&want).position(|(g, w)| g != w);
            panic!(
                "messages differ: got {}, want {}, first difference at {first:?}",
                got.len(),
                want.len()
            );
        }
    }
    // The error.
    match (expected.error, error) {
        (None, None) => {
            let tail = stream.len() - expected.boundaries.last().copied().unwrap_or(0);
            let tail = if framing == Framing::Raw { 0 } else { tail };
            assert_eq!(
                decoder.buffered(),
                kept(framing, tail),
                "bytes kept at the end"
            );
            assert_eq!(decoder.in_message(), tail > 0, "in_message at the end");
            assert!(!decoder.has_backlog());
            if tail == 0 {
                assert_eq!(decoder.heap_capacity(), 0, "memory kept between messages");
            }
        }
        (Some((at, declared)), Some((e, read))) => {
            let FrameError::TooLarge { size, limit } = e;
            assert_eq!(limit, max, "the limit reported");
            match declared {
                Some(declared) => assert_eq!(size, declared, "the declared length reported"),
                None => assert!(
                    size > max as u64 && size <= max as u64 + 2,
                    "line size {size} reported for limit {max}"
                ),
            }
            let due = read_of(at);
            if impatient {
                assert!(
                    read >= due,
                    "error at read {read}, before its byte came in read {due}"
                );
            } else {
                assert_eq!(
                    read, due,
                    "error at read {read}, its byte came in read {due}"
                );
            }
            assert_eq!(decoder.heap_capacity(), 0, "a failed decoder keeps memory");
            alloc::resume();
            let again = decoder.feed(b"\n\0\0\0\0", &mut pool, |_| Ok(()));
            let pumped = decoder.pump(&mut pool, |_| Ok(()));
            alloc::pause();
            assert_eq!(again, Err(e), "a failed decoder must stay failed");
            assert_eq!(pumped, Err(e), "a failed decoder must stay failed");
        }
        (want, got) => panic!("error: want {want:?}, got {got:?}"),
    }
    // Every byte accounted for: cleared, the decoder and the pool hold nothing
    // and nothing else allocated during the case is alive.
    alloc::resume();
    decoder.clear(&mut pool);
    assert_eq!(decoder.heap_capacity(), 0);
    assert_eq!(decoder.buffered(), 0);
    pool.release_cached();
    alloc::pause();
    assert_eq!(alloc::live(), 0, "byte buffers leaked");
}
