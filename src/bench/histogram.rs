//! A log-linear latency histogram in the manner of HdrHistogram.
//!
//! Values (nanoseconds) below 256 have a bucket each; above, every power of
//! two is cut into 128 equal buckets, so a bucket is never wider than 1/128
//! of the values it holds: a percentile read back is the highest value of its
//! bucket, at most 0.8 % above the true one. Recording is one `leading_zeros`
//! and one increment; the whole `u64` range fits in 7,424 counters (58 KiB).

/// Values below `1 << (SUB_BITS + 1)` are exact.
const SUB_BITS: u32 = 7;
const SUB_COUNT: u64 = 1 << SUB_BITS;
/// The first value that shares its bucket with others.
const LINEAR_END: u64 = SUB_COUNT * 2;
const BUCKETS: usize = (LINEAR_END + (64 - SUB_BITS as u64 - 2) * SUB_COUNT + SUB_COUNT) as usize;

/// Counts of recorded values, in log-linear buckets.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish()
    }
}

/// The bucket of `value`.
fn index(value: u64) -> usize {
    if value < LINEAR_END {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (value >> shift) - SUB_COUNT;
    (LINEAR_END + u64::from(shift - 1) * SUB_COUNT + sub) as usize
}

/// The highest value that falls in bucket `index`.
fn highest(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR_END {
        return index;
    }
    let shift = (index - LINEAR_END) / SUB_COUNT + 1;
    let sub = (index - LINEAR_END) % SUB_COUNT + SUB_COUNT;
    // The lowest value of the next bucket, less one; no overflow at the top.
    (sub << shift) + ((1u64 << shift) - 1)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.counts[index(value)] += 1;
        self.count += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds every value of `other`.
    pub fn add(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += *theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Forgets every value.
    pub fn clear(&mut self) {
        if self.count > 0 {
            self.counts.fill(0);
        }
        self.count = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The smallest value recorded (0 if none).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// The largest value recorded (0 if none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The mean of the values recorded (0 if none).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The `p`-th percentile (0 to 100): the value of rank `ceil(p/100 * n)`
    /// (at least 1) among the `n` sorted values, read back as the highest
    /// value of its bucket (never above the largest value recorded); 0 if
    /// nothing was recorded.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil() as u64;
        let rank = rank.clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return highest(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The percentile of `sorted` with the same rank rule as the histogram.
    fn reference(sorted: &[u64], p: f64) -> u64 {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn check_against_sorted(values: &[u64]) {
        let mut h = Histogram::new();
        for &v in values {
            h.record(v);
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        for p in [0.0, 1.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0] {
            let exact = reference(&sorted, p);
            let got = h.percentile(p);
            assert!(got >= exact, "p{p}: {got} < {exact}");
            assert!(
                got - exact <= exact / 128,
                "p{p}: {got} more than 1/128 above {exact}"
            );
        }
        assert_eq!(h.count(), values.len() as u64);
        assert_eq!(h.min(), sorted[0]);
        assert_eq!(h.max(), *sorted.last().unwrap());
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        assert!((h.mean() - mean).abs() <= mean * 1e-9 + 1e-9);
    }

    #[test]
    fn buckets_cover_the_range_in_order() {
        // Consecutive values fill consecutive buckets, each within its range.
        let mut last = 0;
        for v in 0..100_000u64 {
            let i = index(v);
            assert!(i == last || i == last + 1, "{v} -> {i} after {last}");
            last = i;
        }
        for v in (0..100_000u64)
            .chain((0..64).map(|s| 1u64 << s))
            .chain([u64::MAX])
        {
            let i = index(v);
            assert!(i < BUCKETS, "{v} -> {i}");
            assert!(v <= highest(i), "{v} above its bucket's top {}", highest(i));
            if i > 0 {
                assert!(v > highest(i - 1), "{v} not above the previous bucket");
            }
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(highest(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn small_values_are_exact() {
        let values: Vec<u64> = (0..256).rev().collect();
        check_against_sorted(&values);
        let mut h = Histogram::new();
        h.record(255);
        assert_eq!(h.percentile(50.0), 255);
    }

    #[test]
    fn percentiles_match_a_sorted_reference() {
        // A deterministic spread over nine decades: xorshift, then a random shift.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = Vec::new();
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push((state >> 34) >> (state % 24));
        }
        check_against_sorted(&values);
        // A latency-like shape: most around 50 µs, a tail to 20 ms.
        let shaped: Vec<u64> = (0..100_000u64)
            .map(|i| 40_000 + (i * 7919) % 20_000 + if i % 1000 == 0 { i * 200 } else { 0 })
            .collect();
        check_against_sorted(&shaped);
        check_against_sorted(&[u64::MAX, 1, u64::MAX / 3]);
    }

    #[test]
    fn add_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for v in 0..50_000u64 {
            let v = v * v % 1_000_003;
            if v % 3 == 0 { &mut a } else { &mut b }.record(v);
            all.record(v);
        }
        a.add(&b);
        for p in [50.0, 99.0, 99.9, 100.0] {
            assert_eq!(a.percentile(p), all.percentile(p));
        }
        assert_eq!(
            (a.count(), a.min(), a.max()),
            (all.count(), all.min(), all.max())
        );
        a.clear();
        assert_eq!(
            (a.count(), a.percentile(99.0), a.min(), a.max()),
            (0, 0, 0, 0)
        );
        a.add(&Histogram::new());
        assert_eq!(a.min(), 0);
    }
}
