//! The engine thread: takes submissions, runs negotiation rounds with the
//! other ranks, and executes what every rank agreed on.

use super::fusion::{self, wire_op};
use super::negotiate::{self, Coll, Contribution, Failure, Local, Name, Ready, Spec, State, JOIN};
use super::timeline::Timeline;
use super::{Buffer, Kind, Msg, Request, Shared, IDLE_SLEEP};
use crate::compress::{CompressState, Compression, Prescale};
use crate::element::{as_bytes_mut, cast, cast_mut, with_dtype, DType};
use crate::error::{Error, Result};
use crate::reduce::{self, ReduceOp};
use crate::transport::Activity;
use crate::Communicator;
use crossbeam_channel::{Receiver, Sender};
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a pending tensor stands in negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// To be described in the next exchange.
    New,
    /// Described; waiting for the other ranks.
    Announced,
    /// Matches this cache slot; marked in each round's vector.
    Held(usize),
}

struct Pending {
    req: Request,
    /// When it was submitted (or taken, see [`Request::submitted`]).
    since: Instant,
    stage: Stage,
    /// Last stall report (or submission) time.
    warned: Instant,
    cancel_sent: bool,
}

/// What a full cache lookup found for one name id ([`Worker::cached`]):
/// the slot, its generation then, and what was asked for.
struct Hint {
    slot: usize,
    gen: u32,
    kind: Kind,
}

/// Names with ids past this are looked up in full every time (the list of
/// hints grows with the ids, and ids are never reused).
const HINTS_LIMIT: usize = 1 << 20;

struct JoinWait {
    reply: Sender<Result<usize>>,
    since: Instant,
    warned: Instant,
    sent: bool,
    cancel_sent: bool,
}

pub(crate) struct Worker {
    comm: Communicator,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    state: State,
    /// This rank's tensors waiting to run, by name id: a training step
    /// resubmits the same names, and an id is found without hashing or
    /// comparing the name (see [`Worker::take_ready`]).
    pending: FxHashMap<u32, Pending>,
    /// By cache slot: the id of the name last found held in it here. A
    /// round's cached tensors come back as slots, so finding this rank's
    /// tensor for one takes no lookup by name.
    slot_ids: Vec<u32>,
    /// Rounds' work lists, kept for their memory: a fresh list of a
    /// thousand tensors a step is large enough that the allocator hands it
    /// back to the system and faults new pages in for the next.
    spare_items: Vec<Item>,
    join: Option<JoinWait>,
    me: usize,
    n: usize,
    fusion_threshold: usize,
    fusion_inplace: usize,
    cycle_time: Duration,
    stall_warning: Duration,
    stall_shutdown: Option<Duration>,
    timeline: Option<Timeline>,
    /// Fusion buffer, in words so any dtype is aligned.
    fusion: Vec<i64>,
    /// Error-feedback state of top-k compressed tensors, by name.
    compress: HashMap<String, CompressState>,
    /// Something local that the other ranks have not heard about yet.
    dirty: bool,
    /// By name id: where the name's spec was last found in the cache.
    hints: Vec<Option<Hint>>,
    /// No stall report or shutdown is due before this (`None`: nothing is
    /// pending); see [`Worker::next_stall_check`].
    stall_due: Option<Instant>,
    /// When the first news since the last round arrived (for the cycle time).
    news_since: Option<Instant>,
    wants_census: bool,
    /// A submission was refused since waiters were last woken: its handle
    /// waits for a wake-up (accepted ones are woken after their round).
    refused: bool,
    cancel: Vec<String>,
    stop: bool,
    /// A coordinated shutdown was asked for: (reply, told the others yet).
    shutdown: Option<(Sender<()>, bool)>,
}

impl Worker {
    pub(crate) fn new(
        comm: Communicator,
        rx: Receiver<Msg>,
        shared: Arc<Shared>,
    ) -> Result<Worker> {
        let cfg = comm.config().clone();
        let (me, n) = (comm.rank(), comm.size());
        let timeline = match &cfg.timeline {
            Some(p) => Some(Timeline::create(p, me)?),
            None => None,
        };
        Ok(Worker {
            comm,
            rx,
            shared,
            state: State::new(n, cfg.cache_capacity),
            pending: FxHashMap::default(),
            slot_ids: Vec::new(),
            spare_items: Vec::new(),
            join: None,
            me,
            n,
            fusion_threshold: cfg.fusion_threshold,
            fusion_inplace: cfg.fusion_inplace_bytes,
            cycle_time: cfg.cycle_time,
            stall_warning: cfg.stall_warning,
            stall_shutdown: cfg.stall_shutdown,
            timeline,
            fusion: Vec::new(),
            compress: HashMap::new(),
            dirty: false,
            hints: Vec::new(),
            stall_due: None,
            news_since: None,
            wants_census: false,
            refused: false,
            cancel: Vec::new(),
            stop: false,
            shutdown: None,
        })
    }

    /// The thread body: returns the communicator when stopped.
    pub(crate) fn run(mut self) -> Communicator {
        // A bug that panics here must not leave callers waiting forever:
        // it becomes the engine's error, and every pending handle gets it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.main_loop()))
            .unwrap_or_else(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                Err(Error::Io(format!(
                    "rank {}: the engine thread panicked: {why}",
                    self.me
                )))
            });
        if let Err(e) = ran {
            *self.shared.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            self.fail_everything(&e);
        } else {
            let e = Error::InvalidArgument(format!(
                "rank {}: the engine was shut down with this tensor pending",
                self.me
            ));
            *self.shared.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            self.fail_everything(&e);
        }
        self.shared.exited.store(true, Ordering::SeqCst);
        self.shared.notify();
        self.timeline.take();
        self.comm
    }

    fn fail_everything(&mut self, e: &Error) {
        while let Ok(m) = self.rx.try_recv() {
            self.take(m);
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            p.req.reply.send(Err(e.clone()));
        }
        if let Some(j) = self.join.take() {
            let _ = j.reply.send(Err(e.clone()));
        }
    }

    fn main_loop(&mut self) -> Result<()> {
        loop {
            self.drain();
            if self.stop {
                return Ok(());
            }
            self.check_stalls(Instant::now());
            if self.dirty || self.state.needs_round() {
                self.gather()?;
                if self.stop {
                    return Ok(());
                }
                self.round()?;
                continue;
            }
            if let Some(t) = &mut self.timeline {
                t.flush();
            }
            let deadline = self
                .next_stall_check()
                .unwrap_or_else(|| Instant::now() + IDLE_SLEEP);
            // Announce the sleep before the last look at the queue, so a
            // submission either is seen here or wakes the wait.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            // Pairs with the fence in `Engine::send`: either that sender
            // sees the flag or this look sees its message.
            std::sync::atomic::fence(Ordering::SeqCst);
            if !self.rx.is_empty() {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            let woke = self.comm.wait_incoming(deadline);
            self.shared.sleeping.store(false, Ordering::SeqCst);
            if let Activity::Peer(_) = woke? {
                // A peer started a round. With nothing of this rank's waiting,
                // none of its tensors can become ready in it, but this rank's
                // own may be on their way (the peer's burst ended first): wait
                // a cycle for them, so that the step runs in this one round
                // rather than in an empty one and another.
                if self.pending.is_empty() && self.join.is_none() && self.shutdown.is_none() {
                    self.finish_burst(self.cycle_time);
                }
                self.round()?;
            }
        }
    }

    /// Wait up to the cycle time after the first news for more tensors, unless
    /// a peer starts the round first or this rank's submissions pause.
    fn gather(&mut self) -> Result<()> {
        let Some(since) = self.news_since else {
            return Ok(());
        };
        if self.n == 1 {
            // Alone, a collective costs nothing: gathering more only adds latency.
            return Ok(());
        }
        // Submissions arriving meanwhile do not wake this wait (the sleeping
        // flag stays down); it looks at the queue every `pause`, and a look
        // that finds nothing new ends the gathering: a training step hands
        // over its tensors in a burst, and waiting out the whole cycle after
        // the burst only delays the round.
        let until = since + self.cycle_time;
        let pause = self.cycle_time / 8;
        self.shared.gathering.store(true, Ordering::SeqCst);
        loop {
            let now = Instant::now();
            if now >= until || self.stop || self.burst_over() {
                break;
            }
            match self.comm.wait_incoming(until.min(now + pause))? {
                Activity::Peer(_) => {
                    // The peer waits in the round; take the rest of this
                    // burst into it first.
                    self.finish_burst(pause.min(until - now));
                    break;
                }
                Activity::Woken | Activity::Deadline => {
                    if self.rx.is_empty() {
                        break;
                    }
                    self.drain();
                }
            }
        }
        self.shared.gathering.store(false, Ordering::SeqCst);
        self.drain();
        Ok(())
    }

    /// Nothing is queued and a caller blocks waiting for a result this rank
    /// still owes: its burst of submissions is over, and waiting for more
    /// would only delay it. With nothing pending, a blocked caller is one
    /// whose results are in but who has not woken yet (its next burst is
    /// still to come): a round started then would be an empty one.
    fn burst_over(&self) -> bool {
        !self.pending.is_empty()
            && self.shared.waiters.load(Ordering::SeqCst) > 0
            && self.rx.is_empty()
    }

    /// While a peer waits for this rank in a round it started: take
    /// submissions as they come, the first within `first`, each next within
    /// a pause of an eighth of the cycle time, and none later than the cycle
    /// time after the first news. Waits on the queue, not the sockets (whose
    /// readiness is the peer's round, already known).
    fn finish_burst(&mut self, first: Duration) {
        let start = Instant::now();
        let mut wait = first;
        while !self.burst_over() {
            let Ok(m) = self.rx.recv_timeout(wait) else {
                break;
            };
            self.take(m);
            let until = self.news_since.unwrap_or(start) + self.cycle_time;
            let now = Instant::now();
            if now >= until || self.stop {
                break;
            }
            wait = (self.cycle_time / 8).min(until - now);
        }
        self.wake_refused();
    }

    fn drain(&mut self) {
        // One clock reading for what is queued now: it arrived by then.
        let now = Instant::now();
        while let Ok(m) = self.rx.try_recv() {
            self.take_at(m, now);
        }
        self.wake_refused();
    }

    /// Wake the handles of refused submissions (their answers are in). Only
    /// then: a wake-up is a system call, and drains happen many times a step.
    fn wake_refused(&mut self) {
        if std::mem::take(&mut self.refused) {
            self.shared.notify();
        }
    }

    fn take(&mut self, m: Msg) {
        self.take_at(m, Instant::now());
    }

    fn take_at(&mut self, m: Msg, now: Instant) {
        match m {
            Msg::Stop => self.stop = true,
            Msg::Shutdown(reply) => {
                self.shutdown = Some((reply, false));
                self.news(now);
            }
            Msg::Join(reply, since) => {
                if self.join.is_some() {
                    let _ = reply.send(Err(Error::InvalidArgument(format!(
                        "rank {}: join called while this rank is already joining",
                        self.me
                    ))));
                    return;
                }
                self.join = Some(JoinWait {
                    reply,
                    since,
                    warned: since,
                    sent: false,
                    cancel_sent: false,
                });
                self.due_by(self.first_due(since));
                self.news(now);
            }
            Msg::Submit(req) => self.submit(req, now),
            Msg::Group(reqs) => {
                for req in reqs {
                    self.submit(req, now);
                }
            }
        }
    }

    /// Take one tensor into `pending`, or refuse it (answered at once).
    fn submit(&mut self, req: Request, now: Instant) {
        let refuse = if self.stop || self.shutdown.is_some() {
            Some("submitted while the engine shuts down")
        } else if self.join.is_some() {
            Some("submitted after join; a joined rank submits nothing until every rank has joined")
        } else {
            None
        };
        if let Some(why) = refuse {
            let name = req.name();
            req.reply.send(Err(Error::InvalidArgument(format!(
                "rank {}: engine tensor {name:?}: {why}",
                self.me
            ))));
            self.refused = true;
            return;
        }
        let stage = match self.cached(&req) {
            Some(slot) => {
                if self.slot_ids.len() <= slot {
                    self.slot_ids.resize(slot + 1, u32::MAX);
                }
                self.slot_ids[slot] = req.id;
                Stage::Held(slot)
            }
            None => Stage::New,
        };
        let since = req.submitted.unwrap_or(now);
        self.due_by(self.first_due(since));
        self.pending.insert(
            req.id,
            Pending {
                warned: since,
                since,
                req,
                stage,
                cancel_sent: false,
            },
        );
        self.news(now);
    }

    /// When something submitted at `t` first needs a stall check.
    fn first_due(&self, t: Instant) -> Instant {
        let warn = t + self.stall_warning;
        self.stall_shutdown.map_or(warn, |s| warn.min(t + s))
    }

    /// The cache slot that holds `req`'s spec, if one does. What the last
    /// full lookup found for the name is kept by its id, with the slot's
    /// generation and the spec's fields: a training step resubmits the same
    /// specs, and checking them against that small list touches far less
    /// memory than hashing the name and comparing with the cached specs.
    fn cached(&mut self, req: &Request) -> Option<usize> {
        let (id, kind) = (req.id as usize, &req.kind);
        if let Some(Some(h)) = self.hints.get(id) {
            if h.kind == *kind && self.state.generation(h.slot) == Some(h.gen) {
                return Some(h.slot);
            }
        }
        let slot = self.state.cached(self.me, &req.spec())?;
        // Group members and compressed tensors are looked up in full.
        let plain = kind.group.is_none() && kind.compression.is_empty();
        if plain && id < HINTS_LIMIT {
            if self.hints.len() <= id {
                self.hints.resize_with(id + 1, || None);
            }
            self.hints[id] = Some(Hint {
                slot,
                gen: self.state.generation(slot)?,
                kind: kind.clone(),
            });
        }
        Some(slot)
    }

    fn news(&mut self, now: Instant) {
        self.dirty = true;
        self.news_since.get_or_insert(now);
    }

    /// The next time a stall report or shutdown may be due: kept, not
    /// computed per look, since a look at every pending tensor costs a cache
    /// miss or two each, hundreds of times a step. No action is due before
    /// it; entries leaving only make it early (one scan too many).
    fn next_stall_check(&self) -> Option<Instant> {
        self.stall_due
    }

    /// Something new can become due at `due`.
    fn due_by(&mut self, due: Instant) {
        self.stall_due = Some(self.stall_due.map_or(due, |d| d.min(due)));
    }

    /// Scan every pending tensor for the earliest stall action.
    fn scan_stall_due(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.pending.values() {
            consider(p.warned + self.stall_warning);
            if let Some(s) = self.stall_shutdown {
                if !p.cancel_sent {
                    consider(p.since + s);
                }
            }
        }
        if let Some(j) = &self.join {
            consider(j.warned + self.stall_warning);
            if let Some(s) = self.stall_shutdown {
                if !j.cancel_sent {
                    consider(j.since + s);
                }
            }
        }
        next
    }

    /// Ask for a census when something has waited past the warning time, and
    /// give up on what has waited past the shutdown time.
    fn check_stalls(&mut self, now: Instant) {
        if !self.stall_due.is_some_and(|d| now >= d) {
            return;
        }
        let (warn, shut) = (self.stall_warning, self.stall_shutdown);
        let mut census = false;
        for p in self.pending.values_mut() {
            if now >= p.warned + warn {
                p.warned = now;
                census = true;
            }
            if let Some(s) = shut {
                if !p.cancel_sent && now >= p.since + s {
                    p.cancel_sent = true;
                    self.cancel.push(p.req.name().to_string());
                    census = true;
                }
            }
        }
        if let Some(j) = &mut self.join {
            if now >= j.warned + warn {
                j.warned = now;
                census = true;
            }
            if let Some(s) = shut {
                if !j.cancel_sent && now >= j.since + s {
                    j.cancel_sent = true;
                    self.cancel.push(JOIN.to_string());
                    census = true;
                }
            }
        }
        if census {
            self.wants_census = true;
            self.dirty = true;
        }
        self.stall_due = self.scan_stall_due();
    }

    /// One negotiation round, then run what became ready.
    fn round(&mut self) -> Result<()> {
        let held: Vec<usize> = self
            .pending
            .values()
            .filter_map(|p| match p.stage {
                Stage::Held(s) => Some(s),
                _ => None,
            })
            .collect();
        let mut announce: Vec<Spec> = self
            .pending
            .values()
            .filter(|p| p.stage == Stage::New)
            .map(|p| p.req.spec())
            .collect();
        announce.sort_by(|a, b| a.name.cmp(&b.name));
        let join_now = self.join.as_ref().is_some_and(|j| !j.sent);
        let stop_now = self.shutdown.as_ref().is_some_and(|s| !s.1);
        let local = Local {
            has_content: !announce.is_empty() || join_now || stop_now || !self.cancel.is_empty(),
            wants_census: self.wants_census,
            held,
        };
        let mine = self.state.vector(self.me, &local);
        // Gathered over the ring and summed here, rather than allreduced:
        // the ranks not starting this round sleep until bytes reach them,
        // and in a ring every rank's first step is to receive from its left
        // neighbour, so the wake-up travels round the ring. (Recursive
        // doubling would leave a folded-out rank, which only sends at first,
        // asleep.)
        // Each entry is a flag: it travels as one bit (1000 cached tensors
        // are 125 bytes a rank, not 4 KB) and is counted here.
        let bits = negotiate::pack_flags(&mine);
        let mut all = vec![0u8; bits.len() * self.n];
        self.comm.allgather(&bits, &mut all)?;
        let v = negotiate::count_flags(&all, self.n, mine.len());
        let contribs = if State::exchange_needed(&v) {
            let mut pending: Option<Vec<String>> = None;
            if State::census_needed(&v) {
                let mut names: Vec<String> = self
                    .pending
                    .values()
                    .map(|p| p.req.name().to_string())
                    .collect();
                if self.join.is_some() {
                    names.push(JOIN.to_string());
                }
                names.sort();
                pending = Some(names);
            }
            let mine = Contribution {
                announce,
                join: join_now,
                pending,
                cancel: std::mem::take(&mut self.cancel),
                stop: stop_now,
            };
            if let Some(s) = &mut self.shutdown {
                s.1 = true;
            }
            for p in self.pending.values_mut() {
                if p.stage == Stage::New {
                    p.stage = Stage::Announced;
                }
            }
            if let Some(j) = &mut self.join {
                j.sent = true;
            }
            Some(self.exchange(&mine)?)
        } else {
            None
        };
        self.dirty = false;
        self.news_since = None;
        self.wants_census = false;
        let out = self.state.apply(&v, contribs.as_deref());
        let decided = Instant::now();

        let ids = if out.evicted.is_empty() && out.failed.is_empty() {
            FxHashMap::default()
        } else {
            self.ids_by_name()
        };
        for name in &out.evicted {
            if let Some(p) = ids.get(&**name).and_then(|id| self.pending.get_mut(id)) {
                if matches!(p.stage, Stage::Held(_)) {
                    p.stage = Stage::New;
                    self.dirty = true;
                }
            }
        }
        for (name, ranks, f) in &out.failed {
            if !ranks.contains(&self.me) {
                continue;
            }
            let Some(p) = ids.get(&**name).and_then(|id| self.pending.remove(id)) else {
                continue;
            };
            let e = self.failure_error(name, f, &p);
            p.req.reply.send(Err(e));
        }
        if let Some(stalls) = &out.stalls {
            for s in stalls {
                eprintln!(
                    "kolo engine: rank {}: stall: {} submitted by ranks {:?}, not by ranks {:?}",
                    self.me,
                    if s.name == JOIN {
                        "join".to_string()
                    } else {
                        format!("tensor {:?}", s.name)
                    },
                    s.have,
                    s.missing
                );
            }
        }
        if out.join_cancelled.contains(&self.me) {
            if let Some(j) = self.join.take() {
                let _ = j.reply.send(Err(Error::Timeout {
                    rank: self.me,
                    op: "engine join".into(),
                    waited: j.since.elapsed(),
                    detail: "not every rank joined within KOLO_STALL_SHUTDOWN_S".into(),
                    hung: None,
                }));
            }
        }
        let ran = self.execute(out.ready, decided);
        self.shared.notify();
        ran?;
        if let Some(last) = out.join_done {
            if let Some(j) = self.join.take() {
                let _ = j.reply.send(Ok(last));
            }
        }
        if out.stop {
            // Every rank stops after this same round, so no engine is left
            // to mistake the next blocking collective for a round.
            self.stop = true;
            if let Some((reply, _)) = self.shutdown.take() {
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    fn failure_error(&self, name: &str, f: &Failure, p: &Pending) -> Error {
        match f {
            Failure::Mismatch(a, b, text) => Error::Mismatch {
                rank: self.me,
                peer: if *a == self.me { *b } else { *a },
                op: format!("engine tensor {name:?}"),
                detail: text.clone(),
            },
            // This rank is the late one: the others gave up on the step.
            Failure::Stalled(s) if s.missing.contains(&self.me) => Error::Mismatch {
                rank: self.me,
                peer: s.have.first().copied().unwrap_or(self.me),
                op: format!("engine tensor {name:?}"),
                detail: format!(
                    "rank {} submitted it late, for the step ranks {:?} gave up on \
                     (KOLO_STALL_SHUTDOWN_S); it fails rather than be combined with \
                     their next step's {name:?}, which pairs with this rank's next one",
                    self.me, s.have
                ),
            },
            Failure::Stalled(s) => Error::Timeout {
                rank: self.me,
                op: format!("engine tensor {name:?}"),
                waited: p.since.elapsed(),
                detail: format!(
                    "stalled: submitted by ranks {:?} but never by ranks {:?} \
                     (KOLO_STALL_SHUTDOWN_S)",
                    s.have, s.missing
                ),
                hung: (s.missing.len() == 1).then(|| s.missing[0]),
            },
            Failure::Invalid(m) | Failure::Joined(m) => {
                Error::InvalidArgument(format!("rank {}: engine: {m}", self.me))
            }
        }
    }

    /// Everyone's contribution, in rank order.
    fn exchange(&mut self, mine: &Contribution) -> Result<Vec<Contribution>> {
        let bytes =
            serde_json::to_vec(mine).map_err(|e| Error::Io(format!("encode negotiation: {e}")))?;
        let mut lens = vec![0i64; self.n];
        self.comm.allgather(&[bytes.len() as i64], &mut lens)?;
        let counts: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        let mut all = vec![0u8; counts.iter().sum()];
        self.comm.allgatherv(&bytes, &mut all, &counts)?;
        let mut out = Vec::with_capacity(self.n);
        let mut at = 0;
        for (r, &c) in counts.iter().enumerate() {
            let cb: Contribution =
                serde_json::from_slice(&all[at..at + c]).map_err(|e| Error::Protocol {
                    rank: self.me,
                    peer: r,
                    detail: format!("malformed engine negotiation message: {e}"),
                })?;
            out.push(cb);
            at += c;
        }
        Ok(out)
    }

    /// Run the agreed tensors: allreduces in fusion batches, then the rest in
    /// order. On a collective failure, every tensor of this round fails too.
    fn execute(&mut self, ready: Vec<Ready>, decided: Instant) -> Result<()> {
        if ready.is_empty() {
            return Ok(());
        }
        let mut items = std::mem::take(&mut self.spare_items);
        items.clear();
        items.reserve(ready.len());
        let mut by_name = None;
        for r in ready {
            let local = self.take_ready(&r, &mut by_name);
            let name = &r.spec().name;
            if let (Some(tl), Some(p)) = (&mut self.timeline, &local) {
                tl.span(name, "NEGOTIATE", p.since, decided, None);
            }
            if local.is_none() && !(self.state_was_joined() && r.spec().coll == Coll::Allreduce) {
                // Cannot happen when every rank runs the same state machine.
                let e = Error::Protocol {
                    rank: self.me,
                    peer: self.me,
                    detail: format!(
                        "engine agreed to run {name:?}, which this rank never submitted"
                    ),
                };
                fail_items(items, &e);
                return Err(e);
            }
            items.push(Item { ready: r, local });
        }
        let batches = fusion::plan(
            items.iter().map(|i| i.ready.spec()),
            self.fusion_threshold,
            self.fusion_inplace,
        );
        let mut results: Vec<Option<Done>> = (0..items.len()).map(|_| None).collect();
        let mut fatal: Option<Error> = None;
        for b in &batches {
            if let Err(e) = self.run_batch(&mut items, b, decided) {
                fatal = Some(e);
                break;
            }
            for &i in &b.members {
                results[i] = Some(Done::InPlace);
            }
        }
        if fatal.is_none() {
            for i in 0..items.len() {
                if items[i].ready.spec().coll == Coll::Allreduce {
                    continue;
                }
                match self.run_other(&mut items[i], decided) {
                    Ok(r) => results[i] = Some(Done::Output(r)),
                    Err(e) => {
                        fatal = Some(e);
                        break;
                    }
                }
            }
        }

        for (i, item) in items.drain(..).enumerate() {
            let Some(p) = item.local else { continue };
            let name = p.req.name();
            let r = match (&fatal, results[i].take()) {
                (_, Some(Done::InPlace)) => Ok(p.req.buf),
                (_, Some(Done::Output(r))) => r,
                (Some(e), None) => Err(e.clone()),
                (None, None) => Err(Error::Protocol {
                    rank: self.me,
                    peer: self.me,
                    detail: format!("engine tensor {name:?} was not run"),
                }),
            };
            p.req.reply.send(r);
        }
        self.spare_items = items;
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// This rank's pending tensor for a ready one: found through its cache
    /// slot when it was held in one, else by name (tensors negotiated in
    /// this round), through `by_name`, made on the first such lookup.
    fn take_ready(
        &mut self,
        r: &Ready,
        by_name: &mut Option<FxHashMap<Name, u32>>,
    ) -> Option<Pending> {
        if let Some(s) = r.slot {
            if let Some(&id) = self.slot_ids.get(s) {
                if self
                    .pending
                    .get(&id)
                    .is_some_and(|p| p.stage == Stage::Held(s))
                {
                    return self.pending.remove(&id);
                }
            }
        }
        let ids = by_name.get_or_insert_with(|| self.ids_by_name());
        let id = ids.remove(&r.spec().name)?;
        self.pending.remove(&id)
    }

    /// Pending tensors' ids by name, for the rare lookups by name (made when
    /// needed, so that the common path keeps no such map).
    fn ids_by_name(&self) -> FxHashMap<Name, u32> {
        self.pending
            .iter()
            .map(|(&id, p)| (p.req.name().clone(), id))
            .collect()
    }

    /// Whether this rank stood in for missing tensors in the round just run.
    fn state_was_joined(&self) -> bool {
        // The join flag is cleared when every rank's join completes, which
        // happens after this round's tensors ran; a joined rank's `join`
        // wait is still set here.
        self.join.as_ref().is_some_and(|j| j.sent)
    }

    fn run_batch(&mut self, items: &mut [Item], b: &fusion::Batch, decided: Instant) -> Result<()> {
        let first = items[b.members[0]].ready.spec().clone();
        let dtype = dtype_of(&first)?;
        let op = ReduceOp::from_code(first.op).unwrap_or(ReduceOp::Sum);
        let wire = wire_op(op);
        let started = Instant::now();
        let algo = self.comm.allreduce_algo(b.bytes).name();
        let alone = b.members.len() == 1;
        if alone {
            let it = &mut items[b.members[0]];
            let mut identity;
            let bytes: &mut [u8] = match &mut it.local {
                Some(p) => p.req.buf.bytes_mut(),
                None => {
                    identity = vec![0i64; b.bytes.div_ceil(8)];
                    let s = &mut as_bytes_mut(&mut identity)[..b.bytes];
                    reduce::fill_identity(dtype, wire, s);
                    s
                }
            };
            let name = &*it.ready.spec().name;
            let contributors = it.ready.contributors.max(1);
            if first.compression.is_empty() {
                // An average is divided inside the collective, where its
                // values form.
                self.comm
                    .allreduce_parts_bytes(dtype, &mut [bytes], op, None, contributors)?;
            } else {
                reduce_maybe_compressed(
                    &self.comm,
                    &mut self.compress,
                    dtype,
                    bytes,
                    wire,
                    &first.compression,
                    Some(name),
                )?;
                if op == ReduceOp::Avg {
                    reduce::divide_bytes(dtype, bytes, contributors);
                }
            }
        } else {
            // Tensors of at least IN_PLACE_MIN bytes are reduced in their own
            // memory (one allreduce over the list of them); smaller ones, and
            // a joined rank's stand-ins, are staged in the fusion buffer, where
            // neighbours form one part. Compressed batches stage everything.
            let compressed = !first.compression.is_empty();
            // Averages over the same ranks are divided inside the collective
            // (once, where each value forms); a batch mixing them with sums,
            // or with other contributor counts, divides tensor by tensor.
            let contributors = items[b.members[0]].ready.contributors.max(1);
            let inside = !compressed
                && b.members.iter().all(|&i| {
                    let r = &items[i].ready;
                    ReduceOp::from_code(r.spec().op) == Some(ReduceOp::Avg)
                        && r.contributors.max(1) == contributors
                });
            let (batch_op, divisor) = if inside {
                (ReduceOp::Avg, contributors)
            } else {
                (wire, 1)
            };
            let lens: Vec<usize> = b
                .members
                .iter()
                .map(|&i| items[i].ready.spec().count() as usize * dtype.size())
                .collect();
            let staged: Vec<bool> = b
                .members
                .iter()
                .zip(&lens)
                .map(|(&i, &len)| compressed || len < IN_PLACE_MIN || items[i].local.is_none())
                .collect();
            let stage_bytes: usize = lens
                .iter()
                .zip(&staged)
                .filter(|p| *p.1)
                .map(|p| *p.0)
                .sum();
            let words = stage_bytes.div_ceil(8);
            if self.fusion.len() < words {
                self.fusion.resize(words, 0);
            }
            let fusion = &mut as_bytes_mut(&mut self.fusion)[..stage_bytes];
            let mut at = 0;
            for (k, &i) in b.members.iter().enumerate() {
                if !staged[k] {
                    continue;
                }
                let dst = &mut fusion[at..at + lens[k]];
                match &items[i].local {
                    Some(p) => dst.copy_from_slice(p.req.buf.bytes()),
                    None => reduce::fill_identity(dtype, wire, dst),
                }
                at += lens[k];
            }
            let copied = Instant::now();
            if compressed {
                reduce_maybe_compressed(
                    &self.comm,
                    &mut self.compress,
                    dtype,
                    fusion,
                    wire,
                    &first.compression,
                    None,
                )?;
            } else {
                // The parts in member order: members are increasing indices,
                // so one pass over the items lends each buffer once.
                debug_assert!(b.members.windows(2).all(|w| w[0] < w[1]));
                let mut parts: Vec<&mut [u8]> = Vec::with_capacity(b.members.len());
                let mut rest: &mut [u8] = fusion;
                let mut run = 0;
                let mut k = 0;
                for (i, it) in items.iter_mut().enumerate() {
                    if k == b.members.len() {
                        break;
                    }
                    if b.members[k] != i {
                        continue;
                    }
                    if staged[k] {
                        run += lens[k];
                    } else {
                        if run > 0 {
                            let (head, tail) = std::mem::take(&mut rest).split_at_mut(run);
                            parts.push(head);
                            rest = tail;
                            run = 0;
                        }
                        let p = it.local.as_mut().expect("in-place members are local");
                        parts.push(p.req.buf.bytes_mut());
                    }
                    k += 1;
                }
                if run > 0 {
                    parts.push(rest);
                }
                self.comm
                    .allreduce_parts_bytes(dtype, &mut parts, batch_op, None, divisor)?;
            }
            let reduced = Instant::now();
            let fusion = &as_bytes_mut(&mut self.fusion)[..stage_bytes];
            let mut at = 0;
            for (k, &i) in b.members.iter().enumerate() {
                let it = &mut items[i];
                let from = at;
                if staged[k] {
                    at += lens[k];
                }
                let Some(p) = &mut it.local else {
                    // A joined rank's stand-in needs no result.
                    continue;
                };
                // Divide after the copy, while the tensor is in cache.
                let dst = p.req.buf.bytes_mut();
                if staged[k] {
                    dst.copy_from_slice(&fusion[from..at]);
                }
                if !inside && ReduceOp::from_code(it.ready.spec().op) == Some(ReduceOp::Avg) {
                    reduce::divide_bytes(dtype, dst, it.ready.contributors.max(1));
                }
            }
            let done = Instant::now();
            if let Some(tl) = &mut self.timeline {
                let in_place = staged.iter().filter(|&&s| !s).count();
                for &i in &b.members {
                    let name = &items[i].ready.spec().name;
                    tl.span(name, "QUEUE", decided, started, None);
                    tl.span(name, "COPY_IN", started, copied, None);
                    tl.span(
                        name,
                        "ALLREDUCE",
                        copied,
                        reduced,
                        Some(serde_json::json!({"algorithm": algo, "bytes": b.bytes, "fused": b.members.len(), "in_place": in_place})),
                    );
                    tl.span(name, "COPY_OUT", reduced, done, None);
                }
            }
            return Ok(());
        }
        let done = Instant::now();
        if let Some(tl) = &mut self.timeline {
            let name = &items[b.members[0]].ready.spec().name;
            tl.span(name, "QUEUE", decided, started, None);
            tl.span(
                name,
                "ALLREDUCE",
                started,
                done,
                Some(serde_json::json!({"algorithm": algo, "bytes": b.bytes, "fused": 1})),
            );
        }
        Ok(())
    }

    /// A broadcast, allgather, reduce-scatter or alltoall. Argument errors
    /// that follow from the agreed spec fail the tensor on every rank alike.
    fn run_other(&mut self, it: &mut Item, decided: Instant) -> Result<Result<Box<dyn Buffer>>> {
        let spec = it.ready.spec().clone();
        let dtype = dtype_of(&spec)?;
        let n = self.n;
        let count = spec.count() as usize;
        let invalid = |m: String| {
            Ok(Err(Error::InvalidArgument(format!(
                "rank {}: engine tensor {:?}: {m}",
                self.me, spec.name
            ))))
        };
        let Some(p) = it.local.as_mut() else {
            return invalid("this rank has no data for it".into());
        };
        let started = Instant::now();
        let out: Box<dyn Buffer> = match spec.coll {
            Coll::Allreduce => unreachable!("allreduces run in batches"),
            Coll::Broadcast => {
                if spec.root as usize >= n {
                    return invalid(format!(
                        "broadcast root {} is not below size {n}",
                        spec.root
                    ));
                }
                let buf = p.req.buf.bytes_mut();
                with_dtype!(dtype, T => self.comm.broadcast(cast_mut::<T>(buf).ok_or_else(misaligned)?, spec.root as usize))?;
                std::mem::replace(&mut p.req.buf, Box::new(()))
            }
            Coll::Allgather => {
                let counts: Vec<usize> = it
                    .ready
                    .specs
                    .iter()
                    .map(|s| s.as_ref().map_or(0, |s| s.count() as usize))
                    .collect();
                let mut out = p.req.buf.alloc(counts.iter().sum());
                let send = p.req.buf.bytes();
                with_dtype!(dtype, T => self.comm.allgatherv(
                    cast::<T>(send).ok_or_else(misaligned)?,
                    cast_mut::<T>(out.bytes_mut()).ok_or_else(misaligned)?,
                    &counts,
                ))?;
                out
            }
            Coll::ReduceScatter | Coll::Alltoall => {
                if count % n != 0 {
                    return invalid(format!(
                        "{} of {count} elements: not a multiple of the size {n}",
                        spec.coll.name()
                    ));
                }
                let reduce_scatter = spec.coll == Coll::ReduceScatter;
                let mut out = p
                    .req
                    .buf
                    .alloc(if reduce_scatter { count / n } else { count });
                let send = p.req.buf.bytes();
                let op = ReduceOp::from_code(spec.op).unwrap_or(ReduceOp::Sum);
                if reduce_scatter {
                    with_dtype!(dtype, T => self.comm.reduce_scatter(
                        cast::<T>(send).ok_or_else(misaligned)?,
                        cast_mut::<T>(out.bytes_mut()).ok_or_else(misaligned)?,
                        op,
                    ))?;
                } else {
                    with_dtype!(dtype, T => self.comm.alltoall(
                        cast::<T>(send).ok_or_else(misaligned)?,
                        cast_mut::<T>(out.bytes_mut()).ok_or_else(misaligned)?,
                    ))?;
                }
                out
            }
        };
        if let Some(tl) = &mut self.timeline {
            tl.span(&spec.name, "QUEUE", decided, started, None);
            tl.span(
                &spec.name,
                &spec.coll.name().to_uppercase(),
                started,
                Instant::now(),
                Some(serde_json::json!({"bytes": count * dtype.size(), "fused": 1})),
            );
        }
        Ok(Ok(out))
    }
}

struct Item {
    ready: Ready,
    local: Option<Pending>,
}

/// What running one item of a round produced.
enum Done {
    /// An allreduce: the result is in the submitted buffer.
    InPlace,
    /// Another collective: its output (or an argument error of the spec).
    Output(Result<Box<dyn Buffer>>),
}

fn fail_items(items: Vec<Item>, e: &Error) {
    for it in items {
        if let Some(p) = it.local {
            p.req.reply.send(Err(e.clone()));
        }
    }
}

fn misaligned() -> Error {
    Error::InvalidArgument("engine buffer is not aligned for its dtype".into())
}

fn dtype_of(s: &Spec) -> Result<DType> {
    DType::from_code(s.dtype)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown dtype code {}", s.dtype)))
}

/// A plain allreduce, or a compressed one: top-k keeps its state under the
/// tensor's name; a fused fp16/bf16 batch uses a fresh state. Sums are
/// pre-scaled by 1/N on the 16-bit wire (and scaled back in f32), so N large
/// values cannot overflow it; averages are divided afterwards.
fn reduce_maybe_compressed(
    comm: &Communicator,
    states: &mut HashMap<String, CompressState>,
    dtype: DType,
    bytes: &mut [u8],
    op: ReduceOp,
    compression: &str,
    name: Option<&str>,
) -> Result<()> {
    if compression.is_empty() {
        return run_allreduce(comm, dtype, bytes, op);
    }
    let c = Compression::parse(compression)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown compression {compression:?}")))?;
    let vals = cast_mut::<f32>(bytes).ok_or_else(misaligned)?;
    let mut fresh = CompressState::new();
    let state = match name {
        Some(n) => states.entry(n.to_string()).or_default(),
        None => &mut fresh,
    };
    state.prescale = Prescale::On;
    comm.allreduce_compressed(vals, op, &c, state).map(|_| ())
}

fn run_allreduce(comm: &Communicator, dtype: DType, bytes: &mut [u8], op: ReduceOp) -> Result<()> {
    with_dtype!(dtype, T => comm.allreduce(cast_mut::<T>(bytes).ok_or_else(misaligned)?, op))
}

/// Fused tensors at least this big are reduced in their own memory rather
/// than copied into the fusion buffer and back: below it, the per-part costs
/// of vectored I/O and of reducing piece by piece exceed a copy's.
const IN_PLACE_MIN: usize = 1024;

/// A unit buffer stands in for an output that went back to the caller.
impl Buffer for () {
    fn dtype(&self) -> DType {
        DType::U8
    }
    fn bytes(&self) -> &[u8] {
        &[]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut []
    }
    fn alloc(&self, elems: usize) -> Box<dyn Buffer> {
        Box::new(vec![0u8; elems])
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}
