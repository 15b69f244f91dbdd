//! Tree allreduce: a pipelined double binary tree (NCCL's construction) for
//! medium and large messages at large scale, and a binomial tree for tiny ones.
//!
//! # Bitwise determinism
//!
//! Both algorithms reduce every element along a tree to its root, in an order
//! fixed by the schedule (never by arrival timing), compute the final value
//! exactly once at the root, and then only copy it down. Every rank therefore
//! ends with the root's bits. Partial results are also computed exactly once,
//! at the interior node that owns them.

use super::broadcast;
use super::{chunks, segments, Apply, Buf, Op, Region, Round, Schedule};
use std::ops::Range;

/// Children of `rank` in NCCL's in-order binary tree over `0..n` rooted at 0
/// (`ncclGetBtree`): the root has one child, the largest power of two below
/// `n`; a rank whose lowest set bit is `b` has children `rank - b/2` and the
/// first of `rank + b/2, rank + b/4, ...` that exists. Odd ranks are leaves.
fn btree_children(n: usize, rank: usize) -> [Option<usize>; 2] {
    if n <= 1 {
        return [None, None];
    }
    if rank == 0 {
        // Largest power of two strictly below n.
        let top = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
        return [Some(top), None];
    }
    let low = rank & rank.wrapping_neg();
    let mut step = low >> 1;
    if step == 0 {
        return [None, None];
    }
    let left = rank - step;
    while step > 0 && rank + step >= n {
        step >>= 1;
    }
    [Some(left), (step > 0).then_some(rank + step)]
}

/// One binary tree over all ranks, with what the pipelined schedule needs.
#[derive(Debug, Clone)]
struct Tree {
    root: usize,
    parent: Vec<Option<usize>>,
    children: Vec<Vec<usize>>,
    /// Height of the subtree under each rank (leaves are 0).
    height: Vec<usize>,
    /// Distance from the root.
    depth: Vec<usize>,
}

impl Tree {
    fn from_children(n: usize, children: Vec<Vec<usize>>) -> Tree {
        let mut parent = vec![None; n];
        for (v, cs) in children.iter().enumerate() {
            for &c in cs {
                assert!(parent[c].is_none(), "rank {c} has two parents");
                parent[c] = Some(v);
            }
        }
        let roots: Vec<usize> = (0..n).filter(|&v| parent[v].is_none()).collect();
        assert_eq!(roots.len(), 1, "a tree has one root");
        let root = roots[0];
        // Breadth-first order from the root gives depths; reversed, heights.
        let mut order = vec![root];
        let mut depth = vec![0; n];
        let mut i = 0;
        while i < order.len() {
            let v = order[i];
            for &c in &children[v] {
                depth[c] = depth[v] + 1;
                order.push(c);
            }
            i += 1;
        }
        assert_eq!(order.len(), n, "every rank is in the tree");
        let mut height = vec![0; n];
        for &v in order.iter().rev() {
            height[v] = children[v]
                .iter()
                .map(|&c| height[c] + 1)
                .max()
                .unwrap_or(0);
        }
        Tree {
            root,
            parent,
            children,
            height,
            depth,
        }
    }
}

/// NCCL's double binary tree (`ncclGetDtree`): tree 0 is the in-order binary
/// tree rooted at 0; tree 1 is its mirror `r -> n-1-r` when `n` is even and
/// its shift `r -> r+1 (mod n)` when `n` is odd. Tree 0's interior ranks are
/// the even ones; either map sends them to odd ranks, so each rank is interior
/// in at most one tree, except, for odd `n`, rank 0, which is root of tree 0
/// (one child) and interior in tree 1.
fn double_tree(n: usize) -> [Tree; 2] {
    let kids = |cs: [Option<usize>; 2]| cs.into_iter().flatten().collect::<Vec<_>>();
    let t0 = (0..n).map(|r| kids(btree_children(n, r))).collect();
    let t1 = (0..n)
        .map(|r| {
            if n % 2 == 0 {
                kids(btree_children(n, n - 1 - r).map(|c| c.map(|c| n - 1 - c)))
            } else {
                kids(btree_children(n, (r + n - 1) % n).map(|c| c.map(|c| (c + 1) % n)))
            }
        })
        .collect();
    [Tree::from_children(n, t0), Tree::from_children(n, t1)]
}

/// The operations of `rank` in global step `t` of the pipelined
/// reduce-then-broadcast of `segs` over `tree`; `slot` is this tree's scratch
/// space for a second child's segment.
///
/// Timing (H = root height, h/d = this rank's height/depth, S segments):
/// a rank sends segment s up in step h+s (so it has heard from all children,
/// which sent it by step h-1+s), the root starts broadcasting segment s in
/// step H+s, and a rank at depth d receives segment s in step H+d-1+s and
/// forwards it in step H+d+s. The segment received from the parent (index
/// at most t-h-1) never collides with the one sent up (t-h) or those received
/// from children (at least t-h+1), since H >= h+d.
fn tree_step(
    tree: &Tree,
    rank: usize,
    t: usize,
    segs: &[Range<usize>],
    slot: usize,
    ops: &mut Vec<Op>,
) {
    let nseg = segs.len();
    let at = |start: usize| t.checked_sub(start).filter(|&s| s < nseg);
    let (h, d, top) = (tree.height[rank], tree.depth[rank], tree.height[tree.root]);
    let kids = &tree.children[rank];
    // Reduce phase: children's partial results, in child order.
    for (i, &c) in kids.iter().enumerate() {
        let Some(s) = at(tree.height[c]) else {
            continue;
        };
        let seg = Region::out(segs[s].clone());
        // Children of equal height deliver the same segment in the same step:
        // the second one goes through scratch and is combined after the
        // transfers, so child 0's data is always applied first.
        let same_step = i == 1 && tree.height[kids[0]] == tree.height[c];
        if same_step {
            let tmp = Region {
                buf: Buf::Scratch,
                start: slot,
                len: seg.len,
            };
            ops.push(Op::Recv {
                peer: c,
                into: tmp,
                apply: Apply::Copy,
            });
            ops.push(Op::Combine {
                from: tmp,
                into: seg,
                incoming_first: c < rank,
            });
        } else {
            ops.push(Op::Recv {
                peer: c,
                into: seg,
                apply: Apply::Reduce {
                    incoming_first: c < rank,
                },
            });
        }
    }
    if let (Some(p), Some(s)) = (tree.parent[rank], at(h)) {
        ops.push(Op::Send {
            peer: p,
            from: Region::out(segs[s].clone()),
        });
    }
    // Broadcast phase: the root's final values, copied down.
    if let Some(p) = tree.parent[rank] {
        if let Some(s) = at(top + d - 1) {
            ops.push(Op::Recv {
                peer: p,
                into: Region::out(segs[s].clone()),
                apply: Apply::Copy,
            });
        }
    }
    if let Some(s) = at(top + d) {
        for &c in kids {
            ops.push(Op::Send {
                peer: c,
                from: Region::out(segs[s].clone()),
            });
        }
    }
}

/// Whether two op lists use the same link in the same direction (the executor
/// runs one message per link and direction at a time).
fn share_a_link(a: &[Op], b: &[Op]) -> bool {
    let key = |o: &Op| match *o {
        Op::Send { peer, .. } => Some((peer, true)),
        Op::Recv { peer, .. } => Some((peer, false)),
        _ => None,
    };
    a.iter()
        .filter_map(key)
        .any(|k| b.iter().filter_map(key).any(|j| j == k))
}

/// NCCL-style double-binary-tree allreduce in place on `count` output
/// elements, in segments of at most `seg` elements.
///
/// Two complementary binary trees (NCCL's `ncclGetDtree`: tree 1 is tree 0
/// mirrored for even sizes, shifted by one rank for odd sizes) each carry one
/// half of the buffer. Each half is reduced up its tree segment by segment
/// and broadcast back down, fully pipelined: in one round a rank receives
/// segment k+1 from its children while sending segment k to its parent, and
/// the root starts broadcasting segment k as soon as it is complete, so both
/// phases overlap. The two trees run in the same rounds; in the rare step
/// where both would use the same link in the same direction (the trees share
/// an edge, e.g. ranks 1 and 2 of 4), that rank runs the step as two rounds,
/// tree 0 first, on both ends of the link.
///
/// Children's partial results are combined in a fixed order (the first child
/// on arrival, a second child of equal height from scratch after the
/// transfers), the final value is computed once at the root and copied down,
/// so every rank ends with the same bits. Uses `2 * seg` elements of scratch
/// at most. About `2 ⌈log2 N⌉ + count / (2 seg)` rounds.
///
/// ```
/// let s = kolo::algo::tree::double_binary(0, 8, 1000, 100);
/// s.check_disjoint().unwrap();
/// // Rank 0 is the root of tree 0 (one child): it sends its half up nowhere,
/// // down once; in tree 1 it is a leaf: its half up once.
/// assert_eq!(s.elements_sent(), 500 + 500);
/// ```
pub fn double_binary(rank: usize, size: usize, count: usize, seg: usize) -> Schedule {
    if size <= 1 {
        return Schedule::default();
    }
    let trees = double_tree(size);
    let halves = chunks(count, 2);
    let segs: Vec<Vec<Range<usize>>> = halves
        .iter()
        .map(|h| {
            segments(h.len(), seg)
                .into_iter()
                .map(|s| s.start + h.start..s.end + h.start)
                .collect()
        })
        .collect();
    let slot_len = segs[0].iter().map(|s| s.len()).max().unwrap_or(0);
    let steps = (0..2)
        .map(|k| 2 * trees[k].height[trees[k].root] + segs[k].len() - 1)
        .max()
        .unwrap_or(0);
    let mut rounds = Vec::new();
    for t in 0..steps {
        let mut ops = [Vec::new(), Vec::new()];
        for k in 0..2 {
            tree_step(&trees[k], rank, t, &segs[k], k * slot_len, &mut ops[k]);
        }
        let [a, b] = ops;
        if share_a_link(&a, &b) {
            rounds.push(Round { ops: a });
            rounds.push(Round { ops: b });
        } else if !a.is_empty() || !b.is_empty() {
            rounds.push(Round {
                ops: a.into_iter().chain(b).collect(),
            });
        }
    }
    Schedule { rounds }
}

/// Binomial-tree allreduce in place on `count` output elements, whole buffer
/// per message: a binomial reduce to rank 0 (in round k, ranks with bit k set
/// send to `rank - 2^k` and drop out) then a binomial broadcast from rank 0.
/// `2 ⌈log2 N⌉` rounds at rank 0; meant for tiny messages.
///
/// Rank `r` combines the block of ranks `[r, r + 2^k)` with the incoming
/// `[r + 2^k, r + 2^(k+1))` as `op(lower, higher)`; the result is computed
/// once at rank 0 and copied down, so every rank ends with the same bits.
///
/// ```
/// let s = kolo::algo::tree::binomial(0, 8, 4);
/// assert_eq!(s.rounds.len(), 2 * 3);
/// assert_eq!(s.elements_sent(), 3 * 4);
/// ```
pub fn binomial(rank: usize, size: usize, count: usize) -> Schedule {
    let all = Region::out(0..count);
    let mut rounds = Vec::new();
    let mut mask = 1;
    while mask < size {
        if rank & mask != 0 {
            rounds.push(Round {
                ops: vec![Op::Send {
                    peer: rank - mask,
                    from: all,
                }],
            });
            break;
        }
        if rank + mask < size {
            rounds.push(Round {
                ops: vec![Op::Recv {
                    peer: rank + mask,
                    into: all,
                    apply: Apply::Reduce {
                        incoming_first: false,
                    },
                }],
            });
        }
        mask <<= 1;
    }
    rounds.extend(broadcast::binomial(rank, size, 0, count).rounds);
    Schedule { rounds }
}

/// The executor writes one frame per link and direction at a time.
#[cfg(test)]
pub(crate) fn assert_one_message_per_link(s: &Schedule) {
    for (i, round) in s.rounds.iter().enumerate() {
        for (a, x) in round.ops.iter().enumerate() {
            for y in &round.ops[a + 1..] {
                let clash = match (x, y) {
                    (Op::Send { peer: p, .. }, Op::Send { peer: q, .. }) => p == q,
                    (Op::Recv { peer: p, .. }, Op::Recv { peer: q, .. }) => p == q,
                    _ => false,
                };
                assert!(!clash, "round {i}: two messages on one link: {x:?} {y:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    fn ilog2_ceil(n: usize) -> usize {
        n.next_power_of_two().trailing_zeros() as usize
    }

    fn counts(n: usize) -> Vec<usize> {
        vec![0, 1, n.saturating_sub(1), n + 1, 97, 300]
    }

    fn check_allreduce(scheds: &[Schedule], n: usize, count: usize, what: &str) {
        for s in scheds {
            s.check_disjoint().unwrap();
            assert_one_message_per_link(s);
        }
        let outs = sim::run(scheds, vec![vec![]; n], sim::own(n, count));
        let all: Vec<usize> = (0..n).collect();
        for (r, o) in outs.iter().enumerate() {
            for (i, v) in o.iter().enumerate() {
                assert_eq!(v, &all, "{what} n={n} count={count} rank={r} elem={i}");
            }
        }
    }

    /// Runs the schedules with zero buffering: a message moves only while
    /// the sender's and the receiver's current rounds both contain it (the
    /// real executor has socket buffers, so this is stricter). Panics if the
    /// ranks get stuck.
    fn assert_rendezvous_completes(scheds: &[Schedule]) {
        let n = scheds.len();
        // (round, op) -> index of the message on its link, per rank.
        let mut seq = vec![vec![0usize; n * n]; 2];
        // Per rank, round and op: (is a send, peer, index on its link).
        type Tag = Option<(bool, usize, usize)>;
        let tagged: Vec<Vec<Vec<Tag>>> = scheds
            .iter()
            .enumerate()
            .map(|(r, s)| {
                s.rounds
                    .iter()
                    .map(|round| {
                        round
                            .ops
                            .iter()
                            .map(|op| match *op {
                                Op::Send { peer, .. } => {
                                    seq[0][r * n + peer] += 1;
                                    Some((true, peer, seq[0][r * n + peer]))
                                }
                                Op::Recv { peer, .. } => {
                                    seq[1][peer * n + r] += 1;
                                    Some((false, peer, seq[1][peer * n + r]))
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let mut pos = vec![0usize; n];
        let mut done: Vec<Vec<bool>> = (0..n)
            .map(|r| tagged[r].first().map_or(vec![], |x| vec![false; x.len()]))
            .collect();
        loop {
            let mut moved = false;
            for r in 0..n {
                if pos[r] == tagged[r].len() {
                    continue;
                }
                for (i, t) in tagged[r][pos[r]].iter().enumerate() {
                    let Some((true, p, k)) = *t else { continue };
                    if done[r][i] || pos[p] == tagged[p].len() {
                        continue;
                    }
                    let want = Some((false, r, k));
                    if let Some(j) = tagged[p][pos[p]].iter().position(|x| *x == want) {
                        assert!(!done[p][j]);
                        done[r][i] = true;
                        done[p][j] = true;
                        moved = true;
                    }
                }
            }
            for r in 0..n {
                while pos[r] < tagged[r].len()
                    && tagged[r][pos[r]]
                        .iter()
                        .zip(&done[r])
                        .all(|(t, d)| t.is_none() || *d)
                {
                    pos[r] += 1;
                    done[r] = tagged[r]
                        .get(pos[r])
                        .map_or(vec![], |x| vec![false; x.len()]);
                    moved = true;
                }
            }
            if (0..n).all(|r| pos[r] == tagged[r].len()) {
                return;
            }
            assert!(moved, "ranks stuck without buffering at rounds {pos:?}");
        }
    }

    #[test]
    #[should_panic(expected = "stuck")]
    fn rendezvous_check_catches_send_send_deadlock() {
        let one = |peer| Schedule {
            rounds: vec![
                Round {
                    ops: vec![Op::Send {
                        peer,
                        from: Region::out(0..1),
                    }],
                },
                Round {
                    ops: vec![Op::Recv {
                        peer,
                        into: Region::out(0..1),
                        apply: Apply::Copy,
                    }],
                },
            ],
        };
        assert_rendezvous_completes(&[one(1), one(0)]);
    }

    #[test]
    fn every_algorithm_completes_without_buffering() {
        for n in 1..=33usize {
            for (count, seg) in [(0, 1), (5, 1), (300, 7), (1000, 64)] {
                assert_rendezvous_completes(
                    &(0..n)
                        .map(|r| double_binary(r, n, count, seg))
                        .collect::<Vec<_>>(),
                );
                assert_rendezvous_completes(
                    &(0..n).map(|r| binomial(r, n, count)).collect::<Vec<_>>(),
                );
                assert_rendezvous_completes(
                    &(0..n)
                        .map(|r| super::super::halving::rabenseifner(r, n, count))
                        .collect::<Vec<_>>(),
                );
            }
        }
    }

    #[test]
    fn btree_matches_nccls_picture() {
        // The 14-rank tree drawn in NCCL's trees.cc.
        let t = &double_tree(14)[0];
        assert_eq!(t.children[0], vec![8]);
        assert_eq!(t.children[8], vec![4, 12]);
        assert_eq!(t.children[12], vec![10, 13]);
        assert_eq!(t.children[10], vec![9, 11]);
        assert_eq!(t.parent[13], Some(12));
        // Its mirror is rooted at 13; the odd-size shift is rooted at 1.
        assert_eq!(double_tree(14)[1].root, 13);
        assert_eq!(double_tree(13)[1].root, 1);
    }

    #[test]
    fn double_tree_is_two_complementary_trees() {
        for n in 1..=1024usize {
            let [a, b] = double_tree(n);
            assert_eq!(a.root, 0);
            let interior = |t: &Tree, v: usize| !t.children[v].is_empty();
            let both: Vec<usize> = (0..n)
                .filter(|&v| interior(&a, v) && interior(&b, v))
                .collect();
            if n % 2 == 0 {
                assert!(both.is_empty(), "n={n}: {both:?}");
            } else if n > 1 {
                assert_eq!(both, vec![0], "n={n}");
            }
            let log = ilog2_ceil(n);
            for t in [&a, &b] {
                assert!(t.children.iter().all(|c| c.len() <= 2));
                assert_eq!(t.children[t.root].len(), usize::from(n > 1));
                assert!(t.height[t.root] <= log, "n={n}");
            }
        }
    }

    #[test]
    fn double_binary_reduces_each_contribution_once() {
        for n in 1..=17usize {
            for count in counts(n) {
                for seg in [1, 7, 64, usize::MAX] {
                    let scheds: Vec<_> = (0..n).map(|r| double_binary(r, n, count, seg)).collect();
                    check_allreduce(&scheds, n, count, &format!("tree seg={seg}"));
                }
            }
        }
    }

    #[test]
    fn double_binary_is_pipelined() {
        // 2H + S - 1 global steps (H = tree height <= ceil(log2 N), S =
        // segments per half); a rank skips the steps where it is idle. A rank
        // on an edge that both trees use (N/4 such edges for even N) runs a
        // step in which both trees send on that link as two rounds: in the
        // steady state that is every step, so those ranks take up to
        // 2 (ceil(log2 N) + S) rounds. Every other rank stays within 2H + S - 1.
        for n in (1..=64).chain([100, 128, 255, 256, 1000, 1024]) {
            for (count, seg) in [(0, 4), (1000, 10), (4096, 64), (777, 1000)] {
                let halves = chunks(count, 2);
                let nseg = segments(halves[0].len(), seg).len();
                let log = ilog2_ceil(n);
                let sample: Vec<usize> = if n <= 64 {
                    (0..n).collect()
                } else {
                    vec![0, 1, 2, n / 2, n - 2, n - 1]
                };
                let [a, b] = double_tree(n);
                let edge =
                    |t: &Tree, x: usize, y: usize| t.parent[x] == Some(y) || t.parent[y] == Some(x);
                for r in sample {
                    let s = double_binary(r, n, count, seg);
                    s.check_disjoint().unwrap();
                    assert_one_message_per_link(&s);
                    let shared = (0..n).any(|v| edge(&a, r, v) && edge(&b, r, v));
                    let rounds = s.rounds.len();
                    if n == 1 {
                        assert_eq!(rounds, 0);
                    } else if shared {
                        assert!(rounds <= 2 * (log + nseg), "n={n} r={r} {rounds}");
                    } else {
                        assert!(rounds < 2 * log + nseg, "n={n} r={r} {rounds}");
                    }
                    // Bytes: each half goes up once (except at its root) and
                    // down once per child.
                    let mut want = 0;
                    for (t, h) in [&a, &b].into_iter().zip(&halves) {
                        want +=
                            h.len() * (usize::from(t.parent[r].is_some()) + t.children[r].len());
                    }
                    assert_eq!(s.elements_sent(), want, "n={n} r={r}");
                }
            }
        }
    }

    #[test]
    fn binomial_reduces_each_contribution_once() {
        for n in 1..=17usize {
            for count in counts(n) {
                let scheds: Vec<_> = (0..n).map(|r| binomial(r, n, count)).collect();
                check_allreduce(&scheds, n, count, "binomial");
            }
        }
    }

    #[test]
    fn binomial_step_count() {
        for n in 1..=1024usize {
            let log = ilog2_ceil(n);
            assert_eq!(binomial(0, n, 8).rounds.len(), 2 * log, "n={n}");
            for r in [1, n / 2, n - 1] {
                if r < n {
                    assert!(binomial(r, n, 8).rounds.len() <= 2 * log);
                }
            }
        }
    }
}
