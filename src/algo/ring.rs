//! Ring algorithms: bandwidth-optimal, 2(N-1) latency steps for allreduce.
//! Each rank sends only to its right neighbour and receives only from its
//! left one, so every link carries the same load in both directions.

use super::{blocks, chunks, Apply, Op, Region, Round, Schedule};

fn right(rank: usize, size: usize) -> usize {
    (rank + 1) % size
}
fn left(rank: usize, size: usize) -> usize {
    (rank + size - 1) % size
}

/// Ring allreduce in place on `count` elements of the output buffer:
/// a reduce-scatter (N-1 rounds) then an allgather (N-1 rounds). Each rank
/// sends 2(N-1)/N of the buffer. Chunk `c` is reduced in a fixed order and
/// then copied around, so every rank ends with the same bits.
///
/// ```
/// let s = kolo::algo::ring::allreduce(1, 3, 9);
/// assert_eq!(s.elements_sent(), 2 * 2 * 3);
/// ```
pub fn allreduce(rank: usize, size: usize, count: usize) -> Schedule {
    let ch = chunks(count, size);
    let (r, n) = (rank, size);
    let (to, from) = (right(r, n), left(r, n));
    let mut rounds = Vec::with_capacity(2 * (n - 1));
    for k in 0..n - 1 {
        rounds.push(Round {
            ops: vec![
                Op::Send {
                    peer: to,
                    from: Region::out(ch[(r + n - k) % n].clone()),
                },
                Op::Recv {
                    peer: from,
                    into: Region::out(ch[(r + 2 * n - k - 1) % n].clone()),
                    apply: Apply::Reduce {
                        incoming_first: false,
                    },
                },
            ],
        });
    }
    for k in 0..n - 1 {
        rounds.push(Round {
            ops: vec![
                Op::Send {
                    peer: to,
                    from: Region::out(ch[(r + 1 + n - k) % n].clone()),
                },
                Op::Recv {
                    peer: from,
                    into: Region::out(ch[(r + n - k) % n].clone()),
                    apply: Apply::Copy,
                },
            ],
        });
    }
    Schedule { rounds }
}

/// Ring allreduce run slice by slice over `count` elements, `slice` elements at
/// a time: the chunk a rank has just reduced is sent on while it is still in
/// cache, instead of being read back from memory after the whole
/// reduce-scatter. Same bytes on the wire as [`allreduce`], 2(N-1) rounds per slice.
///
/// ```
/// let s = kolo::algo::ring::allreduce_sliced(0, 2, 100, 40);
/// assert_eq!(s.rounds.len(), 3 * 2);
/// assert_eq!(s.elements_sent(), 100);
/// ```
pub fn allreduce_sliced(rank: usize, size: usize, count: usize, slice: usize) -> Schedule {
    let slice = slice.max(size).max(1);
    if count <= slice {
        return allreduce(rank, size, count);
    }
    let mut rounds = Vec::new();
    let mut start = 0;
    while start < count {
        let len = slice.min(count - start);
        for mut round in allreduce(rank, size, len).rounds {
            for op in &mut round.ops {
                match op {
                    Op::Send { from, .. } => from.start += start,
                    Op::Recv { into, .. } => into.start += start,
                    _ => unreachable!("the ring has only sends and receives"),
                }
            }
            rounds.push(round);
        }
        start += len;
    }
    Schedule { rounds }
}

/// Elements per slice for [`allreduce_sliced`] on `size` ranks: each rank's
/// chunk of a slice is `slice_bytes / 2` (so 2 ranks use `slice_bytes`), and
/// the slice grows with the ring. A fixed slice would make every slice pay the
/// ring's 2(N-1) latency steps on chunks that shrink as N grows.
///
/// ```
/// use kolo::algo::ring::slice_len;
/// assert_eq!(slice_len(512 << 10, 2, 4), 131072);
/// assert_eq!(slice_len(512 << 10, 64, 4), 131072 * 32);
/// ```
pub fn slice_len(slice_bytes: usize, size: usize, elem: usize) -> usize {
    (slice_bytes / elem.max(1)).max(1) * (size / 2).max(1)
}

/// Ring reduce-scatter in place on `size * per_rank` elements of the output
/// buffer; afterwards block `rank` holds the reduction of every rank's block.
///
/// ```
/// let s = kolo::algo::ring::reduce_scatter(0, 4, 10);
/// assert_eq!(s.elements_sent(), 3 * 10);
/// ```
pub fn reduce_scatter(rank: usize, size: usize, per_rank: usize) -> Schedule {
    let bl = blocks(&vec![per_rank; size]);
    let (r, n) = (rank, size);
    let rounds = (0..n - 1)
        .map(|k| Round {
            ops: vec![
                Op::Send {
                    peer: right(r, n),
                    from: Region::out(bl[(r + 2 * n - k - 1) % n].clone()),
                },
                Op::Recv {
                    peer: left(r, n),
                    into: Region::out(bl[(r + 2 * n - k - 2) % n].clone()),
                    apply: Apply::Reduce {
                        incoming_first: false,
                    },
                },
            ],
        })
        .collect();
    Schedule { rounds }
}

/// Ring allgather with per-rank counts: copies the input into block `rank` of
/// the output, then passes blocks around the ring for N-1 rounds.
///
/// ```
/// let s = kolo::algo::ring::allgatherv(0, 3, &[1, 2, 3]);
/// assert_eq!(s.elements_sent(), 1 + 3); // own block, then the left neighbour's
/// ```
pub fn allgatherv(rank: usize, size: usize, counts: &[usize]) -> Schedule {
    let bl = blocks(counts);
    let (r, n) = (rank, size);
    let mut rounds = vec![Round {
        ops: vec![Op::Copy {
            from: Region::inp(0..counts[r]),
            to: Region::out(bl[r].clone()),
        }],
    }];
    for k in 0..n - 1 {
        rounds.push(Round {
            ops: vec![
                Op::Send {
                    peer: right(r, n),
                    from: Region::out(bl[(r + n - k) % n].clone()),
                },
                Op::Recv {
                    peer: left(r, n),
                    into: Region::out(bl[(r + 2 * n - k - 1) % n].clone()),
                    apply: Apply::Copy,
                },
            ],
        });
    }
    Schedule { rounds }
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn allreduce_reduces_each_contribution_once_and_sends_the_optimal_bytes() {
        for n in 1..=64usize {
            for count in [0, 1, n.saturating_sub(1), n, n + 1, 97, 1000] {
                let scheds: Vec<_> = (0..n).map(|r| allreduce(r, n, count)).collect();
                for s in &scheds {
                    s.check_disjoint().unwrap();
                    assert_eq!(s.rounds.len(), 2 * (n - 1));
                    // 2(N-1)/N * count, up to one element of rounding per chunk sent.
                    let ideal = 2.0 * (n as f64 - 1.0) / n as f64 * count as f64;
                    let sent = s.elements_sent() as f64;
                    assert!(
                        (sent - ideal).abs() <= 2.0 * (n as f64 - 1.0),
                        "n={n} count={count} sent={sent} ideal={ideal}"
                    );
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

    #[test]
    fn sliced_allreduce_matches_the_plain_ring() {
        for n in [1usize, 2, 3, 5, 8] {
            for (count, slice) in [(0, 4), (7, 4), (100, 16), (101, 33), (64, 64)] {
                let scheds: Vec<_> = (0..n)
                    .map(|r| allreduce_sliced(r, n, count, slice))
                    .collect();
                for (r, s) in scheds.iter().enumerate() {
                    s.check_disjoint().unwrap();
                    assert_eq!(s.elements_sent(), {
                        let mut left = count;
                        let mut total = 0;
                        let sl = slice.max(n);
                        if count <= sl {
                            allreduce(r, n, count).elements_sent()
                        } else {
                            while left > 0 {
                                let len = sl.min(left);
                                total += allreduce(r, n, len).elements_sent();
                                left -= len;
                            }
                            total
                        }
                    });
                }
                let outs = sim::run(&scheds, vec![vec![]; n], sim::own(n, count));
                let all: Vec<usize> = (0..n).collect();
                assert!(
                    outs.iter().all(|o| o.iter().all(|v| v == &all)),
                    "n={n} count={count}"
                );
            }
        }
    }

    #[test]
    fn reduce_scatter_leaves_own_block_reduced() {
        for n in 1..=17 {
            for per in [0, 1, 3, 10] {
                let scheds: Vec<_> = (0..n).map(|r| reduce_scatter(r, n, per)).collect();
                scheds.iter().for_each(|s| s.check_disjoint().unwrap());
                let outs = sim::run(&scheds, vec![vec![]; n], sim::own(n, n * per));
                let all: Vec<usize> = (0..n).collect();
                for (r, o) in outs.iter().enumerate() {
                    for v in &o[r * per..(r + 1) * per] {
                        assert_eq!(v, &all);
                    }
                }
            }
        }
    }

    #[test]
    fn allgatherv_gathers_every_block() {
        for n in 1..=17 {
            let counts: Vec<usize> = (0..n).map(|i| (i * 7) % 5).collect();
            let total: usize = counts.iter().sum();
            let scheds: Vec<_> = (0..n).map(|r| allgatherv(r, n, &counts)).collect();
            scheds.iter().for_each(|s| s.check_disjoint().unwrap());
            let inputs = (0..n).map(|r| vec![vec![r]; counts[r]]).collect();
            let outs = sim::run(&scheds, inputs, vec![vec![vec![]; total]; n]);
            let bl = blocks(&counts);
            for o in &outs {
                for (src, b) in bl.iter().enumerate() {
                    assert!(o[b.clone()].iter().all(|v| v == &vec![src]));
                }
            }
        }
    }
}
