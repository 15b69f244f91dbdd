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

mod flags;
mod shape;
pub use flags::{count_flags, pack_flags};
pub use shape::Shape;

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
    /// A stall shutdown: ranks that never submitted it. A rank among the
    /// missing gets it too, for its late submission of the cancelled step.
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
    /// Ranks already told about `error`; a failed entry goes once every
    /// rank that has not joined is. A stall fence starts with the ranks it
    /// failed, which have announced nothing of the next step yet.
    told: Vec<bool>,
    /// Further announcements of cancelled steps still to come from an
    /// untold rank (late past more than one stall shutdown); each fails.
    owed: Vec<u32>,
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

    /// Names in the table: announced by some rank and not yet run, or
    /// failed and still fenced until every rank has been told.
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

        let (census, cancels) = match contribs {
            Some(contribs) => self.take(contribs, summed[1] > 0, &mut out),
            None => (None, Vec::new()),
        };

        // Announced tensors: failures, and those every rank now has.
        let mut table_ready: Vec<Name> = Vec::new();
        for (name, e) in self.table.iter_mut() {
            let announced: Vec<usize> = (0..n).filter(|&r| e.specs[r].is_some()).collect();
            if let Some(f) = &e.error {
                let new: Vec<usize> = announced.iter().copied().filter(|&r| !e.told[r]).collect();
                for &r in &new {
                    if e.owed[r] > 0 {
                        // Another of its old steps is still to come.
                        e.owed[r] -= 1;
                        e.specs[r] = None;
                    } else {
                        e.told[r] = true;
                    }
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
        // A failed entry is kept until every rank has been told, so that a
        // rank arriving late gets the error too; joined ranks never will.
        self.table
            .retain(|_, e| e.error.is_none() || (0..n).any(|r| !e.told[r] && !joined_at_start[r]));
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

        let kept = whole_groups(ready);
        let kept_names: BTreeSet<Name> = if census.is_some() {
            kept.iter().map(|r| r.spec().name.clone()).collect()
        } else {
            BTreeSet::new()
        };
        self.commit(&kept);
        out.ready = kept;

        if let Some(census) = census {
            self.settle_stalls(&census, &cancels, &kept_names, &joined_at_start, &mut out);
        }

        if self.stopping.iter().all(|&s| s) {
            out.stop = true;
            self.stopping = vec![false; n];
        }

        // Joins: once every rank had joined at the start of a round, whatever
        // could run has run; what is left can never complete.
        if all_joined {
            self.end_joins(&mut out);
        }
        out
    }

    /// Take the exchanged contributions, in rank order: announcements (held
    /// back behind a failure the rank was told of), stops, joins, census
    /// lists (when `want_census`) and cancels.
    fn take(
        &mut self,
        contribs: &[Contribution],
        want_census: bool,
        out: &mut Outcome,
    ) -> (Option<Census>, Vec<(usize, String)>) {
        let mut census = want_census.then(Census::new);
        let mut cancels = Vec::new();
        for (r, cb) in contribs.iter().enumerate() {
            for s in &cb.announce {
                let told_failure = self
                    .table
                    .get(&s.name)
                    .is_some_and(|e| e.error.is_some() && e.told[r]);
                if told_failure {
                    self.deferred.push((r, s.clone()));
                } else {
                    self.announce(r, s, out);
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
        (census, cancels)
    }

    /// Announced tensors leave the table and enter the cache.
    fn commit(&mut self, kept: &[Ready]) {
        for r in kept {
            let name = &r.spec().name;
            if self.table.remove(name).is_some() && self.capacity > 0 && r.contributors == self.n {
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
    }

    /// After a census: who is missing what (into `out.stalls`), and the
    /// stall shutdown cancels of names still stalled.
    fn settle_stalls(
        &mut self,
        census: &Census,
        cancels: &[(usize, String)],
        kept_names: &BTreeSet<Name>,
        joined_at_start: &[bool],
        out: &mut Outcome,
    ) {
        let mut stalls = Vec::new();
        for (name, have) in census {
            // A joined rank counts as present for a join and stands in
            // for allreduces.
            let present = |r: usize| {
                have.contains(&r)
                    || (name == JOIN && self.joined[r])
                    || (name != JOIN && self.is_allreduce(name) && joined_at_start[r])
            };
            let missing: Vec<usize> = (0..self.n).filter(|&r| !present(r)).collect();
            if !missing.is_empty() && !kept_names.contains(name.as_str()) {
                stalls.push(Stall {
                    name: name.clone(),
                    have: have.iter().copied().collect(),
                    missing,
                });
            }
        }
        for (r, name) in cancels {
            if let Some(st) = stalls.iter().find(|s| &s.name == name) {
                if name == JOIN {
                    if self.joined[*r] {
                        self.joined[*r] = false;
                        out.join_cancelled.push(*r);
                    }
                } else if !out.failed.iter().any(|(f, _, _)| **f == **name) {
                    self.fence(st, out);
                }
            }
        }
        out.stalls = Some(stalls);
    }

    /// Every rank had joined: the joins complete, and what is left in the
    /// table fails.
    fn end_joins(&mut self, out: &mut Outcome) {
        let n = self.n;
        // Failed entries have told every rank that announced them.
        let table = std::mem::take(&mut self.table);
        for (name, e) in table.into_iter().filter(|(_, e)| e.error.is_none()) {
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

    /// Enter rank `r`'s announcement of `s` into the table, noting a
    /// disagreement with an earlier rank's spec as the entry's failure.
    fn announce(&mut self, r: usize, s: &Spec, out: &mut Outcome) {
        let n = self.n;
        self.evict(&s.name, out);
        let e = self.table.entry(s.name.clone()).or_insert_with(|| Entry {
            specs: vec![None; n],
            error: None,
            told: vec![false; n],
            owed: vec![0; n],
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

    /// Drop `name`'s cache entry, if it has one: ranks that hold it in
    /// cached form must announce it.
    fn evict(&mut self, name: &Name, out: &mut Outcome) {
        if let Some(slot) = self.index.remove(name) {
            self.cache[slot] = None;
            self.gens[slot] = self.gens[slot].wrapping_add(1);
            out.evicted.push(name.clone());
        }
    }

    /// Fail `stall`'s tensor on the ranks that have it (a stall shutdown) and
    /// fence the name as a mismatch does: its entry stays, failed, until
    /// every missing rank has announced the name, so that a late rank's
    /// submission of the cancelled step fails on that rank instead of
    /// pairing with the others' next one. The name leaves the cache, where
    /// the late rank would otherwise hold it.
    fn fence(&mut self, stall: &Stall, out: &mut Outcome) {
        let name: Name = stall.name.as_str().into();
        self.evict(&name, out);
        // Submissions held back by an earlier failure of the name fail now.
        self.deferred
            .retain(|(r, s)| s.name != name || !stall.have.contains(r));
        let n = self.n;
        let e = self.table.entry(name.clone()).or_insert_with(|| Entry {
            specs: vec![None; n],
            error: None,
            told: vec![false; n],
            owed: vec![0; n],
        });
        // A missing rank owes one more old step: the first if it was told
        // of the earlier failure, another if it still owes that one.
        let fenced = e.error.is_some();
        for &r in &stall.missing {
            if e.told[r] {
                e.told[r] = false;
                e.specs[r] = None;
            } else if fenced {
                e.owed[r] = e.owed[r].saturating_add(1);
            }
        }
        for &r in &stall.have {
            e.told[r] = true;
            e.owed[r] = 0;
        }
        let f = Failure::Stalled(stall.clone());
        e.error.get_or_insert_with(|| f.clone());
        out.failed.push((name, stall.have.clone(), f));
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

/// Ready tensors less the members of groups not all ready: members run
/// only together.
fn whole_groups(ready: Vec<Ready>) -> Vec<Ready> {
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
    ready
        .into_iter()
        .zip(keep)
        .filter_map(|(r, k)| k.then_some(r))
        .collect()
}

/// A round's census: each pending name and the ranks that have it.
type Census = BTreeMap<String, BTreeSet<usize>>;

#[cfg(test)]
mod tests;
