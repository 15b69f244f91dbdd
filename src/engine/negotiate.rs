//! Agreement on which named tensors every rank has submitted, as a state
//! machine that every rank holds an identical copy of.
//!
//! Each *round* every rank contributes a small integer vector (summed across
//! ranks) and, only when someone has something new to say, a serialized
//! [`Contribution`] (gathered to all). Every rank then applies the same inputs
//! in the same order, so the replicated [`State`] and the list of ready tensors
//! come out identical everywhere, with no coordinator. Tensors negotiated once
//! are kept in a cache (Horovod's response cache): in the next steps a rank
//! marks them in the vector instead of describing them, so a training step in
//! steady state costs one small allreduce per round.
//!
//! This module never touches sockets; [`super::worker`] moves the bytes.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A tensor's name, shared rather than copied between the handle, the
/// in-flight set, the engine's maps and the cache.
pub type Name = Arc<str>;

/// A tensor's dimensions, held inline up to four of them: building a
/// [`Spec`] then allocates nothing, and a training step submits hundreds.
/// Compares, prints and serializes as the list of dimensions.
///
/// ```
/// use kolo::engine::negotiate::Shape;
/// let s = Shape::from(&[64u64, 3, 3, 3][..]);
/// assert_eq!((s.len(), s.iter().product::<u64>()), (4, 1728));
/// assert_eq!(Shape::from(&[1u64, 2, 3, 4, 5][..])[4], 5);
/// ```
#[derive(Clone)]
pub enum Shape {
    /// At most four dimensions: the first `.0` of `.1`.
    Inline(u8, [u64; 4]),
    /// More than four.
    Heap(Vec<u64>),
}

impl Shape {
    /// A one-dimensional shape of `len` elements.
    pub fn flat(len: u64) -> Shape {
        Shape::Inline(1, [len, 0, 0, 0])
    }
}

impl From<&[u64]> for Shape {
    fn from(d: &[u64]) -> Shape {
        if d.len() <= 4 {
            let mut a = [0; 4];
            a[..d.len()].copy_from_slice(d);
            Shape::Inline(d.len() as u8, a)
        } else {
            Shape::Heap(d.to_vec())
        }
    }
}

impl std::ops::Deref for Shape {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        match self {
            Shape::Inline(n, a) => &a[..*n as usize],
            Shape::Heap(v) => v,
        }
    }
}

impl PartialEq for Shape {
    fn eq(&self, o: &Shape) -> bool {
        **self == **o
    }
}

impl Eq for Shape {}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Serialize for Shape {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
        Vec::<u64>::deserialize(d).map(|v| Shape::from(&v[..]))
    }
}

/// The collective a named tensor asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Coll {
    /// Elementwise reduction; the only one that joined ranks take part in.
    Allreduce,
    /// Concatenation in rank order; the first dimension may differ per rank.
    Allgather,
    /// Copy of the root's tensor.
    Broadcast,
    /// Reduction of which each rank keeps one equal block.
    ReduceScatter,
    /// Block j of each rank goes to rank j.
    Alltoall,
}

impl Coll {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Coll::Allreduce => "allreduce",
            Coll::Allgather => "allgather",
            Coll::Broadcast => "broadcast",
            Coll::ReduceScatter => "reduce_scatter",
            Coll::Alltoall => "alltoall",
        }
    }
}

/// What one rank says about one named tensor. Ranks must agree on all of it
/// (for allgather, on all but the first dimension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The tensor's name, unique among a rank's tensors in flight; shared
    /// (not copied) by the handle, the in-flight set and the engine's maps.
    pub name: Name,
    /// Requested collective.
    pub coll: Coll,
    /// Wire code of the dtype ([`crate::DType::code`]).
    pub dtype: u8,
    /// Wire code of the reduction ([`crate::ReduceOp::code`]), 0 when none.
    pub op: u8,
    /// Broadcast root, 0 otherwise.
    pub root: u32,
    /// Dimensions; their product is the element count.
    pub shape: Shape,
    /// Group name and member count: members run only together.
    pub group: Option<(String, u32)>,
    /// Compression of an f32 allreduce ([`crate::compress::Compression`]'s
    /// text form); empty for none.
    #[serde(default)]
    pub compression: String,
}

impl Spec {
    /// Number of elements.
    pub fn count(&self) -> u64 {
        self.shape.iter().product()
    }

    /// One-line description for error messages.
    pub fn describe(&self) -> String {
        let dtype = crate::DType::from_code(self.dtype).map_or("?", |d| d.name());
        let mut s = format!("{} {dtype} {:?}", self.coll.name(), self.shape);
        if let Some(op) = crate::ReduceOp::from_code(self.op) {
            s += &format!(" {}", op.name());
        }
        if self.coll == Coll::Broadcast {
            s += &format!(" root {}", self.root);
        }
        if let Some((g, n)) = &self.group {
            s += &format!(" group {g:?}/{n}");
        }
        if !self.compression.is_empty() {
            s += &format!(" compression {}", self.compression);
        }
        s
    }

    /// The first field on which two ranks' specs of one name disagree.
    pub fn disagreement(&self, other: &Spec) -> Option<&'static str> {
        if self.coll != other.coll {
            return Some("collective");
        }
        if self.dtype != other.dtype {
            return Some("dtype");
        }
        if self.op != other.op {
            return Some("op");
        }
        if self.root != other.root {
            return Some("root");
        }
        let same_shape = if self.coll == Coll::Allgather {
            self.shape.len() == other.shape.len()
                && self.shape.get(1..) == other.shape.get(1..)
                && !self.shape.is_empty()
        } else {
            self.shape == other.shape
        };
        if !same_shape {
            return Some("shape");
        }
        if self.group != other.group {
            return Some("group");
        }
        if self.compression != other.compression {
            return Some("compression");
        }
        None
    }
}

/// What one rank sends in a round's exchange (only rounds where some rank
/// has something new run the exchange).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// Tensors this rank submitted that are not (or no longer) in the cache.
    pub announce: Vec<Spec>,
    /// This rank ran out of data and joins.
    pub join: bool,
    /// Every name this rank has pending; sent when some rank asked for a
    /// census (stall inspection), so every rank can say who is missing what.
    pub pending: Option<Vec<String>>,
    /// Names this rank gives up on after the stall shutdown time; `JOIN`
    /// withdraws this rank's join.
    pub cancel: Vec<String>,
    /// This rank's engine is shutting down.
    pub stop: bool,
}

/// Name used for a pending join in censuses and cancels.
pub const JOIN: &str = "(join)";

/// The per-rank view a round's vector is built from.
#[derive(Debug, Default)]
pub struct Local {
    /// This rank has a [`Contribution`] with content.
    pub has_content: bool,
    /// This rank asks every rank to list its pending names.
    pub wants_census: bool,
    /// Cache slots of the tensors this rank has pending in cached form, in
    /// any order.
    pub held: Vec<usize>,
}

/// A tensor every rank has agreed to run now.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    /// The spec each rank gave; `None` for a joined rank that contributes the
    /// identity of the reduction. Shared with the cache: a steady-state step
    /// copies no specs.
    pub specs: Arc<Vec<Option<Spec>>>,
    /// Number of ranks that contribute real data (the divisor of an average).
    pub contributors: usize,
    /// The cache slot it was ready in (`None`: negotiated in this round).
    pub slot: Option<usize>,
}

impl Ready {
    /// The agreed spec (any rank's, they agree).
    pub fn spec(&self) -> &Spec {
        self.specs
            .iter()
            .flatten()
            .next()
            .expect("a ready tensor has a contributor")
    }
}

/// A stalled tensor: some ranks submitted it, others have not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The tensor (or [`JOIN`]).
    pub name: String,
    /// Ranks that have it pending.
    pub have: Vec<usize>,
    /// Ranks that have not submitted it.
    pub missing: Vec<usize>,
}

/// Everything a round decided, identical on every rank.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Tensors to run now, in this order.
    pub ready: Vec<Ready>,
    /// Tensors that fail on every rank that submitted them: (name, which
    /// ranks, message). A rank fails its pending tensor of that name only if
    /// it is among the ranks listed.
    pub failed: Vec<(Name, Vec<usize>, Failure)>,
    /// Cache entries dropped because some rank changed the tensor; ranks
    /// holding them in cached form must announce them again.
    pub evicted: Vec<Name>,
    /// Filled after a census: who is missing what.
    pub stalls: Option<Vec<Stall>>,
    /// Every rank has joined: the joins complete, returning this last rank.
    pub join_done: Option<usize>,
    /// Ranks whose join was withdrawn after a stall shutdown.
    pub join_cancelled: Vec<usize>,
    /// Every rank has asked to shut down: every engine stops after this round.
    pub stop: bool,
}

/// Why a tensor failed in negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Ranks submitted it with different specs: (first rank, other rank, text).
    Mismatch(usize, usize, String),
    /// A stall shutdown: ranks that never submitted it.
    Stalled(Stall),
    /// The arguments can never run (e.g. a broadcast root out of range).
    Invalid(String),
    /// Every rank joined while this non-allreduce tensor still lacked ranks.
    Joined(String),
}

/// The replicated negotiation state.
#[derive(Debug)]
pub struct State {
    n: usize,
    capacity: usize,
    /// Slot → per-rank specs of a negotiated tensor; `None` marks a free slot.
    cache: Vec<Option<Arc<Vec<Option<Spec>>>>>,
    /// Bumped whenever a slot's content changes: a (slot, generation) pair
    /// seen earlier still names the same specs ([`State::generation`]).
    gens: Vec<u32>,
    index: FxHashMap<Name, usize>,
    /// Announced but not yet ready (or failed and awaiting remaining ranks).
    table: BTreeMap<Name, Entry>,
    joined: Vec<bool>,
    stopping: Vec<bool>,
    last_joined: usize,
    /// The join state changed, or a deferred announcement was admitted: run
    /// one more round even if nobody has news, since tensors may now be
    /// complete (or every join may be).
    rerun: bool,
    /// Announcements of a name whose failed entry already told that rank:
    /// a new submission, kept out of the old entry (which would hand it the
    /// old error) until that entry is gone.
    deferred: Vec<(usize, Spec)>,
}

#[derive(Debug)]
struct Entry {
    specs: Vec<Option<Spec>>,
    error: Option<Failure>,
    /// Ranks already told about `error`.
    told: Vec<bool>,
}

impl State {
    /// State for `n` ranks remembering up to `capacity` negotiated tensors.
    pub fn new(n: usize, capacity: usize) -> State {
        State {
            n,
            capacity,
            cache: Vec::new(),
            gens: Vec::new(),
            index: FxHashMap::default(),
            table: BTreeMap::new(),
            joined: vec![false; n],
            stopping: vec![false; n],
            last_joined: 0,
            rerun: false,
            deferred: Vec::new(),
        }
    }

    /// The cache slot holding `spec` for rank `rank`, if it is cached exactly so.
    pub fn cached(&self, rank: usize, spec: &Spec) -> Option<usize> {
        let slot = *self.index.get(&spec.name)?;
        let specs = self.cache[slot].as_ref()?;
        // The index matched the name; compare the rest, cheapest first (the
        // pattern names every field, so a new one cannot be forgotten here).
        let Spec {
            name: _,
            coll,
            dtype,
            op,
            root,
            shape,
            group,
            compression,
        } = specs[rank].as_ref()?;
        let same = *coll == spec.coll
            && *dtype == spec.dtype
            && *op == spec.op
            && *root == spec.root
            && *shape == spec.shape
            && *group == spec.group
            && (compression.is_empty() && spec.compression.is_empty()
                || *compression == spec.compression);
        same.then_some(slot)
    }

    /// The generation of a filled cache slot: while it stays the same, the
    /// slot holds the same specs, so an earlier [`State::cached`] answer
    /// for it still holds.
    pub fn generation(&self, slot: usize) -> Option<u32> {
        self.cache.get(slot)?.as_ref()?;
        Some(self.gens[slot])
    }

    /// Whether `rank` has joined.
    pub fn is_joined(&self, rank: usize) -> bool {
        self.joined[rank]
    }

    /// A round is needed even if no rank has news (to complete a join).
    pub fn needs_round(&self) -> bool {
        self.rerun
    }

    /// Names in the table (announced by some rank, not yet run or failed).
    pub fn waiting(&self) -> impl Iterator<Item = &str> {
        self.table.keys().map(|k| &**k)
    }

    fn any_joined(&self) -> bool {
        self.joined.iter().any(|&j| j)
    }

    /// This rank's vector for the round: `[has content, wants census,
    /// lacks slot 0.., (holds slot 0.. when some rank has joined)]`, summed
    /// across ranks. A joined rank lacks no allreduce.
    pub fn vector(&self, me: usize, local: &Local) -> Vec<i32> {
        let c = self.cache.len();
        let holds = self.any_joined();
        let mut v = vec![0i32; 2 + c + if holds { c } else { 0 }];
        v[0] = local.has_content as i32;
        v[1] = local.wants_census as i32;
        let mut is_held = vec![false; c];
        for &s in local.held.iter().filter(|&&s| s < c) {
            is_held[s] = true;
        }
        for (i, slot) in self.cache.iter().enumerate() {
            let Some(specs) = slot else { continue };
            let held = is_held[i];
            let stands_in = self.joined[me]
                && specs[me]
                    .as_ref()
                    .is_some_and(|s| s.coll == Coll::Allreduce);
            v[2 + i] = (!held && !stands_in) as i32;
            if holds {
                v[2 + c + i] = held as i32;
            }
        }
        v
    }

    /// Whether the summed vector says an exchange follows.
    pub fn exchange_needed(summed: &[i32]) -> bool {
        summed[0] > 0 || summed[1] > 0
    }

    /// Whether the summed vector asked for a census.
    pub fn census_needed(summed: &[i32]) -> bool {
        summed[1] > 0
    }

    /// Apply one round: the summed vector and, when exchanged, every rank's
    /// contribution in rank order.
    pub fn apply(&mut self, summed: &[i32], contribs: Option<&[Contribution]>) -> Outcome {
        let n = self.n;
        let c = self.cache.len();
        let joined_at_start = self.joined.clone();
        let all_joined = joined_at_start.iter().all(|&j| j);
        let holds = self.any_joined();
        let mut out = Outcome::default();
        self.rerun = false;

        // Cached tensors every rank holds (or stands in for).
        let mut ready: Vec<Ready> = Vec::new();
        for i in 0..c {
            let Some(specs) = &self.cache[i] else {
                continue;
            };
            if summed[2 + i] != 0 {
                continue;
            }
            let contributors = if holds { summed[2 + c + i] as usize } else { n };
            if contributors == 0 {
                continue;
            }
            // Joined ranks that do not hold it stand in with the identity;
            // which ones those are is not known here, nor needed: each rank
            // knows whether it holds the tensor itself.
            ready.push(Ready {
                specs: specs.clone(),
                contributors,
                slot: Some(i),
            });
        }

        // The exchange, in rank order.
        let mut census: Option<BTreeMap<String, BTreeSet<usize>>> = None;
        let mut cancels: Vec<(usize, String)> = Vec::new();
        if let Some(contribs) = contribs {
            if summed[1] > 0 {
                census = Some(BTreeMap::new());
            }
            for (r, cb) in contribs.iter().enumerate() {
                for s in &cb.announce {
                    let told_failure = self
                        .table
                        .get(&s.name)
                        .is_some_and(|e| e.error.is_some() && e.told[r]);
                    if told_failure {
                        self.deferred.push((r, s.clone()));
                    } else {
                        self.announce(r, s, &mut out);
                    }
                }
                if cb.stop {
                    self.stopping[r] = true;
                }
                if cb.join && !self.joined[r] {
                    self.joined[r] = true;
                    self.last_joined = r;
                    self.rerun = true;
                }
                if let (Some(census), Some(names)) = (census.as_mut(), &cb.pending) {
                    for name in names {
                        census.entry(name.clone()).or_default().insert(r);
                    }
                }
                for name in &cb.cancel {
                    cancels.push((r, name.clone()));
                }
            }
        }

        // Announced tensors: failures, and those every rank now has.
        let mut table_ready: Vec<Name> = Vec::new();
        for (name, e) in self.table.iter_mut() {
            let announced: Vec<usize> = (0..n).filter(|&r| e.specs[r].is_some()).collect();
            if let Some(f) = &e.error {
                let new: Vec<usize> = announced.iter().copied().filter(|&r| !e.told[r]).collect();
                for &r in &new {
                    e.told[r] = true;
                }
                if !new.is_empty() {
                    out.failed.push((name.clone(), new, f.clone()));
                }
                continue;
            }
            let first = e.specs[announced[0]].as_ref().expect("announced");
            let complete = (0..n).all(|r| {
                e.specs[r].is_some() || (joined_at_start[r] && first.coll == Coll::Allreduce)
            });
            if complete {
                table_ready.push(name.clone());
            }
        }
        // A failed entry is kept until every rank has announced it, so that a
        // rank arriving late gets the error too; joined ranks never will.
        self.table.retain(|_, e| {
            e.error.is_none() || (0..n).any(|r| e.specs[r].is_none() && !joined_at_start[r])
        });
        // New submissions held back by a failed entry start afresh once it is
        // gone; they are looked at in the next round.
        for (r, s) in std::mem::take(&mut self.deferred) {
            if self.table.get(&s.name).is_some_and(|e| e.error.is_some()) {
                self.deferred.push((r, s));
            } else {
                self.announce(r, &s, &mut out);
                self.rerun = true;
            }
        }
        for name in &table_ready {
            let e = &self.table[name];
            let specs = Arc::new(e.specs.clone());
            let contributors = specs.iter().filter(|s| s.is_some()).count();
            ready.push(Ready {
                specs,
                contributors,
                slot: None,
            });
        }

        // Group members run only together.
        let mut members: HashMap<&str, u32> = HashMap::new();
        for r in &ready {
            if let Some((g, _)) = &r.spec().group {
                *members.entry(g.as_str()).or_default() += 1;
            }
        }
        let keep: Vec<bool> = ready
            .iter()
            .map(|r| match &r.spec().group {
                Some((g, size)) => members.get(g.as_str()) == Some(size),
                None => true,
            })
            .collect();
        let kept: Vec<Ready> = ready
            .into_iter()
            .zip(keep)
            .filter_map(|(r, k)| k.then_some(r))
            .collect();
        let kept_names: BTreeSet<Name> = if census.is_some() {
            kept.iter().map(|r| r.spec().name.clone()).collect()
        } else {
            BTreeSet::new()
        };
        // Commit: announced tensors leave the table and enter the cache.
        for r in &kept {
            let name = &r.spec().name;
            if self.table.remove(name).is_some() && self.capacity > 0 && r.contributors == n {
                let free = self.cache.iter().position(|s| s.is_none());
                let slot = match free {
                    Some(f) => Some(f),
                    None if self.cache.len() < self.capacity => {
                        self.cache.push(None);
                        self.gens.push(0);
                        Some(self.cache.len() - 1)
                    }
                    None => None,
                };
                if let Some(slot) = slot {
                    self.cache[slot] = Some(r.specs.clone());
                    self.gens[slot] = self.gens[slot].wrapping_add(1);
                    self.index.insert(name.clone(), slot);
                }
            }
        }
        out.ready = kept;

        // Stall census and shutdown cancels.
        if let Some(census) = census {
            let mut stalls = Vec::new();
            for (name, have) in &census {
                // A joined rank counts as present for a join and stands in
                // for allreduces.
                let present = |r: usize| {
                    have.contains(&r)
                        || (name == JOIN && self.joined[r])
                        || (name != JOIN && self.is_allreduce(name) && joined_at_start[r])
                };
                let missing: Vec<usize> = (0..n).filter(|&r| !present(r)).collect();
                if !missing.is_empty() && !kept_names.contains(name.as_str()) {
                    stalls.push(Stall {
                        name: name.clone(),
                        have: have.iter().copied().collect(),
                        missing,
                    });
                }
            }
            for (r, name) in &cancels {
                if let Some(st) = stalls.iter().find(|s| &s.name == name) {
                    if name == JOIN {
                        if self.joined[*r] {
                            self.joined[*r] = false;
                            out.join_cancelled.push(*r);
                        }
                    } else if !out.failed.iter().any(|(f, _, _)| **f == **name) {
                        self.table.remove(name.as_str());
                        out.failed.push((
                            name.as_str().into(),
                            st.have.clone(),
                            Failure::Stalled(st.clone()),
                        ));
                    }
                }
            }
            out.stalls = Some(stalls);
        }

        if self.stopping.iter().all(|&s| s) {
            out.stop = true;
            self.stopping = vec![false; n];
        }

        // Joins: once every rank had joined at the start of a round, whatever
        // could run has run; what is left can never complete.
        if all_joined {
            for (name, e) in std::mem::take(&mut self.table) {
                let have: Vec<usize> = (0..n).filter(|&r| e.specs[r].is_some()).collect();
                out.failed.push((
                    name.clone(),
                    have,
                    Failure::Joined(format!(
                        "tensor {name:?} ({}) cannot run: every rank has joined and some never submitted it",
                        e.specs.iter().flatten().next().map_or(String::new(), Spec::describe)
                    )),
                ));
            }
            out.join_done = Some(self.last_joined);
            self.joined = vec![false; n];
            self.rerun = false;
        }
        out
    }

    /// Enter rank `r`'s announcement of `s` into the table, noting a
    /// disagreement with an earlier rank's spec as the entry's failure.
    fn announce(&mut self, r: usize, s: &Spec, out: &mut Outcome) {
        let n = self.n;
        if let Some(slot) = self.index.remove(&s.name) {
            self.cache[slot] = None;
            self.gens[slot] = self.gens[slot].wrapping_add(1);
            out.evicted.push(s.name.clone());
        }
        let e = self.table.entry(s.name.clone()).or_insert_with(|| Entry {
            specs: vec![None; n],
            error: None,
            told: vec![false; n],
        });
        e.told[r] = false;
        if e.error.is_none() {
            if let Some((q, other)) = e
                .specs
                .iter()
                .enumerate()
                .find_map(|(q, o)| o.as_ref().map(|o| (q, o)))
                .filter(|(_, o)| o.disagreement(s).is_some())
            {
                let what = other.disagreement(s).unwrap_or("spec");
                e.error = Some(Failure::Mismatch(
                    q,
                    r,
                    format!(
                        "tensor {:?}: ranks disagree on the {what}: rank {q} submitted {}, rank {r} submitted {}",
                        s.name,
                        other.describe(),
                        s.describe()
                    ),
                ));
            }
        }
        e.specs[r] = Some(s.clone());
    }

    fn is_allreduce(&self, name: &str) -> bool {
        let in_cache = self
            .index
            .get(name)
            .and_then(|&s| self.cache[s].as_ref())
            .map(|s| s.iter().flatten().any(|s| s.coll == Coll::Allreduce));
        let in_table = self
            .table
            .get(name)
            .and_then(|e| e.specs.iter().flatten().next())
            .map(|s| s.coll == Coll::Allreduce);
        in_cache.or(in_table).unwrap_or(false)
    }
}

/// A round's vector (every entry 0 or 1) as bits, eight to a byte, to travel.
///
/// ```
/// use kolo::engine::negotiate::{count_flags, pack_flags};
/// let a = pack_flags(&[1, 0, 1]);
/// let b = pack_flags(&[1, 1, 0]);
/// assert_eq!(count_flags(&[a, b].concat(), 2, 3), [2, 1, 1]);
/// ```
pub fn pack_flags(v: &[i32]) -> Vec<u8> {
    let mut w = vec![0u8; v.len().div_ceil(8)];
    for (i, &f) in v.iter().enumerate() {
        debug_assert!(f == 0 || f == 1, "vector entries are flags");
        w[i / 8] |= u8::from(f != 0) << (i % 8);
    }
    w
}

/// The summed vector: for each of `len` entries, how many of the `n` ranks'
/// packed vectors (laid end to end in `all`) have it set.
pub fn count_flags(all: &[u8], n: usize, len: usize) -> Vec<i32> {
    let bytes = len.div_ceil(8);
    let mut v = vec![0i32; len];
    for r in 0..n {
        for (k, &b) in all[r * bytes..(r + 1) * bytes].iter().enumerate() {
            let mut b = b;
            while b != 0 {
                let i = k * 8 + b.trailing_zeros() as usize;
                if i < len {
                    v[i] += 1;
                }
                b &= b - 1;
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_flags_count_like_the_sum() {
        let mut x = 12345u64;
        for n in 1..=6 {
            for len in [0, 1, 2, 63, 64, 65, 130, 1000] {
                let vs: Vec<Vec<i32>> = (0..n)
                    .map(|_| {
                        (0..len)
                            .map(|_| {
                                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                                (x >> 63) as i32
                            })
                            .collect()
                    })
                    .collect();
                let all: Vec<u8> = vs.iter().flat_map(|v| pack_flags(v)).collect();
                let want: Vec<i32> = (0..len).map(|i| vs.iter().map(|v| v[i]).sum()).collect();
                assert_eq!(count_flags(&all, n, len), want, "n={n} len={len}");
            }
        }
    }

    fn spec(name: &str, len: u64) -> Spec {
        Spec {
            name: name.into(),
            coll: Coll::Allreduce,
            dtype: crate::DType::F32.code(),
            op: crate::ReduceOp::Sum.code(),
            root: 0,
            shape: Shape::flat(len),
            group: None,
            compression: String::new(),
        }
    }

    /// Run one round over `n` simulated ranks given each rank's local view
    /// and contribution; returns every rank's outcome.
    fn round(states: &mut [State], locals: &[Local], contribs: &[Contribution]) -> Vec<Outcome> {
        let n = states.len();
        let vs: Vec<Vec<i32>> = (0..n).map(|r| states[r].vector(r, &locals[r])).collect();
        let mut sum = vec![0i32; vs[0].len()];
        for v in &vs {
            assert_eq!(v.len(), sum.len(), "vector lengths agree on every rank");
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        let ex = State::exchange_needed(&sum);
        states
            .iter_mut()
            .map(|s| s.apply(&sum, ex.then_some(contribs)))
            .collect()
    }

    fn names(o: &Outcome) -> Vec<String> {
        o.ready.iter().map(|r| r.spec().name.to_string()).collect()
    }

    #[test]
    fn announce_then_cache() {
        let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
        let a = |name: &str| Contribution {
            announce: vec![spec(name, 4)],
            ..Default::default()
        };
        let local = || Local {
            has_content: true,
            ..Default::default()
        };
        // Ranks 0 and 1 announce "x"; rank 2 not yet: nothing ready.
        let o = round(
            &mut st,
            &[local(), local(), Local::default()],
            &[a("x"), a("x"), Contribution::default()],
        );
        assert!(o.iter().all(|o| o.ready.is_empty()));
        // Rank 2 announces: ready everywhere, then cached.
        let o = round(
            &mut st,
            &[Local::default(), Local::default(), local()],
            &[Contribution::default(), Contribution::default(), a("x")],
        );
        assert!(o.iter().all(|o| names(o) == ["x"]));
        let slot = st[0].cached(0, &spec("x", 4)).expect("cached");
        // Next step: all hold slot 0, no exchange needed.
        let held = || Local {
            held: [slot].into(),
            ..Default::default()
        };
        let o = round(&mut st, &[held(), held(), held()], &[]);
        assert!(o
            .iter()
            .all(|o| names(o) == ["x"] && o.ready[0].contributors == 3));
        // Only two hold it: not ready.
        let o = round(&mut st, &[held(), held(), Local::default()], &[]);
        assert!(o.iter().all(|o| o.ready.is_empty()));
    }

    #[test]
    fn mismatch_reaches_every_rank_and_names_both() {
        let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
        let c = |len| Contribution {
            announce: vec![spec("w", len)],
            ..Default::default()
        };
        let l = || Local {
            has_content: true,
            ..Default::default()
        };
        let o = round(
            &mut st,
            &[l(), l(), Local::default()],
            &[c(4), c(5), Contribution::default()],
        );
        for o in &o {
            let (name, ranks, f) = &o.failed[0];
            assert_eq!(&**name, "w");
            assert_eq!(ranks, &[0, 1]);
            match f {
                Failure::Mismatch(0, 1, m) => {
                    assert!(
                        m.contains("shape") && m.contains("[4]") && m.contains("[5]"),
                        "{m}"
                    )
                }
                f => panic!("{f:?}"),
            }
        }
        // The late rank gets the same error, then the name is free again.
        let o = round(
            &mut st,
            &[Local::default(), Local::default(), l()],
            &[Contribution::default(), Contribution::default(), c(4)],
        );
        assert!(o
            .iter()
            .all(|o| o.failed.len() == 1 && o.failed[0].1 == [2]));
        assert_eq!(st[0].waiting().count(), 0);
    }

    /// A rank told of a failure that resubmits the name before a late rank
    /// has announced its old submission must not be handed the old error.
    #[test]
    fn resubmission_waits_for_the_failed_entry_to_clear() {
        let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
        let c = |len| Contribution {
            announce: vec![spec("w", len)],
            ..Default::default()
        };
        let none = Contribution::default;
        let l = |news: bool| Local {
            has_content: news,
            ..Default::default()
        };
        let o = round(
            &mut st,
            &[l(true), l(true), l(false)],
            &[c(4), c(5), none()],
        );
        assert!(o.iter().all(|o| o.failed.len() == 1));
        // Rank 0 resubmits correctly while rank 2's old submission is late.
        let o = round(
            &mut st,
            &[l(true), l(false), l(false)],
            &[c(4), none(), none()],
        );
        assert!(o.iter().all(|o| o.failed.is_empty() && o.ready.is_empty()));
        // Rank 2's old one arrives: only rank 2 fails; rank 0's new one is
        // admitted afresh and a round follows.
        let o = round(
            &mut st,
            &[l(false), l(false), l(true)],
            &[none(), none(), c(4)],
        );
        assert!(o
            .iter()
            .all(|o| o.failed.len() == 1 && o.failed[0].1 == [2]));
        assert!(st.iter().all(|s| s.needs_round()));
        // Ranks 1 and 2 resubmit: it runs on all three.
        let o = round(
            &mut st,
            &[l(false), l(true), l(true)],
            &[none(), c(4), c(4)],
        );
        assert!(o
            .iter()
            .all(|o| o.failed.is_empty() && names(o) == ["w"] && o.ready[0].contributors == 3));
    }

    #[test]
    fn changed_shape_evicts_the_cache_entry() {
        let mut st: Vec<State> = (0..2).map(|_| State::new(2, 8)).collect();
        let c = |len| Contribution {
            announce: vec![spec("b", len)],
            ..Default::default()
        };
        let l = || Local {
            has_content: true,
            ..Default::default()
        };
        round(&mut st, &[l(), l()], &[c(4), c(4)]);
        let slot = st[0].cached(0, &spec("b", 4)).unwrap();
        // Rank 0 holds the cached form, rank 1 announces a new shape.
        let held = Local {
            held: [slot].into(),
            ..Default::default()
        };
        let o = round(&mut st, &[held, l()], &[Contribution::default(), c(6)]);
        assert!(o
            .iter()
            .all(|o| o.ready.is_empty() && o.evicted.len() == 1 && &*o.evicted[0] == "b"));
        assert_eq!(st[1].cached(1, &spec("b", 4)), None);
        // Rank 0 re-announces its (old) shape: a mismatch on both.
        let o = round(
            &mut st,
            &[l(), Local::default()],
            &[c(4), Contribution::default()],
        );
        assert!(o
            .iter()
            .all(|o| matches!(o.failed[0].2, Failure::Mismatch(..))));
    }

    #[test]
    fn join_lets_the_others_finish_and_counts_contributors() {
        let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
        let l = || Local {
            has_content: true,
            ..Default::default()
        };
        let join = Contribution {
            join: true,
            ..Default::default()
        };
        let a = Contribution {
            announce: vec![spec("g", 2)],
            ..Default::default()
        };
        // Rank 2 joins while ranks 0 and 1 announce g.
        let o = round(
            &mut st,
            &[l(), l(), l()],
            &[a.clone(), a.clone(), join.clone()],
        );
        assert!(o.iter().all(|o| o.ready.is_empty()));
        assert!(st.iter().all(|s| s.is_joined(2) && s.needs_round()));
        // The next round needs no news: g runs with two contributors, rank 2
        // standing in.
        let quiet = || Local::default();
        let none = Contribution::default;
        let o = round(
            &mut st,
            &[quiet(), quiet(), quiet()],
            &[none(), none(), none()],
        );
        for o in &o {
            assert_eq!(names(o), ["g"]);
            assert_eq!(o.ready[0].contributors, 2);
            assert_eq!(o.ready[0].specs[2], None);
        }
        // Ranks 0 and 1 join too; the round after completes the join, naming
        // the last rank to join.
        round(&mut st, &[l(), l(), quiet()], &[join.clone(), join, none()]);
        assert!(st.iter().all(State::needs_round));
        let o = round(
            &mut st,
            &[quiet(), quiet(), quiet()],
            &[none(), none(), none()],
        );
        assert!(o.iter().all(|o| o.join_done == Some(1)));
        assert!(st.iter().all(|s| !s.is_joined(0) && !s.needs_round()));
    }

    #[test]
    fn groups_wait_for_all_members() {
        let mut st: Vec<State> = (0..2).map(|_| State::new(2, 8)).collect();
        let g = |name: &str| Spec {
            group: Some(("grp".into(), 2)),
            ..spec(name, 1)
        };
        let l = || Local {
            has_content: true,
            ..Default::default()
        };
        let o = round(
            &mut st,
            &[l(), l()],
            &[
                Contribution {
                    announce: vec![g("a"), g("b")],
                    ..Default::default()
                },
                Contribution {
                    announce: vec![g("a")],
                    ..Default::default()
                },
            ],
        );
        assert!(o.iter().all(|o| o.ready.is_empty()));
        let o = round(
            &mut st,
            &[Local::default(), l()],
            &[
                Contribution::default(),
                Contribution {
                    announce: vec![g("b")],
                    ..Default::default()
                },
            ],
        );
        assert!(o.iter().all(|o| names(o) == ["a", "b"]));
    }

    #[test]
    fn census_names_missing_ranks_and_cancel_fails_them() {
        let mut st: Vec<State> = (0..3).map(|_| State::new(3, 8)).collect();
        let l = |census| Local {
            has_content: true,
            wants_census: census,
            ..Default::default()
        };
        let c = Contribution {
            announce: vec![spec("s", 1)],
            pending: Some(vec!["s".into()]),
            ..Default::default()
        };
        let quiet = Contribution {
            pending: Some(vec![]),
            ..Default::default()
        };
        let o = round(
            &mut st,
            &[l(true), l(false), Local::default()],
            &[c.clone(), c.clone(), quiet.clone()],
        );
        for o in &o {
            let s = &o.stalls.as_ref().unwrap()[0];
            assert_eq!(
                (s.name.as_str(), &s.have[..], &s.missing[..]),
                ("s", &[0, 1][..], &[2][..])
            );
        }
        let cancel = Contribution {
            pending: Some(vec!["s".into()]),
            cancel: vec!["s".into()],
            ..Default::default()
        };
        let again = Contribution {
            pending: Some(vec!["s".into()]),
            ..Default::default()
        };
        let o = round(
            &mut st,
            &[l(true), Local::default(), Local::default()],
            &[cancel, again, quiet],
        );
        for o in &o {
            assert!(
                matches!(&o.failed[0], (n, r, Failure::Stalled(_)) if &**n == "s" && r == &[0, 1])
            );
        }
        assert_eq!(st[2].waiting().count(), 0);
    }
}
