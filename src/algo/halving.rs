//! Rabenseifner's allreduce: a reduce-scatter by recursive halving followed by
//! an allgather by recursive doubling. Bandwidth-optimal like the ring
//! (2(N'-1)/N' of the buffer per rank) in 2 log2 N' rounds instead of 2(N-1),
//! where N' is the largest power of two not above N.
//!
//! # Bitwise determinism
//!
//! In the reduce-scatter every rank keeps a different half of its window, so
//! each partial sum is computed by exactly one rank; after the last halving
//! step each block's final value exists on exactly one rank, and the allgather
//! and the unfold only copy it. Every rank therefore ends with the same bits.
//! The operand order (`incoming_first` when the partner's group is the lower
//! one) additionally makes each block's reduction the same balanced tree over
//! the ranks in order, `op(lower group, higher group)` at every level, as in
//! [`super::doubling::allreduce`].

use super::doubling::Fold;
use super::{chunks, Apply, Op, Region, Round, Schedule};

/// Rabenseifner allreduce in place on `count` output elements.
///
/// With `p` the largest power of two `<= size` and `rem = size - p`, the first
/// `2 rem` ranks fold in pairs first (each even rank sends its whole buffer to
/// the next odd rank, which reduces it as `op(even, odd)`), and get the result
/// back at the end. The `p` remaining ranks split the buffer into `p` blocks:
/// in halving step k (k = 0, 1, ...) a rank exchanges half of its current
/// window with the rank whose new rank differs in bit k, keeping the lower
/// half if that bit is 0, and reduces the received half into the one it
/// keeps; then the steps are undone in reverse order, each rank sending its
/// window and receiving its partner's. Per rank in the power-of-two part:
/// `2 log2 p` rounds, `count - |own block|` elements sent while halving and
/// the windows of 1, 2, ..., p/2 blocks while doubling: `2 (p-1)/p count` when
/// `p` divides `count`.
///
/// ```
/// let s = kolo::algo::halving::rabenseifner(0, 8, 800);
/// assert_eq!(s.rounds.len(), 2 * 3);
/// assert_eq!(s.elements_sent(), 2 * 7 * 100);
/// // Non-power-of-two: ranks 0 and 1 fold, rank 0 waits for the result.
/// assert_eq!(kolo::algo::halving::rabenseifner(0, 6, 60).rounds.len(), 2);
/// ```
pub fn rabenseifner(rank: usize, size: usize, count: usize) -> Schedule {
    let mut rounds = Vec::new();
    let fold = Fold::new(rank, size, count, &mut rounds);
    let (p, real) = (fold.p, |nr| fold.real(nr));
    if let Some(nr) = fold.newrank {
        let bl = chunks(count, p);
        // Blocks lo..hi as one region (they are contiguous).
        let span = |lo: usize, hi: usize| Region::out(bl[lo].start..bl[hi - 1].end);
        let (mut lo, mut hi) = (0, p);
        // Reduce-scatter. Before step `mask` the window depends only on the
        // bits of `nr` below `mask`, so both partners hold the same window;
        // each keeps the half the other gives up. The received half is reduced
        // on arrival: it does not overlap the half being sent.
        let mut mask = 1;
        while mask < p {
            let np = nr ^ mask;
            let mid = (lo + hi) / 2;
            let (keep, give) = if nr & mask == 0 {
                ((lo, mid), (mid, hi))
            } else {
                ((mid, hi), (lo, mid))
            };
            rounds.push(Round {
                ops: vec![
                    Op::Send {
                        peer: real(np),
                        from: span(give.0, give.1),
                    },
                    Op::Recv {
                        peer: real(np),
                        into: span(keep.0, keep.1),
                        // We hold the aligned group of `mask` new ranks around
                        // `nr`, the partner the neighbouring one: lower first.
                        apply: Apply::Reduce {
                            incoming_first: np < nr,
                        },
                    },
                ],
            });
            (lo, hi) = keep;
            mask <<= 1;
        }
        // Allgather: undo the halving steps, last one first.
        while mask > 1 {
            mask >>= 1;
            let np = nr ^ mask;
            let w = hi - lo;
            let theirs = if nr & mask == 0 {
                (hi, hi + w)
            } else {
                (lo - w, lo)
            };
            rounds.push(Round {
                ops: vec![
                    Op::Send {
                        peer: real(np),
                        from: span(lo, hi),
                    },
                    Op::Recv {
                        peer: real(np),
                        into: span(theirs.0, theirs.1),
                        apply: Apply::Copy,
                    },
                ],
            });
            (lo, hi) = (lo.min(theirs.0), hi.max(theirs.1));
        }
        debug_assert_eq!((lo, hi), (0, p));
    }
    fold.unfold(rank, count, &mut rounds);
    Schedule { rounds }
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    fn floor_log2(n: usize) -> usize {
        (usize::BITS - 1 - n.leading_zeros()) as usize
    }

    #[test]
    fn rabenseifner_reduces_each_contribution_once() {
        for n in 1..=17usize {
            for count in [0, 1, n.saturating_sub(1), n + 1, 97, 300] {
                let scheds: Vec<_> = (0..n).map(|r| rabenseifner(r, n, count)).collect();
                for s in &scheds {
                    s.check_disjoint().unwrap();
                    super::super::tree::assert_one_message_per_link(s);
                }
                let outs = sim::run(&scheds, vec![vec![]; n], sim::own(n, count));
                let all: Vec<usize> = (0..n).collect();
                for (r, o) in outs.iter().enumerate() {
                    for (i, v) in o.iter().enumerate() {
                        assert_eq!(v, &all, "n={n} count={count} rank={r} elem={i}");
                    }
                }
            }
        }
    }

    /// Rank with new rank `nr` ends the halving owning block `bitrev(nr)`
    /// (bit k of `nr` picks the half in step k, from the top of the block
    /// index down), and while doubling sends the aligned windows of 1, 2, ...,
    /// p/2 blocks around that block.
    fn expected_sent(nr: usize, p: usize, count: usize) -> usize {
        let bits = floor_log2(p);
        let own = (0..bits).fold(0, |b, k| b | ((nr >> k) & 1) << (bits - 1 - k));
        let bl = chunks(count, p);
        let len = |lo: usize, hi: usize| bl[lo..hi].iter().map(|r| r.len()).sum::<usize>();
        let halving = count - bl[own].len();
        let doubling: usize = (0..bits)
            .map(|k| {
                let w = 1 << k;
                let lo = own / w * w;
                len(lo, lo + w)
            })
            .sum();
        halving + doubling
    }

    #[test]
    fn rabenseifner_bytes_and_steps() {
        for n in (1..=64usize).chain([96, 100, 127, 128, 129, 255, 256, 1000, 1023, 1024]) {
            let p = 1 << floor_log2(n);
            let rem = n - p;
            let lg = floor_log2(n);
            let sample: Vec<usize> = if n <= 64 {
                (0..n).collect()
            } else {
                vec![0, 1, 2, 3, n / 2, n - 2, n - 1]
            };
            for count in [0, 1, n - 1, n + 1, 97, 1000, 4 * n, 12345] {
                for &r in &sample {
                    let s = rabenseifner(r, n, count);
                    s.check_disjoint().unwrap();
                    let (steps, sent) = (s.rounds.len(), s.elements_sent());
                    if r < 2 * rem && r % 2 == 0 {
                        assert_eq!(steps, 2, "n={n} r={r}");
                        assert_eq!(sent, count);
                        continue;
                    }
                    let fold = usize::from(r < 2 * rem);
                    assert_eq!(steps, 2 * lg + 2 * fold, "n={n} r={r}");
                    let nr = if r < 2 * rem { r / 2 } else { r - rem };
                    assert_eq!(sent, expected_sent(nr, p, count) + fold * count);
                    if rem == 0 {
                        // 2 (N-1)/N count: exactly when N divides count, and
                        // within N elements otherwise (block sizes differ by one).
                        let ideal = 2.0 * (n as f64 - 1.0) / n as f64 * count as f64;
                        if count % n == 0 {
                            assert_eq!(sent, 2 * (n - 1) * (count / n), "n={n} count={count}");
                        }
                        assert!(
                            (sent as f64 - ideal).abs() <= n as f64,
                            "n={n} count={count}"
                        );
                    }
                }
            }
        }
    }
}
