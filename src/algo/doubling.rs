//! Recursive doubling: log2(N) rounds, each exchanging the whole buffer. Best
//! for small messages where latency, not bandwidth, is the cost. Also the
//! dissemination barrier.

use super::{Apply, Buf, Op, Region, Round, Schedule};

/// Recursive-doubling allreduce in place on `count` output elements. For a
/// world size that is not a power of two, the first `2r` ranks fold in pairs
/// (even into odd) before and get the result back after.
///
/// Both partners of an exchange compute `op(lower group, higher group)`, so
/// every rank ends with the same bits.
///
/// ```
/// let s = kolo::algo::doubling::allreduce(0, 8, 4);
/// assert_eq!(s.rounds.len(), 3);
/// ```
pub fn allreduce(rank: usize, size: usize, count: usize) -> Schedule {
    let all = Region::out(0..count);
    let scratch = Region {
        buf: Buf::Scratch,
        start: 0,
        len: count,
    };
    let mut rounds = Vec::new();
    let fold = Fold::new(rank, size, count, &mut rounds);
    let (p, real) = (fold.p, |nr| fold.real(nr));
    if let Some(nr) = fold.newrank {
        let mut mask = 1;
        while mask < p {
            let np = nr ^ mask;
            let peer = real(np);
            rounds.push(Round {
                ops: vec![
                    Op::Send { peer, from: all },
                    Op::Recv {
                        peer,
                        into: scratch,
                        apply: Apply::Copy,
                    },
                    Op::Combine {
                        from: scratch,
                        into: all,
                        incoming_first: np < nr,
                    },
                ],
            });
            mask <<= 1;
        }
    }
    fold.unfold(rank, count, &mut rounds);
    Schedule { rounds }
}

/// The pairing that lets power-of-two algorithms (recursive doubling,
/// halving-doubling) run on any world size: with `p` the largest power of two
/// `<= size` and `rem = size - p`, each even rank below `2 rem` hands its
/// buffer to the next odd rank (which reduces it, lower rank first) and sits
/// out; the other `p` ranks take virtual ranks `0..p`; at the end each odd
/// rank below `2 rem` returns the result to its even partner.
pub(crate) struct Fold {
    /// The power of two the remaining ranks form.
    pub p: usize,
    rem: usize,
    /// This rank's virtual rank, or `None` when it sat out.
    pub newrank: Option<usize>,
}

impl Fold {
    /// Pushes this rank's fold-in round (if any) onto `rounds`.
    pub(crate) fn new(rank: usize, size: usize, count: usize, rounds: &mut Vec<Round>) -> Fold {
        let p = 1usize << (usize::BITS - 1 - size.leading_zeros());
        let rem = size - p;
        let all = Region::out(0..count);
        let newrank = if rank < 2 * rem {
            if rank % 2 == 0 {
                rounds.push(Round {
                    ops: vec![Op::Send {
                        peer: rank + 1,
                        from: all,
                    }],
                });
                None
            } else {
                rounds.push(Round {
                    ops: vec![Op::Recv {
                        peer: rank - 1,
                        into: all,
                        apply: Apply::Reduce {
                            incoming_first: true,
                        },
                    }],
                });
                Some(rank / 2)
            }
        } else {
            Some(rank - rem)
        };
        Fold { p, rem, newrank }
    }

    /// The real rank of virtual rank `nr`.
    pub(crate) fn real(&self, nr: usize) -> usize {
        if nr < self.rem {
            2 * nr + 1
        } else {
            nr + self.rem
        }
    }

    /// Pushes this rank's unfold round (if any): the result goes back to the
    /// ranks that sat out.
    pub(crate) fn unfold(&self, rank: usize, count: usize, rounds: &mut Vec<Round>) {
        if rank >= 2 * self.rem {
            return;
        }
        let all = Region::out(0..count);
        let op = if rank % 2 == 0 {
            Op::Recv {
                peer: rank + 1,
                into: all,
                apply: Apply::Copy,
            }
        } else {
            Op::Send {
                peer: rank - 1,
                from: all,
            }
        };
        rounds.push(Round { ops: vec![op] });
    }
}

/// Dissemination barrier: in round k every rank signals rank+2^k and waits for
/// rank-2^k; after ceil(log2 N) rounds everyone has (transitively) heard from
/// everyone.
///
/// ```
/// assert_eq!(kolo::algo::doubling::barrier(0, 5).rounds.len(), 3);
/// ```
pub fn barrier(rank: usize, size: usize) -> Schedule {
    let mut rounds = Vec::new();
    let mut dist = 1;
    while dist < size {
        rounds.push(Round {
            ops: vec![
                Op::Send {
                    peer: (rank + dist) % size,
                    from: Region::out(0..0),
                },
                Op::Recv {
                    peer: (rank + size - dist) % size,
                    into: Region::out(0..0),
                    apply: Apply::Copy,
                },
            ],
        });
        dist *= 2;
    }
    Schedule { rounds }
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn allreduce_every_size() {
        for n in 1..=33 {
            for count in [0, 1, 5] {
                let scheds: Vec<_> = (0..n).map(|r| allreduce(r, n, count)).collect();
                let log = (n as f64).log2().floor() as usize;
                for s in &scheds {
                    s.check_disjoint().unwrap();
                    assert!(s.rounds.len() <= log + 2);
                }
                let outs = sim::run(&scheds, vec![vec![]; n], sim::own(n, count));
                let all: Vec<usize> = (0..n).collect();
                for o in &outs {
                    assert!(o.iter().all(|v| v == &all), "n={n}");
                }
            }
        }
    }

    #[test]
    fn barrier_completes() {
        for n in 1..=33 {
            let scheds: Vec<_> = (0..n).map(|r| barrier(r, n)).collect();
            sim::run(&scheds, vec![vec![]; n], vec![vec![]; n]);
        }
    }
}
