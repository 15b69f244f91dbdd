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

/// The allreduce algorithm used when none is forced, from measurements
/// (README § Performance): recursive doubling up to `small_bytes`
/// (latency-bound: log2 N steps). Above that, with every rank on one host and
/// at most 4 ranks, the double binary tree: its reduce and broadcast overlap
/// segment by segment, while the ring waits between reduce-scatter and
/// allgather, and on one host the CPU, not a link, is the bottleneck (measured
/// 1.1-1.6x the ring's busbw at N = 2, 3, 4). Otherwise the ring, which is
/// bandwidth-optimal per link (and what `kolo-sim` predicts is fastest across
/// hosts).
///
/// ```
/// use kolo::algo::cost::{default_algo, Algo};
/// assert_eq!(default_algo(8, 65536, 4, true), Algo::Rd);
/// assert_eq!(default_algo(1 << 20, 65536, 4, true), Algo::Tree);
/// assert_eq!(default_algo(1 << 20, 65536, 8, true), Algo::Ring);
/// assert_eq!(default_algo(1 << 20, 65536, 4, false), Algo::Ring);
/// ```
pub fn default_algo(bytes: usize, small_bytes: usize, size: usize, one_host: bool) -> Algo {
    if bytes <= small_bytes {
        Algo::Rd
    } else if one_host && size <= 4 {
        Algo::Tree
    } else {
        Algo::Ring
    }
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
    fn names_round_trip() {
        for a in Algo::ALL {
            assert_eq!(Algo::parse(a.name()), Some(a));
        }
        assert_eq!(Algo::parse("auto"), None);
        assert_eq!(Algo::parse(""), None);
    }
}
