//! Alltoall by pairwise exchange: in round k rank r sends its block for r+k
//! and receives the block from r-k, so every round is a full-duplex pairing.

use super::{blocks, Apply, Op, Region, Round, Schedule};

/// Alltoall of `per_rank` elements per destination: input block j goes to
/// rank j, and output block j comes from rank j.
///
/// ```
/// let s = kolo::algo::alltoall::pairwise(0, 4, 2);
/// assert_eq!(s.elements_sent(), 3 * 2);
/// ```
pub fn pairwise(rank: usize, size: usize, per_rank: usize) -> Schedule {
    let bl = blocks(&vec![per_rank; size]);
    let (r, n) = (rank, size);
    let mut rounds = vec![Round {
        ops: vec![Op::Copy {
            from: Region::inp(bl[r].clone()),
            to: Region::out(bl[r].clone()),
        }],
    }];
    for k in 1..n {
        let (to, from) = ((r + k) % n, (r + n - k) % n);
        rounds.push(Round {
            ops: vec![
                Op::Send {
                    peer: to,
                    from: Region::inp(bl[to].clone()),
                },
                Op::Recv {
                    peer: from,
                    into: Region::out(bl[from].clone()),
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
    fn every_block_reaches_its_rank() {
        for n in 1..=17 {
            let per = 3;
            let scheds: Vec<_> = (0..n).map(|r| pairwise(r, n, per)).collect();
            // Input element of rank r for destination j is {r * 100 + j}.
            let inputs = (0..n)
                .map(|r| (0..n * per).map(|i| vec![r * 100 + i / per]).collect())
                .collect();
            let outs = sim::run(&scheds, inputs, vec![vec![vec![]; n * per]; n]);
            for (r, o) in outs.iter().enumerate() {
                for (i, v) in o.iter().enumerate() {
                    assert_eq!(v, &vec![(i / per) * 100 + r]);
                }
            }
        }
    }
}
