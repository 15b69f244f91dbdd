//! A latency-bandwidth-compute (α-β-γ) cost model evaluated on schedules, and
//! an allreduce algorithm chooser built on it.
//!
//! Costs are counted from the schedule a rank would actually run, not from
//! textbook formulas, so the model sees exactly what the implementation does
//! (uneven chunks, the fold for non-power-of-two sizes, pipeline fill).

use super::{doubling, halving, ring, tree, Apply, Op, Schedule};

/// What one rank's schedule costs.
///
/// ```
/// use kolo::algo::{cost, ring};
/// let c = cost::of(&ring::allreduce(0, 4, 1000), 4);
/// assert_eq!(c.steps, 6);
/// assert_eq!(c.bytes_sent, 6 * 250 * 4);
/// assert_eq!(c.bytes_reduced, 3 * 250 * 4);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Rounds with at least one send or receive (each costs one latency).
    pub steps: usize,
    /// Bytes this rank sends.
    pub bytes_sent: usize,
    /// Bytes this rank reduces: reducing receives plus local combines.
    pub bytes_reduced: usize,
}

/// Count the cost of one rank's schedule for elements of `elem` bytes.
///
/// ```
/// use kolo::algo::{cost, doubling};
/// // 4 ranks: two exchanges of the whole buffer, each combined from scratch.
/// let c = cost::of(&doubling::allreduce(0, 4, 10), 8);
/// assert_eq!((c.steps, c.bytes_sent, c.bytes_reduced), (2, 160, 160));
/// ```
pub fn of(s: &Schedule, elem: usize) -> Cost {
    let mut c = Cost::default();
    for round in &s.rounds {
        let mut transfers = false;
        for op in &round.ops {
            match *op {
                Op::Send { from, .. } => {
                    transfers = true;
                    c.bytes_sent += from.len * elem;
                }
                Op::Recv { into, apply, .. } => {
                    transfers = true;
                    if matches!(apply, Apply::Reduce { .. }) {
                        c.bytes_reduced += into.len * elem;
                    }
                }
                Op::Combine { into, .. } => c.bytes_reduced += into.len * elem,
                Op::Copy { .. } => {}
            }
        }
        c.steps += usize::from(transfers);
    }
    c
}

/// Machine parameters: per-message latency, per-byte transfer time and
/// per-byte reduction time.
///
/// ```
/// use kolo::algo::cost::{Cost, Model};
/// let m = Model { alpha_s: 1e-5, beta_s_per_byte: 1e-9, gamma_s_per_byte: 1e-10 };
/// let t = m.time(&Cost { steps: 2, bytes_sent: 1000, bytes_reduced: 1000 });
/// assert!((t - (2e-5 + 1e-6 + 1e-7)).abs() < 1e-15);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    /// Seconds per step (latency of one round of messages).
    pub alpha_s: f64,
    /// Seconds per byte sent (inverse bandwidth).
    pub beta_s_per_byte: f64,
    /// Seconds per byte reduced (inverse reduction throughput).
    pub gamma_s_per_byte: f64,
}

impl Model {
    /// `alpha * steps + beta * bytes_sent + gamma * bytes_reduced`.
    ///
    /// ```
    /// use kolo::algo::cost::{Cost, Model};
    /// let m = Model { alpha_s: 1.0, beta_s_per_byte: 0.0, gamma_s_per_byte: 0.0 };
    /// assert_eq!(m.time(&Cost { steps: 3, bytes_sent: 9, bytes_reduced: 9 }), 3.0);
    /// ```
    pub fn time(&self, c: &Cost) -> f64 {
        self.alpha_s * c.steps as f64
            + self.beta_s_per_byte * c.bytes_sent as f64
            + self.gamma_s_per_byte * c.bytes_reduced as f64
    }
}

/// An allreduce algorithm.
///
/// ```
/// use kolo::algo::cost::Algo;
/// assert_eq!(Algo::parse("rhd"), Some(Algo::Rhd));
/// assert_eq!(Algo::Tree.name(), "tree");
/// assert_eq!(Algo::parse("auto"), None); // the caller's business
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algo {
    /// [`ring::allreduce`]: bandwidth-optimal, 2(N-1) steps.
    Ring,
    /// [`tree::double_binary`]: pipelined double binary tree.
    Tree,
    /// [`halving::rabenseifner`]: recursive halving then doubling.
    Rhd,
    /// [`doubling::allreduce`]: recursive doubling, whole buffer per step.
    Rd,
    /// [`tree::binomial`]: binomial reduce then broadcast, whole buffer per step.
    Binomial,
}

impl Algo {
    /// Every algorithm.
    ///
    /// ```
    /// use kolo::algo::cost::Algo;
    /// assert!(Algo::ALL.iter().all(|a| Algo::parse(a.name()) == Some(*a)));
    /// ```
    pub const ALL: [Algo; 5] = [Algo::Ring, Algo::Tree, Algo::Rhd, Algo::Rd, Algo::Binomial];

    /// Short lowercase name: "ring", "tree", "rhd", "rd" or "binomial".
    ///
    /// ```
    /// assert_eq!(kolo::algo::cost::Algo::Binomial.name(), "binomial");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::Tree => "tree",
            Algo::Rhd => "rhd",
            Algo::Rd => "rd",
            Algo::Binomial => "binomial",
        }
    }

    /// The algorithm with this [`name`](Algo::name) (case-insensitive,
    /// surrounding spaces ignored), or `None`.
    ///
    /// ```
    /// use kolo::algo::cost::Algo;
    /// assert_eq!(Algo::parse(" Ring "), Some(Algo::Ring));
    /// assert_eq!(Algo::parse("nccl"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Algo> {
        let s = s.trim();
        Algo::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
    }
}

/// The allreduce schedule of `algo` for `rank` of `size` on `count` elements;
/// `seg` (elements per pipelined message) is used by [`Algo::Tree`] only.
///
/// ```
/// use kolo::algo::cost::{allreduce_schedule, Algo};
/// let s = allreduce_schedule(Algo::Rd, 0, 8, 100, 16);
/// assert_eq!(s, kolo::algo::doubling::allreduce(0, 8, 100));
/// ```
pub fn allreduce_schedule(
    algo: Algo,
    rank: usize,
    size: usize,
    count: usize,
    seg: usize,
) -> Schedule {
    match algo {
        Algo::Ring => ring::allreduce(rank, size, count),
        Algo::Tree => tree::double_binary(rank, size, count, seg),
        Algo::Rhd => halving::rabenseifner(rank, size, count),
        Algo::Rd => doubling::allreduce(rank, size, count),
        Algo::Binomial => tree::binomial(rank, size, count),
    }
}

/// A model that leaves the ring only when another algorithm is predicted to
/// be this much cheaper: the model ignores caches and the ring's slicing, so a
/// near tie is not evidence.
pub const SWITCH_MARGIN: f64 = 0.9;

impl Model {
    /// The model used when nothing was measured or configured (about a
    /// 10 Gbit/s link): 20 µs per step, 1.5 GB/s, reductions at 5 GB/s.
    ///
    /// ```
    /// let m = kolo::algo::cost::Model::DEFAULT;
    /// assert_eq!(m.alpha_s, 20e-6);
    /// ```
    pub const DEFAULT: Model = Model {
        alpha_s: 20e-6,
        beta_s_per_byte: 1.0 / 1.5e9,
        gamma_s_per_byte: 1.0 / 5e9,
    };
}

/// The allreduce algorithm `auto` runs for a buffer of `bytes` on `size`
/// ranks under `model`.
///
/// The model decides between latency and bandwidth: recursive doubling or
/// halving-doubling replace the ring when [`predict`] says they are at least
/// 10% faster ([`SWITCH_MARGIN`]). Where the ring stays, up to 4 ranks on a
/// `crowded` host (every rank on it, and no more cores than ranks) run the
/// double binary tree instead: measured 1.1-1.6x the ring's busbw on 2 cores
/// (benches/RESULTS.md, the algorithms section), because its reduce and broadcast overlap segment
/// by segment, which a per-rank α-β-γ model cannot see (it flatters the tree
/// at small sizes and undersells it on a CPU-bound host, so the tree is not
/// ranked by the model). With a core per rank the ring wins again.
///
/// ```
/// use kolo::algo::cost::{select, Algo, Model};
/// let m = Model::DEFAULT;
/// assert_eq!(select(&m, 4, false, 8), Algo::Rd);
/// assert_eq!(select(&m, 4, false, 256 << 20), Algo::Ring);
/// assert_eq!(select(&m, 4, true, 256 << 20), Algo::Tree);
/// assert_eq!(select(&m, 8, true, 256 << 20), Algo::Ring);
/// ```
pub fn select(model: &Model, size: usize, crowded: bool, bytes: usize) -> Algo {
    if size <= 1 {
        return Algo::Rd;
    }
    // Byte-sized elements: the choice depends on bytes, not on the dtype.
    let count = bytes.max(1);
    let ring = predict(model, Algo::Ring, size, count, 1, 1);
    let (other, t) = [Algo::Rd, Algo::Rhd]
        .into_iter()
        .map(|a| (a, predict(model, a, size, count, 1, 1)))
        .fold(
            (Algo::Rd, f64::INFINITY),
            |b, x| if x.1 < b.1 { x } else { b },
        );
    if t < SWITCH_MARGIN * ring {
        other
    } else if crowded && size <= 4 {
        Algo::Tree
    } else {
        Algo::Ring
    }
}

/// [`select`] for every power of two from 1 byte to 2^40 bytes: entry `k`
/// is the choice for buffers of `2^(k-1) + 1 ..= 2^k` bytes (see
/// [`bucket`]). Built once per communicator so a call costs one lookup.
///
/// ```
/// use kolo::algo::cost::{bucket, table, Algo, Model};
/// let t = table(&Model::DEFAULT, 4, true);
/// assert_eq!(t[bucket(8)], Algo::Rd);
/// assert_eq!(t[bucket(64 << 20)], Algo::Tree);
/// ```
pub fn table(model: &Model, size: usize, crowded: bool) -> Vec<Algo> {
    (0..=40)
        .map(|k| select(model, size, crowded, 1usize << k))
        .collect()
}

/// The [`table`] entry for a buffer of `bytes`: the smallest `k` with
/// `2^k >= bytes` (capped at 40).
///
/// ```
/// use kolo::algo::cost::bucket;
/// assert_eq!((bucket(0), bucket(1), bucket(8), bucket(9)), (0, 0, 3, 4));
/// ```
pub fn bucket(bytes: usize) -> usize {
    let k = usize::BITS - bytes.max(1).saturating_sub(1).leading_zeros();
    (k as usize).min(40)
}

/// The crossovers of a [`table`]: `(first bucket's bytes, algorithm)` for
/// each run of equal choices, for logs and the README.
///
/// ```
/// use kolo::algo::cost::{crossovers, Algo};
/// let c = crossovers(&[Algo::Rd, Algo::Rd, Algo::Ring]);
/// assert_eq!(c, vec![(1, Algo::Rd), (3, Algo::Ring)]);
/// ```
pub fn crossovers(table: &[Algo]) -> Vec<(usize, Algo)> {
    let mut out: Vec<(usize, Algo)> = Vec::new();
    for (k, &a) in table.iter().enumerate() {
        if out.last().map_or(true, |l| l.1 != a) {
            // Bucket k covers 2^(k-1)+1 ..= 2^k.
            let first = if k == 0 { 1 } else { (1usize << (k - 1)) + 1 };
            out.push((first, a));
        }
    }
    out
}

/// Ranks whose schedules [`predict`] evaluates: all of them up to 64 ranks,
/// else a sample: the first, middle and last four, and every (N/16)-th rank
/// (covering both tree roots, folded pairs and plain ranks).
fn sample(size: usize) -> Vec<usize> {
    if size <= 64 {
        return (0..size).collect();
    }
    let mut v: Vec<usize> = (0..4)
        .chain(size / 2 - 2..size / 2 + 2)
        .chain(size - 4..size)
        .chain((0..size).step_by(size / 16))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Predicted time in seconds of `algo` on `size` ranks and `count` elements
/// of `elem` bytes: the maximum over ranks (a sample of them for more than 64
/// ranks) of `model.time` of that rank's schedule. Building a tree schedule
/// costs O(count / seg) per rank, so pass a realistic `seg`.
///
/// This is a per-rank model: a round costs `alpha` on the rank that runs it,
/// time spent waiting for other ranks is not counted. That is exact for the
/// ring, rd and rhd (every rank is busy in every round) but flatters the
/// trees at small sizes: a leaf of [`tree::double_binary`] runs only a few
/// rounds yet waits for the whole `2 H + S - 1`-step pipeline.
///
/// ```
/// use kolo::algo::cost::{predict, Algo, Model};
/// let m = Model { alpha_s: 1e-5, beta_s_per_byte: 1e-9, gamma_s_per_byte: 0.0 };
/// // Recursive doubling on 8 ranks: 3 steps of the whole 400-byte buffer.
/// let t = predict(&m, Algo::Rd, 8, 100, 4, 16);
/// assert!((t - (3e-5 + 3.0 * 400e-9)).abs() < 1e-12);
/// ```
pub fn predict(
    model: &Model,
    algo: Algo,
    size: usize,
    count: usize,
    elem: usize,
    seg: usize,
) -> f64 {
    sample(size)
        .into_iter()
        .map(|r| model.time(&of(&allreduce_schedule(algo, r, size, count, seg), elem)))
        .fold(0.0, f64::max)
}

/// The algorithm among Ring, Tree, Rhd and Rd with the smallest [`predict`]ed
/// time (the first of them in that order on a tie).
///
/// ```
/// use kolo::algo::cost::{choose, Algo, Model};
/// let m = Model { alpha_s: 20e-6, beta_s_per_byte: 1.0 / 1.5e9, gamma_s_per_byte: 1.0 / 5e9 };
/// assert_eq!(choose(&m, 4, 2, 4, 1 << 17), Algo::Rd); // 8 bytes: latency-bound
/// ```
pub fn choose(model: &Model, size: usize, count: usize, elem: usize, seg: usize) -> Algo {
    let mut best = (Algo::Ring, f64::INFINITY);
    for algo in [Algo::Ring, Algo::Tree, Algo::Rhd, Algo::Rd] {
        let t = predict(model, algo, size, count, elem, seg);
        if t < best.1 {
            best = (algo, t);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model {
            alpha_s: 20e-6,
            beta_s_per_byte: 1.0 / 1.5e9,
            gamma_s_per_byte: 1.0 / 5e9,
        }
    }

    fn max_steps(algo: Algo, n: usize, count: usize, seg: usize) -> usize {
        let ranks: Vec<usize> = if n <= 64 {
            (0..n).collect()
        } else {
            vec![0, 1, 2, 3, n / 2, n - 2, n - 1]
        };
        ranks
            .into_iter()
            .map(|r| of(&allreduce_schedule(algo, r, n, count, seg), 4).steps)
            .max()
            .unwrap()
    }

    #[test]
    fn step_counts() {
        for n in (1..=70usize).chain([127, 128, 129, 500, 512, 1000, 1024]) {
            let floor = (usize::BITS - 1 - n.leading_zeros()) as usize;
            let ceil = n.next_power_of_two().trailing_zeros() as usize;
            let odd = usize::from(!n.is_power_of_two());
            assert_eq!(max_steps(Algo::Ring, n, 1000, 64), 2 * (n - 1), "n={n}");
            assert_eq!(max_steps(Algo::Rd, n, 1000, 64), floor + 2 * odd, "n={n}");
            assert_eq!(
                max_steps(Algo::Rhd, n, 1000, 64),
                2 * floor + 2 * odd,
                "n={n}"
            );
            assert_eq!(max_steps(Algo::Binomial, n, 1000, 64), 2 * ceil, "n={n}");
            // 1000 elements, halves of 500 in segments of 64: S = 8 per half.
            // 2H + S - 1 pipeline steps, up to twice S on ranks whose link
            // both trees use (see tree::double_binary).
            let tree = max_steps(Algo::Tree, n, 1000, 64);
            assert!(tree <= 2 * (ceil + 8), "n={n} tree={tree}");
        }
    }

    #[test]
    fn counts_reductions_of_both_kinds() {
        // Ring reduces (N-1)/N of the buffer on arrival; rhd the same amount;
        // rd combines the whole buffer log2 N times from scratch.
        let n = 8;
        let ring = of(&ring::allreduce(3, n, 800), 4);
        let rhd = of(&halving::rabenseifner(3, n, 800), 4);
        let rd = of(&doubling::allreduce(3, n, 800), 4);
        assert_eq!(ring.bytes_reduced, 700 * 4);
        assert_eq!(rhd.bytes_reduced, 700 * 4);
        assert_eq!(rd.bytes_reduced, 3 * 800 * 4);
        assert_eq!((ring.bytes_sent, rhd.bytes_sent), (1400 * 4, 1400 * 4));
    }

    #[test]
    fn choose_by_size() {
        let m = model();
        let big = 256 << 20; // bytes
        let seg = (512 << 10) / 4;
        // Large buffers are bandwidth-bound. At N = 4 ring and rhd send and
        // reduce exactly the same bytes and rhd needs 4 steps to the ring's 6,
        // so this model prefers rhd there (by 2 alpha); at sizes that are not
        // powers of two rhd's fold costs a whole extra buffer and the ring wins.
        let at4 = choose(&m, 4, big / 4, 4, seg);
        assert!(matches!(at4, Algo::Ring | Algo::Rhd), "{at4:?}");
        let ring = predict(&m, Algo::Ring, 4, big / 4, 4, seg);
        for a in [Algo::Tree, Algo::Rd] {
            assert!(ring < predict(&m, a, 4, big / 4, 4, seg), "{a:?}");
        }
        for n in [3, 5, 6, 7] {
            assert_eq!(choose(&m, n, big / 4, 4, seg), Algo::Ring, "n={n}");
        }
        // 8 bytes: latency-bound, a logarithmic algorithm.
        let small = choose(&m, 4, 2, 4, seg);
        assert!(
            matches!(small, Algo::Rd | Algo::Rhd | Algo::Tree),
            "{small:?}"
        );
        for n in [16, 100, 1024] {
            let a = choose(&m, n, 2, 4, seg);
            assert!(
                matches!(a, Algo::Rd | Algo::Rhd | Algo::Tree),
                "n={n} {a:?}"
            );
        }
    }

    #[test]
    fn selector_under_the_default_model() {
        let m = Model::DEFAULT;
        // The issue's rule: ring for 256 MiB and a logarithmic algorithm for 8 B at N = 4.
        assert_eq!(select(&m, 4, false, 256 << 20), Algo::Ring);
        assert!(matches!(select(&m, 4, false, 8), Algo::Rd | Algo::Rhd));
        // Latency-bound sizes leave the ring at every world size; large ones keep it.
        for n in [2, 3, 5, 8, 16, 64, 1024] {
            assert!(
                matches!(select(&m, n, false, 8), Algo::Rd | Algo::Rhd),
                "n={n}"
            );
            assert_eq!(select(&m, n, false, 1 << 30), Algo::Ring, "n={n}");
        }
        // One host, up to 4 ranks: the tree replaces the ring, nothing else.
        for n in 2..=4 {
            assert_eq!(select(&m, n, true, 256 << 20), Algo::Tree, "n={n}");
            assert_eq!(select(&m, n, true, 8), select(&m, n, false, 8), "n={n}");
        }
        // A slower network per step moves the crossover up.
        let slow = Model { alpha_s: 1e-3, ..m };
        let t = table(&m, 8, false);
        let ts = table(&slow, 8, false);
        let first_ring = |t: &[Algo]| t.iter().position(|&a| a == Algo::Ring).unwrap();
        assert!(first_ring(&ts) > first_ring(&t));
        // The table is monotone in the sense that once the ring wins it keeps winning.
        let k = first_ring(&t);
        assert!(t[k..].iter().all(|&a| a == Algo::Ring));
    }

    #[test]
    fn names_round_trip() {
        for a in Algo::ALL {
            assert_eq!(Algo::parse(a.name()), Some(a));
        }
        assert_eq!(Algo::parse("auto"), None);
        assert_eq!(Algo::parse(""), None);
    }
}
