//! Collective algorithms as schedules: plain data computed from (rank, size,
//! counts, segment size). No sockets here; [`crate::exec`] runs a schedule over
//! the transport, and tests and simulators can inspect it without any network.
//!
//! A [`Schedule`] is a list of [`Round`]s. The operations of one round run
//! concurrently (a ring step sends to the right while receiving from the left);
//! a round ends when all of them are complete. Messages between two ranks are
//! matched in order, so each rank's schedule only has to agree with its peers
//! on the sequence and sizes of messages on every link.

pub mod alltoall;
pub mod broadcast;
pub mod cost;
pub mod direct;
pub mod doubling;
pub mod halving;
pub mod ring;
pub mod tree;

use std::ops::Range;

/// Which caller buffer a [`Region`] lives in. In-place collectives use only `Output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    /// The read-only send buffer (allgather, alltoall).
    Input,
    /// The buffer that holds the result (and the data, for in-place collectives).
    Output,
    /// Temporary space the executor allocates ([`Schedule::scratch_len`] elements).
    Scratch,
}

/// A range of elements in one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    /// The buffer.
    pub buf: Buf,
    /// First element.
    pub start: usize,
    /// Number of elements.
    pub len: usize,
}

impl Region {
    /// A region of the output buffer.
    pub fn out(r: Range<usize>) -> Region {
        Region {
            buf: Buf::Output,
            start: r.start,
            len: r.end - r.start,
        }
    }
    /// A region of the input buffer.
    pub fn inp(r: Range<usize>) -> Region {
        Region {
            buf: Buf::Input,
            start: r.start,
            len: r.end - r.start,
        }
    }
    /// The element range.
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
    fn overlaps(&self, o: &Region) -> bool {
        self.buf == o.buf && self.start < o.start + o.len && o.start < self.start + self.len
    }
}

/// What a receive does with the incoming elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Apply {
    /// Store them.
    Copy,
    /// Combine them with what is there: `incoming_first` picks the operand
    /// order, so both partners of an exchange compute `op(lower, higher)` and
    /// get the same bits.
    Reduce {
        /// Compute `incoming (op) local` instead of `local (op) incoming`.
        incoming_first: bool,
    },
}

/// One operation of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Send these elements to `peer` as one message.
    Send {
        /// Destination rank.
        peer: usize,
        /// Elements to send.
        from: Region,
    },
    /// Receive one message of `into.len` elements from `peer`.
    Recv {
        /// Source rank.
        peer: usize,
        /// Where the elements go.
        into: Region,
        /// Store or reduce them.
        apply: Apply,
    },
    /// Local copy, done before the round's transfers start.
    Copy {
        /// Source elements.
        from: Region,
        /// Destination, same length.
        to: Region,
    },
    /// Local reduction `into = into (op) from`, done after the round's transfers
    /// complete (so a buffer being sent is never modified while on the wire).
    Combine {
        /// The other operand (typically scratch holding a peer's data).
        from: Region,
        /// Accumulator, overwritten with the result.
        into: Region,
        /// Compute `from (op) into` instead of `into (op) from`.
        incoming_first: bool,
    },
}

/// Operations that run concurrently.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// The operations, all in flight together.
    pub ops: Vec<Op>,
}

/// A rank's whole part in one collective.
///
/// ```
/// let s = kolo::algo::ring::allreduce(0, 4, 1000);
/// assert_eq!(s.rounds.len(), 2 * 3);
/// assert_eq!(s.elements_sent(), 2 * 3 * 250);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Rounds in order; round k+1 starts when round k is complete.
    pub rounds: Vec<Round>,
}

impl Schedule {
    /// Elements this rank puts on the wire.
    pub fn elements_sent(&self) -> usize {
        self.ops()
            .map(|o| match o {
                Op::Send { from, .. } => from.len,
                _ => 0,
            })
            .sum()
    }
    /// Messages this rank sends (each carries one frame header).
    pub fn messages_sent(&self) -> usize {
        self.ops().filter(|o| matches!(o, Op::Send { .. })).count()
    }
    /// Elements this rank reduces into its buffer.
    pub fn elements_reduced(&self) -> usize {
        self.ops()
            .map(|o| match o {
                Op::Recv {
                    into,
                    apply: Apply::Reduce { .. },
                    ..
                } => into.len,
                _ => 0,
            })
            .sum()
    }
    /// Elements of scratch space the executor must provide.
    pub fn scratch_len(&self) -> usize {
        let end = |r: &Region| {
            if r.buf == Buf::Scratch {
                r.start + r.len
            } else {
                0
            }
        };
        self.ops()
            .map(|o| match o {
                Op::Send { from, .. } => end(from),
                Op::Recv { into, .. } => end(into),
                Op::Copy { from, to } => end(from).max(end(to)),
                Op::Combine { from, into, .. } => end(from).max(end(into)),
            })
            .max()
            .unwrap_or(0)
    }
    /// Every operation in order.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.rounds.iter().flat_map(|r| r.ops.iter())
    }
    /// Checks the invariants the executor relies on: within a round, no region
    /// written (receive or copy target) overlaps any other region of that
    /// round, and at most one message goes to and comes from each peer (two
    /// frames on one connection in the same round would interleave).
    pub fn check_disjoint(&self) -> Result<(), String> {
        for (i, round) in self.rounds.iter().enumerate() {
            let mut to = std::collections::HashSet::new();
            let mut from = std::collections::HashSet::new();
            for op in &round.ops {
                let fresh = match *op {
                    Op::Send { peer, .. } => to.insert(peer),
                    Op::Recv { peer, .. } => from.insert(peer),
                    _ => true,
                };
                if !fresh {
                    return Err(format!("round {i}: two messages on one link: {op:?}"));
                }
            }
            let mut regions: Vec<(Region, bool)> = Vec::new();
            for op in &round.ops {
                match *op {
                    Op::Send { from, .. } => regions.push((from, false)),
                    Op::Recv { into, .. } => regions.push((into, true)),
                    Op::Copy { from, to } => {
                        regions.push((from, false));
                        regions.push((to, true));
                    }
                    // Runs after the transfers, so it cannot race with them.
                    Op::Combine { .. } => {}
                }
            }
            for (a, (ra, wa)) in regions.iter().enumerate() {
                for (rb, wb) in regions.iter().skip(a + 1) {
                    if (*wa || *wb) && ra.len > 0 && rb.len > 0 && ra.overlaps(rb) {
                        return Err(format!("round {i}: {ra:?} overlaps {rb:?}"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where a reduction's final values are formed on one rank: an average is
/// divided there, once, and copies of it travel on (the ranks that receive
/// the final values copy them and divide nothing). See
/// [`Schedule::completions`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completions {
    /// `after[k]`: output regions whose last write is a reduction in round
    /// `k` (a reducing receive or a combine): final after that round.
    pub after: Vec<Vec<Region>>,
    /// Output regions whose last write is neither a reduction nor a
    /// received copy (never written, or a local copy): final at the end.
    pub at_end: Vec<Region>,
}

impl Schedule {
    /// For an allreduce of `count` elements, where this rank forms final
    /// values itself (see [`Completions`]). Follows the last write of every
    /// output element: in a round, local copies come first, then receives,
    /// then combines (the executor's order).
    ///
    /// ```
    /// let s = kolo::algo::ring::allreduce(0, 4, 8);
    /// let c = s.completions(8);
    /// // Rank 0 finishes one block of 2 at the end of the reduce-scatter
    /// // (round 2) and receives the other three.
    /// let mine: usize = c.after.iter().flatten().map(|r| r.len).sum();
    /// assert_eq!((mine, c.after[2].len(), c.at_end.len()), (2, 1, 0));
    /// ```
    pub fn completions(&self, count: usize) -> Completions {
        #[derive(Clone, Copy, PartialEq)]
        enum Last {
            Own,
            Reduced(usize),
            Received,
        }
        // Every write to the output, in the executor's order.
        let mut writes: Vec<(Region, Last)> = Vec::new();
        let mut write = |g: Region, l: Last| {
            if g.buf == Buf::Output && g.len > 0 {
                writes.push((g, l));
            }
        };
        for (k, r) in self.rounds.iter().enumerate() {
            for op in &r.ops {
                if let Op::Copy { to, .. } = *op {
                    write(to, Last::Own);
                }
            }
            for op in &r.ops {
                if let Op::Recv { into, apply, .. } = *op {
                    let l = match apply {
                        Apply::Copy => Last::Received,
                        Apply::Reduce { .. } => Last::Reduced(k),
                    };
                    write(into, l);
                }
            }
            for op in &r.ops {
                if let Op::Combine { into, .. } = *op {
                    write(into, Last::Reduced(k));
                }
            }
        }
        let mut cuts = Vec::with_capacity(2 * writes.len() + 2);
        cuts.extend([0, count]);
        for (g, _) in &writes {
            cuts.push(g.start.min(count));
            cuts.push((g.start + g.len).min(count));
        }
        cuts.sort_unstable();
        cuts.dedup();
        // One state per elementary interval cuts[i]..cuts[i + 1].
        let mut last = vec![Last::Own; cuts.len().saturating_sub(1)];
        for (g, l) in &writes {
            let mut i = cuts.partition_point(|&c| c < g.start);
            while i < last.len() && cuts[i] < g.start + g.len {
                last[i] = *l;
                i += 1;
            }
        }
        let mut out = Completions {
            after: vec![Vec::new(); self.rounds.len()],
            at_end: Vec::new(),
        };
        let push = |list: &mut Vec<Region>, a: usize, b: usize| match list.last_mut() {
            Some(r) if r.start + r.len == a => r.len += b - a,
            _ => list.push(Region::out(a..b)),
        };
        for (i, l) in last.iter().enumerate() {
            let (a, b) = (cuts[i], cuts[i + 1]);
            match *l {
                Last::Reduced(k) => push(&mut out.after[k], a, b),
                Last::Own => push(&mut out.at_end, a, b),
                Last::Received => {}
            }
        }
        out
    }
}

/// Split `count` elements into `n` contiguous chunks whose sizes differ by at
/// most one (the first `count % n` get the extra element).
///
/// ```
/// assert_eq!(kolo::algo::chunks(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
/// ```
pub fn chunks(count: usize, n: usize) -> Vec<Range<usize>> {
    let (base, extra) = (count / n, count % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Offsets of consecutive blocks with the given sizes.
pub fn blocks(counts: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    counts
        .iter()
        .map(|&c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}

/// Split `len` elements into pieces of at most `seg` elements (at least one
/// piece, possibly empty, so that a zero-length collective still exchanges a
/// header and mismatches are caught).
pub fn segments(len: usize, seg: usize) -> Vec<Range<usize>> {
    let seg = seg.max(1);
    if len == 0 {
        #[allow(clippy::single_range_in_vec_init)]
        return vec![0..0];
    }
    (0..len.div_ceil(seg))
        .map(|i| i * seg..((i + 1) * seg).min(len))
        .collect()
}

#[cfg(test)]
pub(crate) mod sim {
    //! A serial simulator of schedules: moves and reduces symbolic
    //! contributions so tests can check every element is reduced exactly once
    //! per rank, for every world size, without sockets.
    use super::*;
    use std::collections::VecDeque;

    /// Each element is a sorted multiset of contributing ranks.
    pub type Val = Vec<usize>;

    /// Run per-rank schedules to completion, round by round, matching messages
    /// per link in FIFO order. Returns each rank's final output buffer.
    pub fn run(
        scheds: &[Schedule],
        inputs: Vec<Vec<Val>>,
        outputs: Vec<Vec<Val>>,
    ) -> Vec<Vec<Val>> {
        run_marked(scheds, inputs, outputs, None)
    }

    /// Marks an element as divided (an average finished).
    pub const DIVIDED: usize = usize::MAX;

    /// [`run`], adding [`DIVIDED`] to the elements of each rank's
    /// [`Completions`] where the executor would divide them.
    pub fn run_marked(
        scheds: &[Schedule],
        inputs: Vec<Vec<Val>>,
        outputs: Vec<Vec<Val>>,
        marks: Option<&[Completions]>,
    ) -> Vec<Vec<Val>> {
        let n = scheds.len();
        let mark = |out: &mut Vec<Val>, regions: &[Region]| {
            for g in regions {
                for d in &mut out[g.range()] {
                    d.push(DIVIDED);
                }
            }
        };
        let mut outs = outputs;
        let mut scratch: Vec<Vec<Val>> = scheds
            .iter()
            .map(|s| vec![Vec::new(); s.scratch_len()])
            .collect();
        let get = |b: Buf,
                   r: usize,
                   rg: std::ops::Range<usize>,
                   outs: &Vec<Vec<Val>>,
                   scratch: &Vec<Vec<Val>>|
         -> Vec<Val> {
            match b {
                Buf::Input => inputs[r][rg].to_vec(),
                Buf::Output => outs[r][rg].to_vec(),
                Buf::Scratch => scratch[r][rg].to_vec(),
            }
        };
        let mut links: Vec<VecDeque<Vec<Val>>> = vec![VecDeque::new(); n * n];
        let mut pos = vec![0usize; n]; // next round per rank
        let mut sent = vec![false; n]; // whether this round's sends/copies were posted
        loop {
            let mut progressed = false;
            for r in 0..n {
                if pos[r] == scheds[r].rounds.len() {
                    continue;
                }
                let round = &scheds[r].rounds[pos[r]];
                if !sent[r] {
                    for op in &round.ops {
                        match *op {
                            Op::Copy { from, to } => {
                                let v = get(from.buf, r, from.range(), &outs, &scratch);
                                match to.buf {
                                    Buf::Output => outs[r][to.range()].clone_from_slice(&v),
                                    Buf::Scratch => scratch[r][to.range()].clone_from_slice(&v),
                                    Buf::Input => panic!("write to input"),
                                }
                            }
                            Op::Send { peer, from } => {
                                let v = get(from.buf, r, from.range(), &outs, &scratch);
                                links[r * n + peer].push_back(v);
                            }
                            Op::Recv { .. } | Op::Combine { .. } => {}
                        }
                    }
                    sent[r] = true;
                    progressed = true;
                }
                // A round completes when every receive has a message waiting.
                let ready = round.ops.iter().all(|op| match *op {
                    Op::Recv { peer, .. } => {
                        let need = round
                            .ops
                            .iter()
                            .filter(|o| matches!(o, Op::Recv { peer: p, .. } if *p == peer))
                            .count();
                        links[peer * n + r].len() >= need
                    }
                    _ => true,
                });
                if ready {
                    for op in &round.ops {
                        if let Op::Recv { peer, into, apply } = *op {
                            let msg = links[peer * n + r].pop_front().unwrap();
                            assert_eq!(msg.len(), into.len, "rank {r} from {peer}: length");
                            let dst = match into.buf {
                                Buf::Output => &mut outs[r],
                                Buf::Scratch => &mut scratch[r],
                                Buf::Input => panic!("receive into input"),
                            };
                            for (d, s) in dst[into.range()].iter_mut().zip(msg) {
                                match apply {
                                    Apply::Copy => *d = s,
                                    Apply::Reduce { .. } => {
                                        d.extend(s);
                                        d.sort_unstable();
                                    }
                                }
                            }
                        }
                    }
                    for op in &round.ops {
                        if let Op::Combine { from, into, .. } = *op {
                            let v = get(from.buf, r, from.range(), &outs, &scratch);
                            assert_eq!(into.buf, Buf::Output);
                            for (d, s) in outs[r][into.range()].iter_mut().zip(v) {
                                d.extend(s);
                                d.sort_unstable();
                            }
                        }
                    }
                    if let Some(m) = marks {
                        mark(&mut outs[r], &m[r].after[pos[r]]);
                    }
                    pos[r] += 1;
                    sent[r] = false;
                    progressed = true;
                }
            }
            if pos.iter().zip(scheds).all(|(p, s)| *p == s.rounds.len()) {
                assert!(links.iter().all(|l| l.is_empty()), "messages left over");
                if let Some(m) = marks {
                    for (r, out) in outs.iter_mut().enumerate() {
                        mark(out, &m[r].at_end);
                    }
                }
                return outs;
            }
            assert!(progressed, "schedules deadlock at rounds {pos:?}");
        }
    }

    /// Input where rank r's element i is the singleton {r}.
    pub fn own(n: usize, count: usize) -> Vec<Vec<Val>> {
        (0..n).map(|r| vec![vec![r]; count]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dividing an average where [`Schedule::completions`] says leaves every
    /// element of every rank divided exactly once, after all contributions:
    /// the final values are divided where they form and only copied on.
    #[test]
    fn completions_divide_every_element_once_after_the_whole_sum() {
        use cost::Algo;
        for algo in [Algo::Ring, Algo::Tree, Algo::Rhd, Algo::Rd, Algo::Binomial] {
            for n in 1..=9 {
                for count in [0, 1, 2, 7, 100, 1001] {
                    for seg in [1, 5, 64] {
                        let scheds: Vec<Schedule> = (0..n)
                            .map(|r| cost::allreduce_schedule(algo, r, n, count, seg))
                            .chain((0..n).map(|r| ring::allreduce_sliced(r, n, count, seg * n)))
                            .collect();
                        for s in scheds.chunks(n) {
                            let marks: Vec<Completions> =
                                s.iter().map(|s| s.completions(count)).collect();
                            let outs = sim::run_marked(
                                s,
                                sim::own(n, 0),
                                sim::own(n, count),
                                Some(&marks),
                            );
                            let want: Vec<usize> =
                                (0..n).chain(std::iter::once(sim::DIVIDED)).collect();
                            for (r, out) in outs.iter().enumerate() {
                                for (i, v) in out.iter().enumerate() {
                                    assert_eq!(
                                        v, &want,
                                        "{algo:?} n={n} count={count} seg={seg} rank {r} elem {i}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_cover_exactly() {
        for count in [0, 1, 5, 17, 1000] {
            for n in 1..20 {
                let c = chunks(count, n);
                assert_eq!(c.len(), n);
                assert_eq!(c.last().unwrap().end, count);
                for w in c.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
        assert_eq!(segments(0, 4).len(), 1);
        assert!(segments(0, 4)[0].is_empty());
        assert_eq!(segments(9, 4), vec![0..4, 4..8, 8..9]);
    }
}
