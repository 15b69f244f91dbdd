//! Broadcast: a binomial tree for small buffers (log2 N hops), a pipelined
//! chain for large ones (each rank forwards segment k while receiving k+1,
//! so the time is about one buffer transfer plus N-2 segment hops).

use super::{segments, Apply, Op, Region, Round, Schedule};

/// Binomial-tree broadcast of `count` output elements from `root`.
///
/// ```
/// assert_eq!(kolo::algo::broadcast::binomial(0, 8, 0, 10).messages_sent(), 3);
/// ```
pub fn binomial(rank: usize, size: usize, root: usize, count: usize) -> Schedule {
    let v = (rank + size - root) % size;
    let real = |x: usize| (x + root) % size;
    let all = Region::out(0..count);
    let mut rounds = Vec::new();
    let mut mask = 1;
    while mask < size {
        if v < mask {
            if v + mask < size {
                rounds.push(Round {
                    ops: vec![Op::Send {
                        peer: real(v + mask),
                        from: all,
                    }],
                });
            }
        } else if v < 2 * mask {
            rounds.push(Round {
                ops: vec![Op::Recv {
                    peer: real(v - mask),
                    into: all,
                    apply: Apply::Copy,
                }],
            });
        }
        mask <<= 1;
    }
    Schedule { rounds }
}

/// Pipelined chain broadcast in segments of `seg` elements.
///
/// ```
/// let s = kolo::algo::broadcast::chain(1, 3, 0, 10, 4);
/// assert_eq!(s.messages_sent(), 3); // forwards all three segments
/// ```
pub fn chain(rank: usize, size: usize, root: usize, count: usize, seg: usize) -> Schedule {
    let v = (rank + size - root) % size;
    let real = |x: usize| (x + root) % size;
    let segs = segments(count, seg);
    let mut rounds = Vec::new();
    let recv = |s: &std::ops::Range<usize>| Op::Recv {
        peer: real(v - 1),
        into: Region::out(s.clone()),
        apply: Apply::Copy,
    };
    let send = |s: &std::ops::Range<usize>| Op::Send {
        peer: real(v + 1),
        from: Region::out(s.clone()),
    };
    let has_next = v + 1 < size;
    for i in 0..=segs.len() {
        let mut ops = Vec::new();
        if v > 0 && i < segs.len() {
            ops.push(recv(&segs[i]));
        }
        if has_next {
            // The root sends segment i in round i; others forward the previous one.
            let j = if v == 0 { Some(i) } else { i.checked_sub(1) };
            if let Some(j) = j.filter(|&j| j < segs.len()) {
                ops.push(send(&segs[j]));
            }
        }
        if !ops.is_empty() {
            rounds.push(Round { ops });
        }
    }
    Schedule { rounds }
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn both_deliver_the_root_buffer() {
        for n in 1..=17 {
            for root in [0, n / 2, n - 1] {
                for count in [0, 1, 9, 40] {
                    for scheds in [
                        (0..n)
                            .map(|r| binomial(r, n, root, count))
                            .collect::<Vec<_>>(),
                        (0..n).map(|r| chain(r, n, root, count, 4)).collect(),
                    ] {
                        scheds.iter().for_each(|s| s.check_disjoint().unwrap());
                        let outs: Vec<Vec<sim::Val>> =
                            (0..n).map(|r| vec![vec![r]; count]).collect();
                        let outs = sim::run(&scheds, vec![vec![]; n], outs);
                        for o in &outs {
                            assert!(o.iter().all(|v| v == &vec![root]), "n={n} root={root}");
                        }
                    }
                }
            }
        }
    }
}
