//! A discrete-event timing simulator for schedules from [`crate::algo`].
//!
//! [`crate::algo::cost::predict`] adds up each rank's own rounds and ignores
//! the time a rank spends waiting for its peers; this module instead executes
//! every rank's schedule against a [`Network`] model and reports when the last
//! rank finishes, so dependency waiting (a tree leaf waiting for the whole
//! pipeline, fold ranks idling in rd/rhd, congestion on a shared NIC) shows.
//!
//! # Model
//!
//! * A rank starts round `k` when round `k - 1` is complete; at round start
//!   it posts all of the round's sends, in schedule order.
//! * A message carries its payload plus a [`HEADER_LEN`]-byte frame header,
//!   like the real transport. Between ranks on the same host
//!   (`host = rank / ranks_per_host`) it uses [`Network::intra`], otherwise
//!   [`Network::inter`]; it takes `latency + wire_bytes / bandwidth`.
//! * Serialisation: every rank has one egress and one ingress queue; a
//!   rank's sends leave one after another (FIFO in post order) and its
//!   incoming messages are taken in one after another (FIFO in order of
//!   arrival of their first byte). A message between hosts must also get
//!   its host's egress NIC and the destination host's ingress NIC, which
//!   all ranks of a host share. A message occupies a queue for
//!   `wire_bytes / bandwidth`; its first byte reaches the receiver `latency`
//!   after it starts leaving.
//! * Sends are eager: a message is transferred (and buffered at the
//!   receiver) even if the receiver has not reached the round whose `Recv`
//!   matches it; it is *consumed* only in that round. Messages on a link are
//!   matched in FIFO order, as in [`crate::exec`].
//! * A `Recv` with [`Apply::Reduce`] reduces the whole message after it has
//!   arrived (and not before its round started), and every `Combine` runs
//!   after the round's transfers; both cost `gamma_s_per_byte` per byte on
//!   the rank's single CPU queue. Copies are free. (The real executor
//!   overlaps reduction with reception segment by segment, so this is
//!   slightly pessimistic for reduce-heavy rounds.)
//! * A round ends when all its sends have left the rank, all its receives
//!   have arrived and been reduced, and its combines are done.
//!
//! # Scale
//!
//! Schedules are never all materialised. The simulator pulls rounds from a
//! [`Source`] one at a time: each rank keeps only its current round's ops
//! plus a cursor. [`AllreduceJob`] generates ring rounds (plain and sliced)
//! in closed form from `(rank, round)` with O(1) state per rank, which is
//! what makes N = 4096 (8190 rounds per rank) cheap; the logarithmic and
//! tree schedules are small (O(log N + count/seg) rounds), so they are built
//! with the real schedule functions when a rank starts and kept in a compact
//! 16-byte-per-op form ([`SimOp`]) until that rank finishes. Link queues are
//! kept in a hash map holding only messages that arrived before their
//! receive was posted, so memory is O(N + messages in flight), not O(N²).
//! Cost is O(total messages · log N) for the event heap.

use crate::algo::cost::Algo;
use crate::algo::{doubling, halving, ring, tree, Apply, Op, Round, Schedule};
use crate::transport::frame::HEADER_LEN;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

/// One kind of network path: a fixed per-message latency and a bandwidth.
///
/// ```
/// use kolo::simulate::Link;
/// let l = Link { latency_s: 1e-6, bytes_per_s: 1e9 };
/// assert!((l.time(1000) - 2e-6).abs() < 1e-15);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Seconds from the first byte leaving to the first byte arriving.
    pub latency_s: f64,
    /// Bytes per second the path (and each NIC queue using it) moves.
    pub bytes_per_s: f64,
}

impl Link {
    /// Time for one message of `bytes` wire bytes on an idle path.
    ///
    /// ```
    /// let l = kolo::simulate::Link { latency_s: 0.5, bytes_per_s: 4.0 };
    /// assert_eq!(l.time(2), 1.0);
    /// ```
    pub fn time(&self, bytes: u64) -> f64 {
        self.latency_s + bytes as f64 / self.bytes_per_s
    }
}

/// The machine the simulator runs schedules on: `ranks_per_host`
/// consecutive ranks share a host (and, for traffic to other hosts, its NIC).
///
/// ```
/// use kolo::simulate::{Link, Network};
/// let net = Network {
///     ranks_per_host: 8,
///     intra: Link { latency_s: 5e-6, bytes_per_s: 50e9 / 8.0 },
///     inter: Link { latency_s: 25e-6, bytes_per_s: 10e9 / 8.0 },
///     gamma_s_per_byte: 1.0 / 8e9,
/// };
/// assert_eq!(net.host(9), 1);
/// assert_eq!(net.link(0, 7), net.intra);
/// assert_eq!(net.link(7, 8), net.inter);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Network {
    /// Ranks per host; host of a rank is `rank / ranks_per_host` (0 means 1).
    pub ranks_per_host: usize,
    /// Path between two ranks of the same host.
    pub intra: Link,
    /// Path between ranks of different hosts.
    pub inter: Link,
    /// Seconds per byte reduced (reducing receives and combines).
    pub gamma_s_per_byte: f64,
}

impl Network {
    /// One rank per host, every pair of ranks connected by `link`.
    ///
    /// ```
    /// use kolo::simulate::{Link, Network};
    /// let l = Link { latency_s: 1e-5, bytes_per_s: 1e9 };
    /// let net = Network::uniform(l, 0.0);
    /// assert_eq!(net.link(0, 5), l);
    /// ```
    pub fn uniform(link: Link, gamma_s_per_byte: f64) -> Network {
        Network {
            ranks_per_host: 1,
            intra: link,
            inter: link,
            gamma_s_per_byte,
        }
    }

    /// The host of `rank`.
    ///
    /// ```
    /// let mut net = kolo::simulate::Network::uniform(
    ///     kolo::simulate::Link { latency_s: 0.0, bytes_per_s: 1.0 }, 0.0);
    /// net.ranks_per_host = 4;
    /// assert_eq!(net.host(3), 0);
    /// assert_eq!(net.host(4), 1);
    /// ```
    pub fn host(&self, rank: usize) -> usize {
        rank / self.ranks_per_host.max(1)
    }

    /// The path from rank `a` to rank `b`.
    ///
    /// ```
    /// use kolo::simulate::{Link, Network};
    /// let mut net = Network::uniform(Link { latency_s: 1.0, bytes_per_s: 1.0 }, 0.0);
    /// net.ranks_per_host = 2;
    /// net.intra.latency_s = 0.1;
    /// assert_eq!(net.link(0, 1).latency_s, 0.1);
    /// assert_eq!(net.link(1, 2).latency_s, 1.0);
    /// ```
    pub fn link(&self, a: usize, b: usize) -> Link {
        if self.host(a) == self.host(b) {
            self.intra
        } else {
            self.inter
        }
    }

    fn check(&self) -> Result<(), String> {
        for (name, l) in [("intra", self.intra), ("inter", self.inter)] {
            if !(l.latency_s.is_finite() && l.latency_s >= 0.0) {
                return Err(format!("{name} latency must be finite and >= 0"));
            }
            if !(l.bytes_per_s.is_finite() && l.bytes_per_s > 0.0) {
                return Err(format!("{name} bandwidth must be finite and > 0"));
            }
        }
        if !(self.gamma_s_per_byte.is_finite() && self.gamma_s_per_byte >= 0.0) {
            return Err("gamma must be finite and >= 0".into());
        }
        Ok(())
    }
}

/// What the simulator needs of one schedule operation, in bytes.
///
/// ```
/// use kolo::algo::{Apply, Op, Region, Round};
/// use kolo::simulate::{compact_round, SimOp};
/// let round = Round { ops: vec![
///     Op::Send { peer: 1, from: Region::out(0..10) },
///     Op::Recv { peer: 2, into: Region::out(10..20), apply: Apply::Copy },
/// ] };
/// let mut ops = Vec::new();
/// compact_round(&round, 4, &mut ops);
/// assert_eq!(ops, vec![
///     SimOp::Send { peer: 1, bytes: 40 },
///     SimOp::Recv { peer: 2, bytes: 40, reduce: false },
/// ]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOp {
    /// Send one message of `bytes` payload bytes to `peer`.
    Send {
        /// Destination rank.
        peer: u32,
        /// Payload bytes.
        bytes: u64,
    },
    /// Receive one message of `bytes` payload bytes from `peer`, reducing it
    /// into the buffer if `reduce`.
    Recv {
        /// Source rank.
        peer: u32,
        /// Payload bytes.
        bytes: u64,
        /// Whether the payload is reduced on arrival.
        reduce: bool,
    },
    /// Reduce `bytes` bytes locally after the round's transfers.
    Combine {
        /// Bytes reduced.
        bytes: u64,
    },
}

/// Append the [`SimOp`]s of `round` (elements of `elem` bytes) to `out`;
/// copies are dropped (they cost nothing in the model).
///
/// ```
/// use kolo::simulate::compact_round;
/// let s = kolo::algo::doubling::allreduce(0, 2, 3);
/// let mut ops = Vec::new();
/// compact_round(&s.rounds[0], 8, &mut ops);
/// assert_eq!(ops.len(), 3); // send, receive into scratch, combine
/// ```
pub fn compact_round(round: &Round, elem: usize, out: &mut Vec<SimOp>) {
    let b = |len: usize| (len * elem) as u64;
    for op in &round.ops {
        match *op {
            Op::Send { peer, from } => out.push(SimOp::Send {
                peer: peer as u32,
                bytes: b(from.len),
            }),
            Op::Recv { peer, into, apply } => out.push(SimOp::Recv {
                peer: peer as u32,
                bytes: b(into.len),
                reduce: matches!(apply, Apply::Reduce { .. }),
            }),
            Op::Combine { into, .. } => out.push(SimOp::Combine { bytes: b(into.len) }),
            Op::Copy { .. } => {}
        }
    }
}

/// Where the simulator gets rounds from, one round of one rank at a time.
/// Each rank gets a cursor when it starts and drops it when it finishes, so a
/// source can build state per rank lazily (or keep none at all).
///
/// ```
/// use kolo::simulate::{Explicit, Source, SimOp};
/// let scheds: Vec<_> = (0..2).map(|r| kolo::algo::ring::allreduce(r, 2, 4)).collect();
/// let src = Explicit { scheds: &scheds, elem: 4 };
/// let cur = src.open(0);
/// let mut ops = Vec::new();
/// assert!(src.round(0, &cur, 1, &mut ops));
/// assert_eq!(ops[0], SimOp::Send { peer: 1, bytes: 8 });
/// ops.clear();
/// assert!(!src.round(0, &cur, 2, &mut ops));
/// ```
pub trait Source {
    /// Per-rank state, alive while the rank runs.
    type Cursor;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// State for `rank`, created when it starts its first round.
    fn open(&self, rank: usize) -> Self::Cursor;
    /// Append round `k` of `rank` to `out`; `false` if the rank has no round `k`.
    fn round(&self, rank: usize, cur: &Self::Cursor, k: usize, out: &mut Vec<SimOp>) -> bool;
}

/// Already-built schedules, one per rank, with elements of `elem` bytes.
///
/// ```
/// use kolo::simulate::{Explicit, Source};
/// let scheds = vec![kolo::algo::Schedule::default(); 3];
/// assert_eq!(Explicit { scheds: &scheds, elem: 4 }.size(), 3);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Explicit<'a> {
    /// One schedule per rank.
    pub scheds: &'a [Schedule],
    /// Element size in bytes.
    pub elem: usize,
}

impl Source for Explicit<'_> {
    type Cursor = ();
    fn size(&self) -> usize {
        self.scheds.len()
    }
    fn open(&self, _rank: usize) {}
    fn round(&self, rank: usize, _cur: &(), k: usize, out: &mut Vec<SimOp>) -> bool {
        match self.scheds[rank].rounds.get(k) {
            Some(r) => {
                compact_round(r, self.elem, out);
                true
            }
            None => false,
        }
    }
}

/// An allreduce schedule family, as the simulator generates it.
///
/// ```
/// use kolo::algo::cost::Algo;
/// use kolo::simulate::Plan;
/// assert_eq!(Plan::from_algo(Algo::Tree, 64), Plan::Tree { seg: 64 });
/// // What the Communicator runs with its defaults, 16 ranks on 2 hosts:
/// let mut cfg = kolo::Config::local(0, 16, 0);
/// cfg.local_size = 8;
/// assert_eq!(Plan::kolo(&cfg, 100, 4), Plan::Rd);
/// assert_eq!(Plan::kolo(&cfg, 1 << 20, 4), Plan::RingSliced { slice: 131072 * 8 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// [`ring::allreduce`].
    Ring,
    /// [`ring::allreduce_sliced`] with `slice` elements per slice.
    RingSliced {
        /// Elements per slice.
        slice: usize,
    },
    /// [`tree::double_binary`] with `seg` elements per segment.
    Tree {
        /// Elements per pipeline segment.
        seg: usize,
    },
    /// [`halving::rabenseifner`].
    Rhd,
    /// [`doubling::allreduce`].
    Rd,
    /// [`tree::binomial`].
    Binomial,
}

impl Plan {
    /// The plan of a cost-model [`Algo`]; `seg` is used by the tree only.
    ///
    /// ```
    /// use kolo::simulate::Plan;
    /// assert_eq!(Plan::from_algo(kolo::algo::cost::Algo::Rhd, 1), Plan::Rhd);
    /// ```
    pub fn from_algo(algo: Algo, seg: usize) -> Plan {
        match algo {
            Algo::Ring => Plan::Ring,
            Algo::Tree => Plan::Tree { seg },
            Algo::Rhd => Plan::Rhd,
            Algo::Rd => Plan::Rd,
            Algo::Binomial => Plan::Binomial,
        }
    }

    /// The plan [`crate::Communicator::allreduce`] picks for `count`
    /// elements of `elem` bytes under `cfg` (its size, ranks per host,
    /// configured cost model (see [`crate::calibrate::configured`]),
    /// `slice_bytes` and `segment_bytes`).
    ///
    /// ```
    /// use kolo::simulate::Plan;
    /// let mut cfg = kolo::Config::local(0, 8, 0);
    /// cfg.slice_bytes = 0;
    /// assert_eq!(Plan::kolo(&cfg, 1 << 20, 4), Plan::Ring);
    /// assert_eq!(Plan::kolo(&cfg, 100, 4), Plan::Rd);
    /// ```
    pub fn kolo(cfg: &crate::Config, count: usize, elem: usize) -> Plan {
        let one_host = cfg.local_size == cfg.size;
        let model = crate::calibrate::configured(cfg);
        match crate::algo::cost::select(&model, cfg.size, one_host, count * elem) {
            Algo::Ring if cfg.slice_bytes > 0 => Plan::RingSliced {
                slice: ring::slice_len(cfg.slice_bytes, cfg.size, elem),
            },
            algo => Plan::from_algo(algo, (cfg.segment_bytes / elem.max(1)).max(1)),
        }
    }

    /// The real schedule of `rank` of `size` for `count` elements.
    ///
    /// ```
    /// use kolo::simulate::Plan;
    /// assert_eq!(Plan::Ring.schedule(1, 4, 10), kolo::algo::ring::allreduce(1, 4, 10));
    /// ```
    pub fn schedule(&self, rank: usize, size: usize, count: usize) -> Schedule {
        match *self {
            Plan::Ring => ring::allreduce(rank, size, count),
            Plan::RingSliced { slice } => ring::allreduce_sliced(rank, size, count, slice),
            Plan::Tree { seg } => tree::double_binary(rank, size, count, seg),
            Plan::Rhd => halving::rabenseifner(rank, size, count),
            Plan::Rd => doubling::allreduce(rank, size, count),
            Plan::Binomial => tree::binomial(rank, size, count),
        }
    }
}

/// An allreduce of `count` elements of `elem` bytes on `size` ranks,
/// generated lazily (see the module documentation).
///
/// ```
/// use kolo::simulate::{AllreduceJob, Plan, Source, SimOp};
/// let job = AllreduceJob { plan: Plan::Ring, size: 4, count: 8, elem: 4 };
/// let mut ops = Vec::new();
/// assert!(job.round(0, &job.open(0), 0, &mut ops));
/// assert_eq!(ops[0], SimOp::Send { peer: 1, bytes: 8 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllreduceJob {
    /// The algorithm and its parameters.
    pub plan: Plan,
    /// Number of ranks.
    pub size: usize,
    /// Elements per rank.
    pub count: usize,
    /// Element size in bytes.
    pub elem: usize,
}

/// Per-rank state of an [`AllreduceJob`]: nothing for rings (computed in
/// closed form), a compact copy of the schedule otherwise.
#[derive(Debug, Clone)]
pub enum JobCursor {
    /// Rounds computed from `(rank, k)` on demand.
    Ring,
    /// `ops[starts[k]..starts[k + 1]]` is round `k`.
    Stored {
        /// Every operation of the schedule, round after round.
        ops: Vec<SimOp>,
        /// Index in `ops` where each round starts (plus the end).
        starts: Vec<u32>,
    },
}

impl Source for AllreduceJob {
    type Cursor = JobCursor;
    fn size(&self) -> usize {
        self.size
    }
    fn open(&self, rank: usize) -> JobCursor {
        match self.plan {
            Plan::Ring | Plan::RingSliced { .. } => JobCursor::Ring,
            _ => {
                let s = self.plan.schedule(rank, self.size, self.count);
                let mut ops = Vec::new();
                let mut starts = vec![0u32];
                for r in &s.rounds {
                    compact_round(r, self.elem, &mut ops);
                    starts.push(ops.len() as u32);
                }
                ops.shrink_to_fit();
                JobCursor::Stored { ops, starts }
            }
        }
    }
    fn round(&self, rank: usize, cur: &JobCursor, k: usize, out: &mut Vec<SimOp>) -> bool {
        match cur {
            JobCursor::Ring => {
                let slice = match self.plan {
                    Plan::RingSliced { slice } => Some(slice),
                    _ => None,
                };
                ring_round(rank, self.size, self.count, slice, k, self.elem, out)
            }
            JobCursor::Stored { ops, starts } => match (starts.get(k), starts.get(k + 1)) {
                (Some(&a), Some(&b)) => {
                    out.extend_from_slice(&ops[a as usize..b as usize]);
                    true
                }
                _ => false,
            },
        }
    }
}

/// Round `k` of [`ring::allreduce`] (or, with `slice`, of
/// [`ring::allreduce_sliced`]) for `r` of `n`, computed without building the
/// schedule: only chunk lengths matter.
fn ring_round(
    r: usize,
    n: usize,
    count: usize,
    slice: Option<usize>,
    k: usize,
    elem: usize,
    out: &mut Vec<SimOp>,
) -> bool {
    if n <= 1 {
        return false;
    }
    let per = 2 * (n - 1);
    let (len, k) = match slice.map(|s| s.max(n).max(1)) {
        Some(sl) if count > sl => {
            let start = (k / per).saturating_mul(sl);
            if start >= count {
                return false;
            }
            (sl.min(count - start), k % per)
        }
        _ if k >= per => return false,
        _ => (count, k),
    };
    let chunk = |c: usize| ((len / n + usize::from(c < len % n)) * elem) as u64;
    let (to, from) = (((r + 1) % n) as u32, ((r + n - 1) % n) as u32);
    let (send, recv, reduce) = if k < n - 1 {
        ((r + n - k) % n, (r + 2 * n - k - 1) % n, true)
    } else {
        let k = k - (n - 1);
        ((r + 1 + n - k) % n, (r + n - k) % n, false)
    };
    out.push(SimOp::Send {
        peer: to,
        bytes: chunk(send),
    });
    out.push(SimOp::Recv {
        peer: from,
        bytes: chunk(recv),
        reduce,
    });
    true
}

/// What a simulation found.
///
/// ```
/// use kolo::simulate::{simulate, Link, Network};
/// let net = Network::uniform(Link { latency_s: 1e-6, bytes_per_s: 1e9 }, 0.0);
/// let scheds: Vec<_> = (0..2).map(|r| kolo::algo::doubling::allreduce(r, 2, 1)).collect();
/// let rep = simulate(&net, &scheds, 4).unwrap();
/// assert_eq!(rep.bytes[0], (4, 4 + 48));
/// assert_eq!(rep.messages, 2);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Completion time in seconds: the latest finish over all ranks.
    pub time_s: f64,
    /// When each rank finished its last round.
    pub finish_s: Vec<f64>,
    /// Per rank: (payload bytes sent, payload plus frame headers).
    pub bytes: Vec<(u64, u64)>,
    /// Messages sent in all.
    pub messages: u64,
    /// Rounds run, summed over ranks.
    pub rounds: u64,
}

/// Simulate explicit per-rank schedules (elements of `elem` bytes). Fails on
/// a deadlock, a message never received, mismatched message sizes or a bad
/// peer, naming the ranks involved.
///
/// ```
/// use kolo::simulate::{simulate, Link, Network};
/// let net = Network::uniform(Link { latency_s: 1e-5, bytes_per_s: 1e9 }, 0.0);
/// let n = 4;
/// let scheds: Vec<_> = (0..n).map(|r| kolo::algo::ring::allreduce(r, n, 4000)).collect();
/// let rep = simulate(&net, &scheds, 4).unwrap();
/// // 6 steps, each a latency plus a 4000-byte chunk (and its header).
/// assert!((rep.time_s - 6.0 * (1e-5 + 4048e-9)).abs() < 1e-12);
/// ```
pub fn simulate(net: &Network, scheds: &[Schedule], elem: usize) -> Result<Report, String> {
    run(net, &Explicit { scheds, elem })
}

/// Simulate an allreduce of `count` elements of `elem` bytes on `size` ranks
/// with `plan`, generating schedules lazily (fine for thousands of ranks).
///
/// ```
/// use kolo::simulate::{simulate_allreduce, Link, Network, Plan};
/// let net = Network::uniform(Link { latency_s: 1e-5, bytes_per_s: 1e9 }, 0.0);
/// let rep = simulate_allreduce(&net, Plan::Rd, 8, 1, 8).unwrap();
/// assert!((rep.time_s - 3.0 * (1e-5 + 56e-9)).abs() < 1e-12);
/// ```
pub fn simulate_allreduce(
    net: &Network,
    plan: Plan,
    size: usize,
    count: usize,
    elem: usize,
) -> Result<Report, String> {
    run(
        net,
        &AllreduceJob {
            plan,
            size,
            count,
            elem,
        },
    )
}

/// Bytes each rank of `scheds` sends (elements of `elem` bytes): payload,
/// and payload plus one [`HEADER_LEN`]-byte frame header per message, which
/// is what the transport counts in [`crate::Communicator::bytes_on_wire`].
///
/// ```
/// let scheds: Vec<_> = (0..4).map(|r| kolo::algo::ring::allreduce(r, 4, 1000)).collect();
/// let b = kolo::simulate::bytes_per_rank(&scheds, 4);
/// assert_eq!(b[0], (6 * 250 * 4, 6 * (250 * 4 + 48)));
/// ```
pub fn bytes_per_rank(scheds: &[Schedule], elem: usize) -> Vec<(u64, u64)> {
    scheds
        .iter()
        .map(|s| {
            let payload = (s.elements_sent() * elem) as u64;
            (payload, payload + (s.messages_sent() * HEADER_LEN) as u64)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The rank starts its next round.
    Start(u32),
    /// The first byte of a message reaches the receiver.
    Arrive { from: u32, to: u32, bytes: u64 },
}

struct Rank<C> {
    cur: Option<C>,
    /// Index of the current (or next) round.
    round: usize,
    /// Inside a round (between its start and its end).
    active: bool,
    /// Start time of the current round.
    t0: f64,
    /// Latest completion among the round's transfers so far.
    ready: f64,
    /// Receives of the current round still waiting: (peer, bytes, reduce).
    wait: Vec<(u32, u64, bool)>,
    combine: u64,
    egress: f64,
    ingress: f64,
    cpu: f64,
    /// Messages to this rank sitting in link queues.
    queued: u32,
    finish: Option<f64>,
    payload: u64,
    wire: u64,
}

fn key(t: f64) -> u64 {
    debug_assert!(t >= 0.0 && t.is_finite());
    t.to_bits() // monotone for non-negative floats
}

/// Run every rank of `src` to completion on `net` (see the module docs for
/// the model). This is the general entry point behind [`simulate`] and
/// [`simulate_allreduce`].
///
/// ```
/// use kolo::simulate::{run, AllreduceJob, Link, Network, Plan};
/// let net = Network::uniform(Link { latency_s: 1e-5, bytes_per_s: 1e9 }, 0.0);
/// let job = AllreduceJob { plan: Plan::Rhd, size: 8, count: 800, elem: 4 };
/// let rep = run(&net, &job).unwrap();
/// assert_eq!(rep.rounds, 8 * 6);
/// ```
pub fn run<S: Source>(net: &Network, src: &S) -> Result<Report, String> {
    net.check()?;
    let n = src.size();
    if n > u32::MAX as usize {
        return Err("too many ranks".into());
    }
    let hosts = if n == 0 { 0 } else { net.host(n - 1) + 1 };
    let mut host_out = vec![0.0f64; hosts];
    let mut host_in = vec![0.0f64; hosts];
    let mut ranks: Vec<Rank<S::Cursor>> = (0..n)
        .map(|_| Rank {
            cur: None,
            round: 0,
            active: false,
            t0: 0.0,
            ready: 0.0,
            wait: Vec::new(),
            combine: 0,
            egress: 0.0,
            ingress: 0.0,
            cpu: 0.0,
            queued: 0,
            finish: None,
            payload: 0,
            wire: 0,
        })
        .collect();
    let mut links: HashMap<u64, VecDeque<(f64, u64)>> = HashMap::new();
    let link_key = |from: usize, to: usize| (from as u64) << 32 | to as u64;
    let mut heap: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<_>, t: f64, e: Event| {
        heap.push(Reverse((key(t), seq, e)));
        seq += 1;
    };
    for r in 0..n {
        push(&mut heap, 0.0, Event::Start(r as u32));
    }
    let gamma = net.gamma_s_per_byte;
    let (mut messages, mut rounds) = (0u64, 0u64);
    let mut ops: Vec<SimOp> = Vec::new();

    // Account for a matched message (arrived at `c`) in rank `st`'s round.
    let resolve = |st: &mut Rank<S::Cursor>, c: f64, bytes: u64, reduce: bool| {
        let done = if reduce {
            let s = c.max(st.t0).max(st.cpu);
            st.cpu = s + gamma * bytes as f64;
            st.cpu
        } else {
            c
        };
        st.ready = st.ready.max(done);
    };
    // If rank `st`'s round has nothing left to wait for, end it and return
    // when its next round starts.
    let end_round = |st: &mut Rank<S::Cursor>| -> Option<f64> {
        if !st.active || !st.wait.is_empty() {
            return None;
        }
        let mut end = st.ready;
        if st.combine > 0 {
            end = end.max(st.cpu) + gamma * st.combine as f64;
            st.cpu = end;
        }
        st.active = false;
        st.round += 1;
        Some(end)
    };

    while let Some(Reverse((tk, _, ev))) = heap.pop() {
        let t = f64::from_bits(tk);
        match ev {
            Event::Start(r) => {
                let r = r as usize;
                let st = &mut ranks[r];
                if st.cur.is_none() {
                    st.cur = Some(src.open(r));
                }
                ops.clear();
                let cur = st.cur.as_ref().expect("cursor opened above");
                if !src.round(r, cur, st.round, &mut ops) {
                    st.finish = Some(t);
                    st.cur = None;
                    continue;
                }
                rounds += 1;
                st.active = true;
                st.t0 = t;
                st.ready = t;
                st.combine = 0;
                st.wait.clear();
                for op in &ops {
                    match *op {
                        SimOp::Send { peer, bytes } => {
                            let p = peer as usize;
                            if p >= n || p == r {
                                return Err(format!(
                                    "rank {r} round {}: send to bad peer {p}",
                                    st.round
                                ));
                            }
                            let wire = bytes + HEADER_LEN as u64;
                            let link = net.link(r, p);
                            let dur = wire as f64 / link.bytes_per_s;
                            let (hs, hd) = (net.host(r), net.host(p));
                            let mut s = t.max(st.egress);
                            if hs != hd {
                                s = s.max(host_out[hs]);
                                host_out[hs] = s + dur;
                            }
                            st.egress = s + dur;
                            st.ready = st.ready.max(s + dur);
                            st.payload += bytes;
                            st.wire += wire;
                            messages += 1;
                            push(
                                &mut heap,
                                s + link.latency_s,
                                Event::Arrive {
                                    from: r as u32,
                                    to: peer,
                                    bytes,
                                },
                            );
                        }
                        SimOp::Recv {
                            peer,
                            bytes,
                            reduce,
                        } => {
                            let p = peer as usize;
                            if p >= n || p == r {
                                return Err(format!(
                                    "rank {r} round {}: receive from bad peer {p}",
                                    st.round
                                ));
                            }
                            let msg = if st.queued > 0 {
                                links.get_mut(&link_key(p, r)).and_then(|q| q.pop_front())
                            } else {
                                None
                            };
                            match msg {
                                Some((c, b)) => {
                                    st.queued -= 1;
                                    if b != bytes {
                                        return Err(format!(
                                            "rank {r} round {}: expects {bytes} bytes from {p}, \
                                             which sent {b}",
                                            st.round
                                        ));
                                    }
                                    resolve(st, c, bytes, reduce);
                                }
                                None => st.wait.push((peer, bytes, reduce)),
                            }
                        }
                        SimOp::Combine { bytes } => st.combine += bytes,
                    }
                }
                if let Some(next) = end_round(st) {
                    push(&mut heap, next, Event::Start(r as u32));
                }
            }
            Event::Arrive { from, to, bytes } => {
                let (f, r) = (from as usize, to as usize);
                let link = net.link(f, r);
                let dur = (bytes + HEADER_LEN as u64) as f64 / link.bytes_per_s;
                let st = &mut ranks[r];
                let mut s = t.max(st.ingress);
                let hd = net.host(r);
                if net.host(f) != hd {
                    s = s.max(host_in[hd]);
                    host_in[hd] = s + dur;
                }
                let c = s + dur;
                st.ingress = c;
                // The receiver takes it now if its current round waits for
                // this link and nothing older is queued on it (FIFO).
                let older =
                    st.queued > 0 && links.get(&link_key(f, r)).is_some_and(|q| !q.is_empty());
                let waiting = if st.active && !older {
                    st.wait.iter().position(|w| w.0 == from)
                } else {
                    None
                };
                match waiting {
                    Some(i) => {
                        let (_, want, reduce) = st.wait.swap_remove(i);
                        if want != bytes {
                            return Err(format!(
                                "rank {r} round {}: expects {want} bytes from {f}, which sent {bytes}",
                                st.round
                            ));
                        }
                        resolve(st, c, bytes, reduce);
                        if let Some(next) = end_round(st) {
                            push(&mut heap, next, Event::Start(to));
                        }
                    }
                    None => {
                        st.queued += 1;
                        links
                            .entry(link_key(f, r))
                            .or_default()
                            .push_back((c, bytes));
                    }
                }
            }
        }
    }

    let stuck: Vec<String> = ranks
        .iter()
        .enumerate()
        .filter(|(_, st)| st.finish.is_none())
        .take(8)
        .map(|(r, st)| {
            let peers: Vec<u32> = st.wait.iter().map(|w| w.0).collect();
            format!("rank {r} in round {} waits for {peers:?}", st.round)
        })
        .collect();
    if !stuck.is_empty() {
        return Err(format!("deadlock: {}", stuck.join("; ")));
    }
    if let Some((k, q)) = links.iter().find(|(_, q)| !q.is_empty()) {
        return Err(format!(
            "{} message(s) from rank {} to rank {} never received",
            q.len(),
            k >> 32,
            k & 0xffff_ffff
        ));
    }
    let finish_s: Vec<f64> = ranks.iter().map(|st| st.finish.unwrap_or(0.0)).collect();
    Ok(Report {
        time_s: finish_s.iter().copied().fold(0.0, f64::max),
        finish_s,
        bytes: ranks.iter().map(|st| (st.payload, st.wire)).collect(),
        messages,
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(alpha: f64, bw: f64, gamma: f64) -> Network {
        Network::uniform(
            Link {
                latency_s: alpha,
                bytes_per_s: bw,
            },
            gamma,
        )
    }

    #[test]
    fn lazy_rings_match_the_real_schedules() {
        for n in 1..=9usize {
            for count in [0, 1, 5, 37, 100] {
                for plan in [
                    Plan::Ring,
                    Plan::RingSliced { slice: 7 },
                    Plan::RingSliced { slice: 1000 },
                ] {
                    let job = AllreduceJob {
                        plan,
                        size: n,
                        count,
                        elem: 4,
                    };
                    for r in 0..n {
                        let s = plan.schedule(r, n, count);
                        let cur = job.open(r);
                        let mut k = 0;
                        loop {
                            let (mut a, mut b) = (Vec::new(), Vec::new());
                            let more = job.round(r, &cur, k, &mut a);
                            assert_eq!(more, k < s.rounds.len(), "{plan:?} n={n} r={r} k={k}");
                            if !more {
                                break;
                            }
                            compact_round(&s.rounds[k], 4, &mut b);
                            assert_eq!(a, b, "{plan:?} n={n} count={count} r={r} k={k}");
                            k += 1;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lazy_and_explicit_agree() {
        let net = uniform(1e-5, 1e9, 1e-10);
        for n in [2usize, 3, 6, 8] {
            for plan in [
                Plan::Ring,
                Plan::RingSliced { slice: 64 },
                Plan::Tree { seg: 50 },
                Plan::Rhd,
                Plan::Rd,
                Plan::Binomial,
            ] {
                let scheds: Vec<_> = (0..n).map(|r| plan.schedule(r, n, 1001)).collect();
                let a = simulate(&net, &scheds, 4).unwrap();
                let b = simulate_allreduce(&net, plan, n, 1001, 4).unwrap();
                assert_eq!(a, b, "{plan:?} n={n}");
                assert_eq!(a.bytes, bytes_per_rank(&scheds, 4));
            }
        }
    }

    #[test]
    fn ring_closed_form_in_unit() {
        // S divisible by N: exact up to the headers.
        let (alpha, bw, gamma) = (2e-5, 1.25e9, 1.0 / 8e9);
        let net = uniform(alpha, bw, gamma);
        let (n, s) = (8usize, 1u64 << 20);
        let rep = simulate_allreduce(&net, Plan::Ring, n, (s / 4) as usize, 4).unwrap();
        let nf = n as f64;
        let chunk = s as f64 / nf;
        let want = 2.0 * (nf - 1.0) * (alpha + (chunk + HEADER_LEN as f64) / bw)
            + (nf - 1.0) * chunk * gamma;
        assert!(
            (rep.time_s - want).abs() < 1e-12 * want.max(1.0),
            "{}",
            rep.time_s
        );
    }

    #[test]
    fn mismatches_are_reported_not_hung() {
        let net = uniform(1e-6, 1e9, 0.0);
        // Rank 0 sends 2 elements, rank 1 expects 3.
        let a = Schedule {
            rounds: vec![Round {
                ops: vec![Op::Send {
                    peer: 1,
                    from: crate::algo::Region::out(0..2),
                }],
            }],
        };
        let b = Schedule {
            rounds: vec![Round {
                ops: vec![Op::Recv {
                    peer: 0,
                    into: crate::algo::Region::out(0..3),
                    apply: Apply::Copy,
                }],
            }],
        };
        let e = simulate(&net, &[a.clone(), b.clone()], 4).unwrap_err();
        assert!(e.contains("expects 12 bytes"), "{e}");
        // Both wait for each other.
        let mut c = b.clone();
        c.rounds[0].ops[0] = Op::Recv {
            peer: 1,
            into: crate::algo::Region::out(0..3),
            apply: Apply::Copy,
        };
        let e = simulate(&net, &[c, b], 4).unwrap_err();
        assert!(e.contains("deadlock"), "{e}");
        let e = simulate(&net, &[a, Schedule::default()], 4).unwrap_err();
        assert!(e.contains("never received"), "{e}");
    }

    #[test]
    fn a_shared_host_nic_slows_concurrent_inter_host_traffic() {
        // 2 hosts of 2 ranks; ranks 0 and 1 each send 1 MB to ranks 2 and 3
        // at once: with one NIC per host the second message waits.
        let mk = |peer: usize, send: bool| Schedule {
            rounds: vec![Round {
                ops: vec![if send {
                    Op::Send {
                        peer,
                        from: crate::algo::Region::out(0..1_000_000),
                    }
                } else {
                    Op::Recv {
                        peer,
                        into: crate::algo::Region::out(0..1_000_000),
                        apply: Apply::Copy,
                    }
                }],
            }],
        };
        let scheds = [mk(2, true), mk(3, true), mk(0, false), mk(1, false)];
        let mut net = uniform(0.0, 1e9, 0.0);
        let flat = simulate(&net, &scheds, 1).unwrap().time_s;
        net.ranks_per_host = 2;
        let shared = simulate(&net, &scheds, 1).unwrap().time_s;
        assert!((flat - 1.000048e-3).abs() < 1e-12, "{flat}");
        assert!((shared - 2.0 * 1.000048e-3).abs() < 1e-12, "{shared}");
    }
}
