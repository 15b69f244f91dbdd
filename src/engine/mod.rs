//! Asynchronous named collectives, as Horovod runs them: training code hands
//! tensors to an [`Engine`] under names, in whatever order its ranks produce
//! them; a background thread agrees with the other ranks on which names every
//! rank has submitted ([`negotiate`]), packs ready allreduces into fusion
//! buffers ([`fusion`]), runs them on the [`Communicator`] and hands the
//! results back through [`Handle`]s.
//!
//! The thread sleeps until a tensor is submitted or a peer starts a round; it
//! has no polling clock. `KOLO_CYCLE_TIME_MS` only bounds how long it waits
//! for more tensors after the first. Negotiated tensors are cached, so a
//! repeated training step agrees by one small allreduce per round.
//!
//! ```no_run
//! use kolo::engine::Engine;
//! use kolo::{Communicator, ReduceOp};
//! let engine = Engine::start(Communicator::from_env()?)?;
//! let a = engine.allreduce_async("layer1.weight", vec![1.0f32; 1000], ReduceOp::Avg)?;
//! let b = engine.allreduce_async("layer1.bias", vec![1.0f32; 10], ReduceOp::Avg)?;
//! let (a, b) = (a.wait()?, b.wait()?);
//! # Ok::<(), kolo::Error>(())
//! ```

pub mod fusion;
pub mod negotiate;
pub mod timeline;
mod worker;

use crate::element::{as_bytes, as_bytes_mut, DType, Element};
use crate::error::{Error, Result};
use crate::{Communicator, ReduceOp};
use crossbeam_channel::Sender;
use negotiate::{Coll, Name, Shape, Spec};
use rustc_hash::FxHashMap;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A buffer the engine can reduce or fill: a `Vec<T>` of an [`Element`] type,
/// or caller-owned memory ([`Engine::allreduce_async_raw`]).
pub trait Buffer: Send + 'static {
    /// Element type.
    fn dtype(&self) -> DType;
    /// The elements as bytes.
    fn bytes(&self) -> &[u8];
    /// The elements as mutable bytes.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// A zeroed buffer of the same kind holding `elems` elements.
    fn alloc(&self, elems: usize) -> Box<dyn Buffer>;
    /// For [`Handle::wait`] to hand back the concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Element + Default> Buffer for Vec<T> {
    fn dtype(&self) -> DType {
        T::DTYPE
    }
    fn bytes(&self) -> &[u8] {
        as_bytes(self)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        as_bytes_mut(self)
    }
    fn alloc(&self, elems: usize) -> Box<dyn Buffer> {
        Box::new(vec![T::default(); elems])
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Memory owned by the caller (C ABI, framework tensors). The engine writes
/// the result into it in place.
struct Raw {
    ptr: *mut u8,
    len: usize,
    dtype: DType,
}

// SAFETY: the caller of `allreduce_async_raw` promises the memory stays valid
// and untouched until the handle completes; only the engine thread uses it.
unsafe impl Send for Raw {}

impl Buffer for Raw {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: see `allreduce_async_raw`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: see `allreduce_async_raw`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn alloc(&self, elems: usize) -> Box<dyn Buffer> {
        Box::new(vec![0i64; (elems * self.dtype.size()).div_ceil(8)])
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        Box::new(())
    }
}

/// One submitted tensor, on its way to the engine thread. Its name is in
/// its reply slot rather than here: a copy of the shared name would be
/// counted up by the caller and down by the engine, moving the name's
/// memory between their cores for every tensor of every step.
pub(crate) struct Request {
    kind: Kind,
    buf: Box<dyn Buffer>,
    reply: Arc<Slot>,
    /// When the caller submitted it, read only for the timeline; the
    /// engine's clock reading when it takes the request serves otherwise
    /// (stall checks count seconds, and a clock read per tensor is not free).
    submitted: Option<Instant>,
    /// The name's id ([`Known::id`]).
    id: u32,
}

impl Request {
    /// The tensor's name.
    pub(crate) fn name(&self) -> &Name {
        &self.reply.name
    }
    /// The full spec, to announce or look up (copies the name's handle).
    pub(crate) fn spec(&self) -> Spec {
        let k = &self.kind;
        Spec {
            name: self.reply.name.clone(),
            coll: k.coll,
            dtype: k.dtype,
            op: k.op,
            root: k.root,
            shape: k.shape.clone(),
            group: k.group.clone(),
            compression: k.compression.clone(),
        }
    }
}

/// What a caller asks for under a name: a [`Spec`] without the name.
#[derive(Clone, PartialEq)]
pub(crate) struct Kind {
    pub(crate) coll: Coll,
    pub(crate) dtype: u8,
    pub(crate) op: u8,
    pub(crate) root: u32,
    pub(crate) shape: Shape,
    /// Set for the members of a [`Group`] when it is submitted.
    pub(crate) group: Option<(String, u32)>,
    pub(crate) compression: String,
}

/// Where the engine leaves one operation's result. Results of a round are
/// all set first and waiters woken once ([`Shared::notify`]): a wake-up per
/// tensor would cost two context switches each.
///
/// Laid out in order, the fields both threads write first, so that they
/// share the first cache line with the reference count.
#[repr(C)]
pub(crate) struct Slot {
    /// The name is in flight on this rank with this slot. Kept here rather
    /// than in the name map, so the engine frees a name without the map's
    /// lock or a lookup.
    busy: AtomicBool,
    result: Mutex<Option<Result<Box<dyn Buffer>>>>,
    /// The tensor's name (for the handle: one shared copy per name).
    name: Name,
}

type Outcome = Result<Box<dyn Buffer>>;

impl Slot {
    fn new(name: Name, busy: bool) -> Slot {
        Slot {
            name,
            result: Mutex::new(None),
            busy: AtomicBool::new(busy),
        }
    }
    /// Free the name, then leave the result (waiters see it at the next
    /// [`Shared::notify`]): whoever has the result may submit the name again.
    pub(crate) fn send(&self, r: Outcome) {
        self.busy.store(false, Ordering::Release);
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
    fn take(&self) -> Option<Outcome> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub(crate) enum Msg {
    /// One tensor (the common case: no vector to allocate and free across
    /// threads per tensor).
    Submit(Request),
    /// The members of a group, handed over together.
    Group(Vec<Request>),
    Join(Sender<Result<usize>>, Instant),
    /// Stop together with the other ranks (reply when they all asked).
    Shutdown(Sender<()>),
    /// Stop now, alone (the engine is being dropped).
    Stop,
}

/// What this rank keeps per tensor name across steps, so that submitting a
/// name seen before allocates nothing: a result slot to reuse, which holds
/// the name (shared by the handle and the engine's maps), and the name's id.
struct Known {
    /// Dense number of the name on this rank, never reused: the engine
    /// keeps what it learned about the name in a list at this index.
    id: u32,
    /// Reused for the next submission once no handle or request holds it;
    /// says whether the name is in flight.
    slot: Arc<Slot>,
}

/// Names are forgotten (those not in flight) when more than this many are
/// known: a program that makes up new names forever does not grow forever.
const KNOWN_LIMIT: usize = 1 << 16;

/// State shared by the engine handle, the handles and the thread.
pub(crate) struct Shared {
    /// Every name this rank submitted (up to [`KNOWN_LIMIT`]), in flight or
    /// not, and the next id to give.
    names: Mutex<(FxHashMap<Name, Known>, u32)>,
    /// Why the engine stopped, once it has.
    dead: Mutex<Option<Error>>,
    /// The engine thread sleeps waiting for work and wants a wake-up call;
    /// otherwise it will look at the queue anyway, and submitting skips the
    /// system call.
    sleeping: std::sync::atomic::AtomicBool,
    /// Bumped (under its lock) after results were left in slots.
    generation: Mutex<u64>,
    finished: std::sync::Condvar,
    /// The engine thread has failed or answered everything it ever will.
    exited: std::sync::atomic::AtomicBool,
    /// Threads blocked in [`Handle::wait`]. While one is and nothing is
    /// queued, the engine stops gathering: a caller waiting for results is
    /// done submitting for now, and the cycle time would only delay them.
    waiters: std::sync::atomic::AtomicUsize,
    /// The engine is gathering a burst: a new waiter wakes it to end it.
    gathering: std::sync::atomic::AtomicBool,
    waker: Arc<mio::Waker>,
    rank: usize,
    /// A timeline is written: submissions carry their time.
    stamp: bool,
}

impl Shared {
    fn dead(&self) -> Option<Error> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Wake every waiting handle (after results were left in their slots).
    pub(crate) fn notify(&self) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.finished.notify_all();
    }

    /// Mark `name` in flight and return an empty result slot for it (which
    /// holds the name, shared) and its id; `None` when it already is in
    /// flight.
    fn reserve(&self, name: &str) -> Option<(Arc<Slot>, u32)> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let (map, next) = &mut *names;
        if let Some(k) = map.get_mut(name) {
            if k.slot.busy.load(Ordering::Acquire) {
                return None;
            }
            // Only this map holds the slot: no handle can see it any more.
            if Arc::strong_count(&k.slot) == 1 {
                k.slot.take();
                k.slot.busy.store(true, Ordering::Relaxed);
            } else {
                k.slot = Arc::new(Slot::new(k.slot.name.clone(), true));
            }
            return Some((k.slot.clone(), k.id));
        }
        if map.len() >= KNOWN_LIMIT {
            map.retain(|_, k| k.slot.busy.load(Ordering::Acquire));
        }
        let name: Name = name.into();
        let k = Known {
            id: *next,
            slot: Arc::new(Slot::new(name.clone(), true)),
        };
        *next = next.saturating_add(1);
        let got = (k.slot.clone(), k.id);
        map.insert(name, k);
        Some(got)
    }
}

/// The result of one asynchronous operation.
///
/// ```no_run
/// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
/// let mut h = engine.allreduce_async("g", vec![1.0f32; 8], kolo::ReduceOp::Sum)?;
/// while !h.poll() { /* overlap other work */ }
/// let summed: Vec<f32> = h.wait()?;
/// # Ok::<(), kolo::Error>(())
/// ```
pub struct Handle<O> {
    slot: Arc<Slot>,
    done: Option<Outcome>,
    /// The outcome was handed out by [`Handle::wait_timeout`].
    spent: bool,
    shared: Arc<Shared>,
    convert: fn(Box<dyn Buffer>) -> O,
}

impl<O> Handle<O> {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// True once the operation finished (successfully or not); never blocks.
    pub fn poll(&mut self) -> bool {
        if self.done.is_none() {
            self.done = self.slot.take();
            if self.done.is_none() && self.shared.exited.load(Ordering::SeqCst) {
                self.done = Some(self.slot.take().unwrap_or_else(|| Err(self.stopped())));
            }
        }
        self.done.is_some()
    }

    /// Block until the operation finishes and return its result. The engine
    /// bounds every wait: collectives by `KOLO_TIMEOUT`, negotiation by
    /// `KOLO_STALL_SHUTDOWN_S`.
    pub fn wait(mut self) -> Result<O> {
        loop {
            if let Some(r) = self.wait_until(Instant::now() + Duration::from_secs(3600)) {
                return r.map(self.convert);
            }
        }
    }

    /// Wait at most `limit` for the operation: `Ok(Some(result))` once it
    /// finished, `Ok(None)` if it is still running (the handle stays valid:
    /// wait again, or give up on it), the operation's error if it failed.
    /// A result is handed out once; later calls say so.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let mut h = engine.allreduce_async("g", vec![1.0f32; 8], kolo::ReduceOp::Sum)?;
    /// let summed = loop {
    ///     match h.wait_timeout(std::time::Duration::from_millis(100))? {
    ///         Some(v) => break v,
    ///         None => eprintln!("still waiting for {}", h.name()),
    ///     }
    /// };
    /// # let _: Vec<f32> = summed;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<Option<O>> {
        if self.spent {
            return Err(Error::InvalidArgument(format!(
                "rank {}: the result of engine tensor {:?} was already taken",
                self.shared.rank,
                self.name()
            )));
        }
        match self.wait_until(Instant::now() + limit) {
            Some(r) => {
                self.spent = true;
                r.map(|b| Some((self.convert)(b)))
            }
            None => Ok(None),
        }
    }

    /// Wait at most `limit` for the operation to finish, without taking its
    /// result: true once [`Handle::wait`] would return at once.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let mut h = engine.allreduce_async("g", vec![1.0f32; 8], kolo::ReduceOp::Sum)?;
    /// while !h.ready_within(std::time::Duration::from_millis(100)) { /* report progress */ }
    /// let summed: Vec<f32> = h.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn ready_within(&mut self, limit: Duration) -> bool {
        if self.done.is_some() {
            return true;
        }
        self.done = self.wait_until(Instant::now() + limit);
        self.done.is_some()
    }

    /// The outcome once it is in, or `None` at `deadline`.
    fn wait_until(&mut self, deadline: Instant) -> Option<Outcome> {
        if self.poll() {
            return self.done.take();
        }
        let shared = self.shared.clone();
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        if shared.gathering.load(Ordering::SeqCst) {
            // Best effort: the gathering ends at its next look otherwise.
            let _ = shared.waker.wake();
        }
        let mut generation = shared.generation.lock().unwrap_or_else(|p| p.into_inner());
        let r = loop {
            if self.poll() {
                break self.done.take();
            }
            let now = Instant::now();
            if now >= deadline {
                break None;
            }
            // The engine sets slots before bumping the generation under this
            // lock, so a result cannot slip in between the poll and the wait.
            let nap = (deadline - now).min(Duration::from_secs(1));
            generation = shared
                .finished
                .wait_timeout(generation, nap)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(generation);
        shared.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Why a tensor of a stopped engine will never complete: the error the
    /// engine died of, kept typed (an abort stays [`Error::Aborted`]).
    fn stopped(&self) -> Error {
        self.shared.dead().unwrap_or_else(|| {
            Error::InvalidArgument(format!(
                "rank {}: engine tensor {:?} did not complete: the engine was shut down",
                self.shared.rank,
                self.name()
            ))
        })
    }
}

fn into_vec<T: Element>(b: Box<dyn Buffer>) -> Vec<T> {
    *b.into_any()
        .downcast::<Vec<T>>()
        .expect("the engine returns the buffer type it was given")
}

/// A tensor to submit, with its options; most callers use the
/// `*_async` shorthands on [`Engine`].
///
/// ```no_run
/// use kolo::engine::{Engine, Op};
/// # let engine = Engine::start(kolo::Communicator::from_env()?)?;
/// let w = Op::allreduce("conv1.weight", vec![0.0f32; 64 * 27], kolo::ReduceOp::Avg)
///     .shape(&[64, 3, 3, 3]);
/// let h = engine.submit(w)?;
/// # Ok::<(), kolo::Error>(())
/// ```
pub struct Op<'a, T: Element> {
    draft: Draft<'a>,
    buf: Vec<T>,
}

/// A [`Spec`] before the engine has given it its shared name.
struct Draft<'a> {
    name: &'a str,
    kind: Kind,
}

impl<'a, T: Element + Default> Op<'a, T> {
    fn new(name: &'a str, coll: Coll, buf: Vec<T>, op: Option<ReduceOp>, root: usize) -> Op<'a, T> {
        Op {
            draft: Draft {
                name,
                kind: Kind {
                    coll,
                    dtype: T::DTYPE.code(),
                    op: op.map_or(0, ReduceOp::code),
                    root: root as u32,
                    shape: Shape::flat(buf.len() as u64),
                    group: None,
                    compression: String::new(),
                },
            },
            buf,
        }
    }

    /// Elementwise reduction of `buf` across ranks.
    pub fn allreduce(name: &'a str, buf: Vec<T>, op: ReduceOp) -> Op<'a, T> {
        Op::new(name, Coll::Allreduce, buf, Some(op), 0)
    }
    /// Concatenation of every rank's `buf` in rank order (lengths may differ).
    pub fn allgather(name: &'a str, buf: Vec<T>) -> Op<'a, T> {
        Op::new(name, Coll::Allgather, buf, None, 0)
    }
    /// `root`'s `buf` on every rank.
    pub fn broadcast(name: &'a str, buf: Vec<T>, root: usize) -> Op<'a, T> {
        Op::new(name, Coll::Broadcast, buf, None, root)
    }
    /// Block `rank` of the reduction of `buf` (its length a multiple of the size).
    pub fn reduce_scatter(name: &'a str, buf: Vec<T>, op: ReduceOp) -> Op<'a, T> {
        Op::new(name, Coll::ReduceScatter, buf, Some(op), 0)
    }
    /// Block j of `buf` to rank j (its length a multiple of the size).
    pub fn alltoall(name: &'a str, buf: Vec<T>) -> Op<'a, T> {
        Op::new(name, Coll::Alltoall, buf, None, 0)
    }

    /// Compress this allreduce on the wire (f32 tensors only): fp16/bf16
    /// batches fuse like plain tensors; top-k runs per tensor, with its error
    /// feedback kept under the tensor's name across steps. Ranks must agree.
    pub fn compression(mut self, c: &crate::compress::Compression) -> Op<'a, T> {
        self.draft.kind.compression = match c {
            crate::compress::Compression::None => String::new(),
            c => c.to_string(),
        };
        self
    }

    /// Declare the tensor's dimensions (checked against the length, and
    /// across ranks; for allgather the first dimension may differ).
    pub fn shape(mut self, dims: &[usize]) -> Op<'a, T> {
        let dims: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        self.draft.kind.shape = Shape::from(&dims[..]);
        self
    }
}

/// Tensors submitted together ([`Engine::group`]): they reach the engine at
/// once and run only when every member is ready on every rank.
///
/// ```no_run
/// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
/// let mut g = engine.group("step");
/// let a = g.add(kolo::engine::Op::allreduce("a", vec![1.0f32; 4], kolo::ReduceOp::Sum));
/// let b = g.add(kolo::engine::Op::allreduce("b", vec![2.0f32; 4], kolo::ReduceOp::Sum));
/// g.submit()?;
/// let (a, b) = (a.wait()?, b.wait()?);
/// # Ok::<(), kolo::Error>(())
/// ```
pub struct Group<'e> {
    engine: &'e Engine,
    name: String,
    reqs: Vec<Request>,
    error: Option<Error>,
}

impl Group<'_> {
    /// Add a tensor; its handle completes after [`Group::submit`].
    pub fn add<T: Element + Default>(&mut self, op: Op<'_, T>) -> Handle<Vec<T>> {
        let (req, h) = self
            .engine
            .prepare(op.draft, Box::new(op.buf), into_vec::<T>);
        match req {
            Ok(r) => self.reqs.push(r),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        h
    }

    /// Hand every member to the engine at once.
    pub fn submit(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            // No member runs: their handles answer with the error.
            for r in &self.reqs {
                r.reply.send(Err(e.clone()));
            }
            return Err(e);
        }
        let n = self.reqs.len() as u32;
        for r in &mut self.reqs {
            r.kind.group = Some((self.name.clone(), n));
        }
        let reqs = std::mem::take(&mut self.reqs);
        self.engine.send(Msg::Group(reqs))
    }
}

/// The background engine of one rank. Dropping it stops the thread; pending
/// operations then fail.
pub struct Engine {
    tx: Sender<Msg>,
    waker: Arc<mio::Waker>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Communicator>>,
    rank: usize,
    size: usize,
    /// Pulled by [`Engine::abort`].
    switch: crate::transport::AbortSwitch,
    /// How long [`Engine::shutdown`] waits for the other ranks (`KOLO_TIMEOUT`).
    shutdown_limit: Duration,
}

impl Engine {
    /// Start the engine thread on `comm`, with the engine settings of its
    /// [`crate::Config`] (`KOLO_FUSION_THRESHOLD`, `KOLO_CYCLE_TIME_MS`, ...).
    /// The engine owns the communicator until [`Engine::shutdown`]; ranks
    /// must not run blocking collectives on it meanwhile.
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// let engine = kolo::engine::Engine::start(comm)?;
    /// let h = engine.allreduce_async("x", vec![3i64; 2], kolo::ReduceOp::Sum)?;
    /// assert_eq!(h.wait()?, [3, 3]);
    /// engine.shutdown()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn start(comm: Communicator) -> Result<Engine> {
        let waker = comm.waker()?;
        let switch = comm.abort_switch();
        let shutdown_limit = comm.config().timeout;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (rank, size) = (comm.rank(), comm.size());
        let shared = Arc::new(Shared {
            names: Mutex::new((FxHashMap::default(), 0)),
            dead: Mutex::new(None),
            sleeping: std::sync::atomic::AtomicBool::new(false),
            generation: Mutex::new(0),
            finished: std::sync::Condvar::new(),
            exited: std::sync::atomic::AtomicBool::new(false),
            waiters: std::sync::atomic::AtomicUsize::new(0),
            gathering: std::sync::atomic::AtomicBool::new(false),
            waker: waker.clone(),
            rank,
            stamp: comm.config().timeline.is_some(),
        });
        let w = worker::Worker::new(comm, rx, shared.clone())?;
        let thread = std::thread::Builder::new()
            .name(format!("kolo-engine-{rank}"))
            .spawn(move || w.run())
            .map_err(|e| Error::Io(format!("spawn engine thread: {e}")))?;
        Ok(Engine {
            tx,
            waker,
            shared,
            thread: Some(thread),
            rank,
            size,
            switch,
            shutdown_limit,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Abort the engine's communicator from any thread
    /// ([`Communicator::abort`]): the collective in flight ends, every
    /// pending handle and every later submission fails with
    /// [`Error::Aborted`], and the peers hear of it.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let h = engine.allreduce_async("g", vec![1.0f32; 8], kolo::ReduceOp::Sum)?;
    /// engine.abort();
    /// // The result if it was in before the abort, else `Error::Aborted`.
    /// let _ = h.wait();
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn abort(&self) {
        self.switch.pull();
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    fn send(&self, m: Msg) -> Result<()> {
        // The flag spares a lock per submission while the engine lives.
        if self.shared.exited.load(Ordering::Acquire) {
            if let Some(e) = self.shared.dead() {
                return Err(e);
            }
        }
        self.tx.send(m).map_err(|_| {
            self.shared.dead().unwrap_or_else(|| {
                Error::InvalidArgument(format!("rank {}: the engine has stopped", self.rank))
            })
        })?;
        // The fence orders the queued message before the look at the flag
        // (the engine raises the flag, then looks at the queue); the look
        // alone leaves the flag's cache line shared while the engine is
        // awake, where a swap per submission would take it over each time.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::Relaxed)
            && self.shared.sleeping.swap(false, Ordering::SeqCst)
        {
            // Best effort: if the wake fails the thread still finds the
            // message when its current wait ends.
            let _ = self.waker.wake();
        }
        Ok(())
    }

    /// Check a request and reserve its name.
    fn prepare<O>(
        &self,
        d: Draft<'_>,
        buf: Box<dyn Buffer>,
        convert: fn(Box<dyn Buffer>) -> O,
    ) -> (Result<Request>, Handle<O>) {
        let elems = buf.bytes().len() / buf.dtype().size().max(1);
        let k = &d.kind;
        let count: u64 = k.shape.iter().product();
        let check = if count != elems as u64 {
            Err(format!(
                "shape {:?} holds {count} elements but the buffer has {elems}",
                k.shape
            ))
        } else if !k.compression.is_empty()
            && (k.coll != Coll::Allreduce || buf.dtype() != DType::F32)
        {
            Err("compression applies to float32 allreduces only".to_string())
        } else if !k.compression.is_empty()
            && crate::compress::Compression::parse(&k.compression).is_none()
        {
            Err(format!("unknown compression {:?}", k.compression))
        } else if d.name.is_empty() || d.name == negotiate::JOIN {
            Err(format!("{:?} is not a valid tensor name", d.name))
        } else {
            self.shared.reserve(d.name).ok_or_else(|| {
                "a tensor of this name is already in flight on this rank".to_string()
            })
        };
        match check {
            Ok((slot, id)) => {
                let handle = Handle {
                    slot: slot.clone(),
                    done: None,
                    spent: false,
                    shared: self.shared.clone(),
                    convert,
                };
                let req = Request {
                    kind: d.kind,
                    buf,
                    reply: slot,
                    submitted: self.shared.stamp.then(Instant::now),
                    id,
                };
                (Ok(req), handle)
            }
            Err(m) => {
                let e = Error::InvalidArgument(format!(
                    "rank {}: engine tensor {:?}: {m}",
                    self.rank, d.name
                ));
                // The handle (of a group member) answers with the error too.
                let slot = Arc::new(Slot::new(d.name.into(), false));
                slot.send(Err(e.clone()));
                let handle = Handle {
                    slot,
                    done: None,
                    spent: false,
                    shared: self.shared.clone(),
                    convert,
                };
                (Err(e), handle)
            }
        }
    }

    /// Submit one tensor.
    pub fn submit<T: Element + Default>(&self, op: Op<'_, T>) -> Result<Handle<Vec<T>>> {
        let (req, h) = self.prepare(op.draft, Box::new(op.buf), into_vec::<T>);
        self.send(Msg::Submit(req?)).inspect_err(|_| {
            h.slot.busy.store(false, Ordering::Release);
        })?;
        Ok(h)
    }

    /// Start an allreduce of `buf` under `name`; the handle returns the result.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let h = engine.allreduce_async("grad", vec![1.0f32; 100], kolo::ReduceOp::Avg)?;
    /// let avg = h.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_async<T: Element + Default>(
        &self,
        name: &str,
        buf: Vec<T>,
        op: ReduceOp,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(Op::allreduce(name, buf, op))
    }

    /// Start an allgather: every rank's `buf` concatenated in rank order;
    /// lengths may differ between ranks.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let all = engine.allgather_async("ids", vec![engine.rank() as i64])?.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allgather_async<T: Element + Default>(
        &self,
        name: &str,
        buf: Vec<T>,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(Op::allgather(name, buf))
    }

    /// Start a broadcast of `root`'s `buf`.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let w = engine.broadcast_async("init", vec![0.5f64; 10], 0)?.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn broadcast_async<T: Element + Default>(
        &self,
        name: &str,
        buf: Vec<T>,
        root: usize,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(Op::broadcast(name, buf, root))
    }

    /// Start a reduce-scatter: the handle returns block `rank` of the
    /// reduction (`buf.len()` must be a multiple of the size).
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let n = engine.size();
    /// let mine = engine.reduce_scatter_async("rs", vec![1.0f32; 4 * n], kolo::ReduceOp::Sum)?.wait()?;
    /// assert_eq!(mine.len(), 4);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn reduce_scatter_async<T: Element + Default>(
        &self,
        name: &str,
        buf: Vec<T>,
        op: ReduceOp,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(Op::reduce_scatter(name, buf, op))
    }

    /// Start an alltoall: block j of `buf` goes to rank j; the handle returns
    /// block i from rank i.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let got = engine.alltoall_async("a2a", vec![engine.rank() as i32; engine.size()])?.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn alltoall_async<T: Element + Default>(
        &self,
        name: &str,
        buf: Vec<T>,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(Op::alltoall(name, buf))
    }

    /// Start an in-place allreduce of caller-owned memory (for the C ABI and
    /// framework tensors).
    ///
    /// # Safety
    /// `ptr` must point to `count` elements of `dtype`, aligned for it, that
    /// stay valid and are neither read nor written by anyone else until the
    /// handle has completed (`wait` returned or `poll` returned true).
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let mut v = vec![1.0f32; 16];
    /// let h = unsafe {
    ///     engine.allreduce_async_raw("v", v.as_mut_ptr().cast(), v.len(), kolo::DType::F32, kolo::ReduceOp::Sum)?
    /// };
    /// h.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub unsafe fn allreduce_async_raw(
        &self,
        name: &str,
        ptr: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Handle<()>> {
        self.allreduce_async_raw_compressed(
            name,
            ptr,
            count,
            dtype,
            op,
            &crate::compress::Compression::None,
        )
    }

    /// [`Engine::allreduce_async_raw`] with compression on the wire (see
    /// [`Op::compression`]; float32 only).
    ///
    /// # Safety
    /// As for [`Engine::allreduce_async_raw`].
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// let mut g = vec![0.5f32; 1 << 16];
    /// let fp16 = kolo::compress::Compression::Fp16;
    /// let h = unsafe {
    ///     engine.allreduce_async_raw_compressed("g", g.as_mut_ptr().cast(), g.len(),
    ///         kolo::DType::F32, kolo::ReduceOp::Avg, &fp16)?
    /// };
    /// h.wait()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub unsafe fn allreduce_async_raw_compressed(
        &self,
        name: &str,
        ptr: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        compression: &crate::compress::Compression,
    ) -> Result<Handle<()>> {
        let bad = |m: &str| {
            Err(Error::InvalidArgument(format!(
                "rank {}: engine tensor {name:?}: {m}",
                self.rank
            )))
        };
        if count > 0 && ptr.is_null() {
            return bad("null buffer with a positive count");
        }
        if (ptr as usize) % dtype.size() != 0 {
            return bad("buffer is not aligned for its dtype");
        }
        let Some(len) = count.checked_mul(dtype.size()) else {
            return bad("count overflows");
        };
        let ptr = if count == 0 {
            std::ptr::NonNull::<u64>::dangling().as_ptr().cast()
        } else {
            ptr
        };
        let draft = Draft {
            name,
            kind: Kind {
                coll: Coll::Allreduce,
                dtype: dtype.code(),
                op: op.code(),
                root: 0,
                shape: Shape::flat(count as u64),
                group: None,
                compression: match compression {
                    crate::compress::Compression::None => String::new(),
                    c => c.to_string(),
                },
            },
        };
        let (req, h) = self.prepare(draft, Box::new(Raw { ptr, len, dtype }), |_| ());
        self.send(Msg::Submit(req?)).inspect_err(|_| {
            h.slot.busy.store(false, Ordering::Release);
        })?;
        Ok(h)
    }

    /// Collect tensors to submit atomically under a group name (unique
    /// among groups in flight).
    pub fn group(&self, name: &str) -> Group<'_> {
        Group {
            engine: self,
            name: name.to_string(),
            reqs: Vec::new(),
            error: None,
        }
    }

    /// This rank has no more data: it keeps taking part in the other ranks'
    /// allreduces (adding the identity: zeros to sums) until every rank has
    /// joined, and averages divide by the ranks that contributed. Returns the
    /// last rank to join. No tensors may be submitted while joining.
    ///
    /// ```no_run
    /// # let engine = kolo::engine::Engine::start(kolo::Communicator::from_env()?)?;
    /// // ... after this rank's last batch:
    /// let last = engine.join()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn join(&self) -> Result<usize> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Msg::Join(tx, Instant::now()))?;
        rx.recv().unwrap_or_else(|_| {
            Err(self.shared.dead().unwrap_or_else(|| {
                Error::InvalidArgument(format!("rank {}: the engine has stopped", self.rank))
            }))
        })
    }

    /// Stop the engine on every rank together and take the communicator
    /// back, ready for blocking collectives. Every rank must call it; it
    /// returns once all have, or after `KOLO_TIMEOUT` with an error (the
    /// communicator is then aborted, so this never hangs). Operations still
    /// pending then fail.
    pub fn shutdown(mut self) -> Result<Communicator> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let limit = self.shutdown_limit;
        let agreed = self.send(Msg::Shutdown(tx)).is_ok() && rx.recv_timeout(limit).is_ok();
        if !agreed {
            // The thread may be blocked in the shutdown round: end it now.
            self.switch.pull();
        }
        let comm = self.stop();
        match (comm, agreed) {
            (Some(c), true) => Ok(c),
            (_, false) => Err(self.shared.dead().unwrap_or_else(|| Error::Timeout {
                rank: self.rank,
                op: "engine shutdown".into(),
                waited: limit,
                detail: "not every rank shut its engine down within KOLO_TIMEOUT".into(),
                hung: None,
            })),
            (None, true) => Err(Error::Io(format!(
                "rank {}: engine thread panicked",
                self.rank
            ))),
        }
    }

    /// Stop the thread (it has already stopped after an agreed shutdown).
    fn stop(&mut self) -> Option<Communicator> {
        let t = self.thread.take()?;
        let _ = self.tx.send(Msg::Stop);
        let _ = self.waker.wake();
        t.join().ok()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long an idle engine sleeps when nothing at all is pending; any
/// submission or peer activity wakes it sooner. Only bounds the sleep call.
const IDLE_SLEEP: Duration = Duration::from_secs(3600);
