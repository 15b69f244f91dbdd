//! Direct exchange: every rank sends its block straight to every other rank
//! in a single round. One latency step instead of the ring's N-1, at the cost
//! of N-1 messages per rank at once, so it suits small blocks and moderate N.
//! Every rank also hears from every other rank in its first step, which lets
//! a rank that sleeps until bytes arrive join at once.

use super::{blocks, Apply, Op, Region, Round, Schedule};

/// Allgather with `counts[i]` elements from rank i, laid out in rank order in
/// the output, in one round.
///
/// ```
/// let s = kolo::algo::direct::allgatherv(0, 4, &[2, 2, 2, 2]);
/// assert_eq!(s.rounds.len(), 2); // the local copy, then one exchange
/// assert_eq!(s.elements_sent(), 3 * 2);
/// ```
pub fn allgatherv(rank: usize, size: usize, counts: &[usize]) -> Schedule {
    let bl = blocks(counts);
    let mut exchange = Vec::with_capacity(2 * size);
    for k in 1..size {
        let to = (rank + k) % size;
        exchange.push(Op::Send {
            peer: to,
            from: Region::inp(0..counts[rank]),
        });
    }
    for k in 1..size {
        let from = (rank + size - k) % size;
        exchange.push(Op::Recv {
            peer: from,
            into: Region::out(bl[from].clone()),
            apply: Apply::Copy,
        });
    }
    Schedule {
        rounds: vec![
            Round {
                ops: vec![Op::Copy {
                    from: Region::inp(0..counts[rank]),
                    to: Region::out(bl[rank].clone()),
                }],
            },
            Round { ops: exchange },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn every_rank_gets_every_block_in_one_exchange() {
        for n in 1..=17usize {
            let counts: Vec<usize> = (0..n).map(|i| (i * 7) % 4).collect();
            let total: usize = counts.iter().sum();
            let scheds: Vec<_> = (0..n).map(|r| allgatherv(r, n, &counts)).collect();
            for s in &scheds {
                s.check_disjoint().unwrap();
            }
            let inputs = (0..n)
                .map(|r| (0..counts[r]).map(|i| vec![r * 100 + i]).collect())
                .collect();
            let outs = sim::run(&scheds, inputs, vec![vec![vec![]; total]; n]);
            let want: Vec<Vec<usize>> = (0..n)
                .flat_map(|r| (0..counts[r]).map(move |i| vec![r * 100 + i]))
                .collect();
            for o in &outs {
                assert_eq!(o, &want);
            }
        }
    }
}
