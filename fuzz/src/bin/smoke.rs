//! The fuzz targets' checks without libFuzzer, on a plain stable toolchain:
//! replays every input of the committed corpus, then mutates corpus inputs at
//! random for the time given. This is the short run in `.ci/run`; the long
//! campaigns use `cargo fuzz` (fuzz/README.md).
//!
//! ```text
//! cargo run --release --no-default-features --features smoke --bin smoke -- [--seconds S] [--seed N]
//!     [--target line|length4|length8|framing]... [--write-seeds]
//! ```
//!
//! A failing input is written to `fuzz/artifacts/smoke/` (replay it with
//! `cargo fuzz run TARGET FILE`, or this runner's `--replay FILE`).

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use _rsepoll::framing::{envelope, Framing, PrefixWidth};
use rsepoll_fuzz::{check, HEADER};

const TARGETS: [(&str, Option<Framing>); 4] = [
    ("line", Some(Framing::Line)),
    ("length4", Some(Framing::Length(PrefixWidth::Four))),
    ("length8", Some(Framing::Length(PrefixWidth::Eight))),
    ("framing", None),
];

/// The longest input made by mutation (libFuzzer's default `-max_len`).
const MAX_LEN: usize = 4096;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn read_corpus(target: &str) -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(corpus_dir().join(target)) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if let Ok(bytes) = std::fs::read(&path) {
                inputs.push(bytes);
            }
        }
    }
    inputs
}

/// One libFuzzer-style mutation or a few.
fn mutate(rng: &mut Rng, base: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.byte();
            }
            2 => {
                let i = rng.below(input.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                input.splice(i..i, bytes);
            }
            3 if !input.is_empty() => {
                let i = rng.below(input.len());
                let n = 1 + rng.below((input.len() - i).min(64));
                input.drain(i..i + n);
            }
            4 if !input.is_empty() => {
                let i = rng.below(input.len());
                let n = 1 + rng.below((input.len() - i).min(64));
                let copy = input[i..i + n].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, copy);
            }
            5 => {
                // The header: framing, limits, pool, refusals, reads.
                input.resize(input.len().max(HEADER), 0);
                input[rng.below(HEADER)] = rng.byte();
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let at = rng.below(input.len() + 1);
                input.truncate(at.max(HEADER.min(input.len())));
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                // Interesting bytes: terminators and prefix edges.
                let i = rng.below(input.len() + 1);
                let pick = [b'\n', b'\r', 0, 0xff, 0x7f, 0x80][rng.below(6)];
                input.insert(i, pick);
            }
        }
    }
    input.truncate(MAX_LEN);
    input
}

/// Inputs to start from: well-formed streams, oversized and malformed ones,
/// under assorted limits, read sizes and refusal rates.
fn seeds(framing: Option<Framing>, rng: &mut Rng) -> Vec<Vec<u8>> {
    let framings: Vec<Framing> = match framing {
        Some(f) => vec![f],
        None => vec![
            Framing::Raw,
            Framing::Line,
            Framing::Length(PrefixWidth::Four),
            Framing::Length(PrefixWidth::Eight),
        ],
    };
    let mut out = Vec::new();
    for framing in framings {
        let selector = match framing {
            Framing::Raw => 0,
            Framing::Line => 1,
            Framing::Length(PrefixWidth::Four) => 2,
            Framing::Length(PrefixWidth::Eight) => 3,
        };
        for i in 0..12u8 {
            let synth = i % 3 == 0;
            let reads: Vec<u8> = match i % 4 {
                0 => vec![],
                1 => vec![1],
                2 => vec![3, 0, 7],
                _ => (0..1 + rng.below(6)).map(|_| rng.byte() % 64).collect(),
            };
            let header = [
                selector | if synth { 4 } else { 0 },
                [10, 0, 64, 200, 224 + 9][usize::from(i) % 5],
                [4, 0, 16, 192 + 2][usize::from(i) % 4],
                (i & 7) | ((i % 4) << 4) | if i % 5 == 4 { 0x40 } else { 0 },
                [0, 64, 128, 250][usize::from(i) % 4],
                reads.len() as u8,
                rng.byte(),
                rng.byte(),
            ];
            let mut input = header.to_vec();
            if synth {
                for _ in 0..1 + rng.below(8) {
                    let size = rng.byte();
                    input.push(size);
                    input.extend((0..rng.below(20)).map(|_| rng.byte()));
                }
            } else {
                for m in 0..1 + rng.below(6) {
                    let len = [0, 1, 5, 9, 11, 40][rng.below(6)];
                    let payload: Vec<u8> = (0..len)
                        .map(|j| match framing {
                            Framing::Line => [b'a', b'\r', b'z', 0][(j + m) % 4],
                            _ => rng.byte(),
                        })
                        .collect();
                    let env = envelope(framing, payload.len()).expect("small");
                    input.extend_from_slice(env.header());
                    input.extend_from_slice(&payload);
                    if framing == Framing::Line && m % 2 == 1 {
                        input.push(b'\r');
                    }
                    input.extend_from_slice(env.trailer());
                }
                if i % 6 == 5 {
                    // A malformed or oversized prefix, or an endless line.
                    input.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
                    input.extend_from_slice(b"no end of line in sight\r\r");
                }
            }
            input.extend_from_slice(&reads);
            out.push(input);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one input; on a violation saves it and says where.
fn try_one(target: &str, framing: Option<Framing>, input: &[u8]) -> bool {
    if panic::catch_unwind(AssertUnwindSafe(|| check(input, framing))).is_ok() {
        return true;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/smoke");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{}", hex(&input[..input.len().min(16)])));
    let _ = std::fs::write(&path, input);
    eprintln!(
        "smoke {target}: a violation, input saved to {} ({} bytes: {})",
        path.display(),
        input.len(),
        hex(&input[..input.len().min(256)])
    );
    false
}

fn main() -> ExitCode {
    let mut seconds = 20.0f64;
    let mut seed = None;
    let mut targets: Vec<String> = Vec::new();
    let mut write_seeds = false;
    let mut replay = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds S")
            }
            "--seed" => seed = Some(args.next().and_then(|s| s.parse().ok()).expect("--seed N")),
            "--target" => targets.push(args.next().expect("--target NAME")),
            "--write-seeds" => write_seeds = true,
            "--replay" => replay.push(PathBuf::from(args.next().expect("--replay FILE"))),
            other => {
                eprintln!("smoke: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let chosen: Vec<(&str, Option<Framing>)> = TARGETS
        .iter()
        .copied()
        .filter(|(name, _)| targets.is_empty() || targets.iter().any(|t| t == name))
        .collect();
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = Rng(seed);

    if write_seeds {
        for &(name, framing) in &chosen {
            let dir = corpus_dir().join(name);
            std::fs::create_dir_all(&dir).expect("corpus directory");
            for (i, input) in seeds(framing, &mut rng).into_iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:03}")), input).expect("write seed");
            }
        }
        return ExitCode::SUCCESS;
    }
    if !replay.is_empty() {
        let mut failed = 0;
        for path in &replay {
            let input = std::fs::read(path).expect("readable input");
            for &(name, framing) in &chosen {
                if !try_one(name, framing, &input) {
                    failed += 1;
                }
            }
        }
        println!(
            "smoke replay: {} passed, {failed} failed",
            replay.len() * chosen.len() - failed
        );
        return if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }

    // Silence the default hook's report of each caught panic after the first.
    let hook = panic::take_hook();
    let reported = std::sync::atomic::AtomicBool::new(false);
    panic::set_hook(Box::new(move |info| {
        if !reported.swap(true, std::sync::atomic::Ordering::Relaxed) {
            hook(info);
        }
    }));

    println!(
        "smoke: seed {seed}, {seconds} s over {} targets",
        chosen.len()
    );
    let share = Duration::from_secs_f64(seconds / chosen.len() as f64);
    let mut passed = 0u64;
    let mut failed = 0u64;
    for &(name, framing) in &chosen {
        let started = Instant::now();
        let mut corpus = read_corpus(name);
        let replayed = corpus.len();
        let mut cases = 0u64;
        let mut failures = 0u64;
        for input in &corpus {
            cases += 1;
            if !try_one(name, framing, input) {
                failures += 1;
            }
        }
        if corpus.is_empty() {
            corpus = seeds(framing, &mut rng);
        }
        while started.elapsed() < share && failures < 5 {
            for _ in 0..64 {
                let base = &corpus[rng.below(corpus.len())];
                let input = mutate(&mut rng, base, &corpus);
                cases += 1;
                if !try_one(name, framing, &input) {
                    failures += 1;
                }
            }
        }
        println!(
            "smoke {name}: {cases} cases ({replayed} from the corpus) in {:.1} s, {failures} failed",
            started.elapsed().as_secs_f64()
        );
        passed += cases - failures;
        failed += failures;
    }
    println!("smoke: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
