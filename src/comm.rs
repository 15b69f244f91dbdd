//! The public blocking API: a [`Communicator`] over a full mesh of TCP
//! connections. Each method validates its arguments, picks a schedule from
//! [`crate::algo`], and runs it with [`crate::exec`].

use crate::algo::cost::Algo;
use crate::algo::{self, Schedule};
use crate::config::Config;
use crate::element::{as_bytes, as_bytes_mut, DType, Element};
use crate::error::{Error, Result};
use crate::exec::{self, Call, Opts, Workspace};
use crate::reduce::{self, ReduceOp};
use crate::rendezvous::{self, StoreClient, StoreServer};
use crate::transport::frame::Desc;
use crate::transport::heartbeat::Heartbeat;
use crate::transport::{shm, Activity, Transport};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Wire codes of the collectives (part of every frame header).
mod coll {
    pub const ALLREDUCE: u8 = 1;
    pub const BROADCAST: u8 = 2;
    pub const ALLGATHER: u8 = 3;
    pub const ALLGATHERV: u8 = 4;
    pub const REDUCE_SCATTER: u8 = 5;
    pub const ALLTOALL: u8 = 6;
    pub const BARRIER: u8 = 7;
    /// Allreduce of f32 buffers whose values travel as f16/bf16 (the header's
    /// dtype is the wire format).
    pub const ALLREDUCE_NARROW: u8 = 8;
}

/// Name of a collective wire code, for error messages.
pub fn coll_name(code: u8) -> &'static str {
    match code {
        coll::ALLREDUCE => "allreduce",
        coll::BROADCAST => "broadcast",
        coll::ALLGATHER => "allgather",
        coll::ALLGATHERV => "allgatherv",
        coll::REDUCE_SCATTER => "reduce_scatter",
        coll::ALLTOALL => "alltoall",
        coll::BARRIER => "barrier",
        coll::ALLREDUCE_NARROW => "allreduce (16-bit wire)",
        _ => "unknown collective",
    }
}

/// Up to this many ranks, a small allgather sends every block directly.
const DIRECT_MAX_RANKS: usize = 16;

struct Inner {
    transport: Transport,
    seq: u64,
    ws: Workspace,
    /// Set by the first failure: the mesh is then in an unknown state (a peer
    /// may be mid-message), so every later call reports it instead of hanging.
    failed: Option<Error>,
}

/// A group of ranks that run collectives together.
///
/// Every rank must call the same collectives in the same order with matching
/// arguments; a mismatch is detected from frame headers and reported on every
/// rank. Methods take `&self`; calls from several threads are serialised.
///
/// ```no_run
/// use kolo::{Communicator, ReduceOp};
/// let comm = Communicator::from_env()?;
/// let mut v = vec![1.0f32; 4];
/// comm.allreduce(&mut v, ReduceOp::Sum)?;
/// assert!(v.iter().all(|&x| x == comm.size() as f32));
/// # Ok::<(), kolo::Error>(())
/// ```
pub struct Communicator {
    cfg: Config,
    /// The α-β-γ model `auto` chooses by (see [`crate::calibrate`]).
    model: algo::cost::Model,
    /// `auto`'s allreduce algorithm per power-of-two size ([`algo::cost::table`]).
    auto: Vec<Algo>,
    inner: Mutex<Inner>,
    /// Rank 0 serves the rendezvous store for the communicator's lifetime
    /// unless a launcher does.
    _store: Option<StoreServer>,
    /// Pulled by [`Communicator::abort`], from any thread.
    switch: crate::transport::AbortSwitch,
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// A number nobody can guess, from the OS's generator.
fn secure_random() -> Result<u64> {
    let mut raw = [0u8; 8];
    getrandom::getrandom(&mut raw).map_err(|e| Error::Io(format!("getrandom: {e}")))?;
    Ok(u64::from_le_bytes(raw))
}

/// The random key in this communicator's shared-memory ring names, which
/// rank 0 put in the store: a name a stranger cannot plant in advance.
fn ring_key(client: &mut StoreClient, prefix: &str, rank: usize, deadline: Instant) -> Result<u64> {
    let key = format!("{prefix}/ring_key");
    let raw = client.get(&key, deadline)?;
    let raw: [u8; 8] = raw.as_slice().try_into().map_err(|_| Error::Rendezvous {
        rank,
        detail: format!("malformed {key} in the store"),
    })?;
    Ok(u64::from_le_bytes(raw))
}

impl Communicator {
    /// Join the job described by the environment (see [`Config::from_env`]).
    ///
    /// ```no_run
    /// let comm = kolo::Communicator::from_env()?;
    /// println!("rank {} of {}", comm.rank(), comm.size());
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn from_env() -> Result<Communicator> {
        Communicator::init(Config::from_env()?)
    }

    /// Rendezvous with the other ranks and connect to all of them. Fails after
    /// `cfg.start_timeout` naming the ranks that never arrived.
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// assert_eq!(comm.size(), 1);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn init(cfg: Config) -> Result<Communicator> {
        Communicator::init_group(cfg, "kolo", None)
    }

    /// [`Communicator::init`] with the rendezvous keys under `prefix` and, when
    /// given, a fixed communicator id (else rank 0 draws one). Elastic mode
    /// ([`crate::elastic`]) forms one group per membership epoch this way: its
    /// keys do not collide with earlier epochs', and its id, derived from the
    /// epoch, makes every rank refuse frames and hellos of an older epoch.
    pub fn init_group(cfg: Config, prefix: &str, comm_id: Option<u64>) -> Result<Communicator> {
        if cfg.size == 0 || cfg.rank >= cfg.size {
            return Err(Error::Config(format!(
                "rank {} is not below size {}",
                cfg.rank, cfg.size
            )));
        }
        let deadline = Instant::now() + cfg.start_timeout;
        let rank = cfg.rank;
        let (transport, store) = if cfg.size == 1 {
            let l = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| Error::Io(format!("bind: {e}")))?;
            (
                Transport::establish(
                    0,
                    1,
                    comm_id.unwrap_or_else(random_id),
                    l,
                    &[],
                    deadline,
                    0,
                    None,
                )?,
                None,
            )
        } else {
            let (ip, how) = crate::net::advertise(&cfg)?;
            if !ip.is_loopback() && cfg.secret.is_none() && !cfg.insecure {
                return Err(Error::Config(format!(
                    "rank {rank}: this job listens on {ip}, which others can reach, and has no \
                     KOLO_SECRET: set the same KOLO_SECRET on every rank (kolorun sets one), or \
                     KOLO_INSECURE=1 to run unauthenticated"
                )));
            }
            // Multi-host jobs say which address they use (one line per rank):
            // a wrong interface is the classic cause of a hang at start.
            if !ip.is_loopback() {
                eprintln!("kolo: rank {rank}: advertising {how}");
            }
            let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
                .map_err(|e| Error::Io(format!("rank {rank}: bind {ip}: {e}")))?;
            let mine = listener
                .local_addr()
                .map_err(|e| Error::Io(e.to_string()))?;
            let store = if cfg.serve_store && rank == 0 {
                let host = if ip.is_loopback() {
                    "127.0.0.1"
                } else {
                    "0.0.0.0"
                };
                Some(StoreServer::bind_with(
                    &format!("{host}:{}", cfg.master_port),
                    cfg.secret.clone(),
                )?)
            } else {
                None
            };
            let master = format!("{}:{}", cfg.master_addr, cfg.master_port);
            let mut client =
                StoreClient::connect_with(&master, rank, cfg.secret.as_ref(), deadline)?;
            if cfg.serve_store && rank != 0 {
                client.set_served_by("rank 0");
            }
            if rank == 0 {
                // Before anyone can read it: ranks fetch it after the address
                // exchange, which waits for rank 0.
                client.set(
                    &format!("{prefix}/ring_key"),
                    &secure_random()?.to_le_bytes(),
                )?;
            }
            let id_key = format!("{prefix}/comm_id");
            let comm_id = match comm_id {
                Some(id) => id,
                None => {
                    if rank == 0 {
                        client.set(&id_key, &random_id().to_le_bytes())?;
                    }
                    let raw = client.get(&id_key, deadline)?;
                    u64::from_le_bytes(raw.as_slice().try_into().map_err(|_| {
                        Error::Rendezvous {
                            rank,
                            detail: format!("malformed {id_key} in the store"),
                        }
                    })?)
                }
            };
            let addrs = match &store {
                // On timeout this tells the waiting ranks which ranks are missing
                // and keeps the store up briefly so they can read it.
                Some(server) => rendezvous::exchange_addresses_serving(
                    &mut client,
                    server,
                    prefix,
                    rank,
                    cfg.size,
                    mine,
                    deadline,
                )?,
                None => rendezvous::exchange_addresses(
                    &mut client,
                    prefix,
                    rank,
                    cfg.size,
                    mine,
                    deadline,
                )?,
            };
            // Ranks that differ here would wait for connections the others
            // never make: fail at once, on every rank, naming the values.
            rendezvous::agree(
                &mut client,
                store.as_ref(),
                prefix,
                "KOLO_NSOCKS",
                rank,
                cfg.size,
                cfg.nsocks as u64,
                deadline,
            )?;
            // Ranks that advertise the same address share a host: bulk
            // payloads between them may go through shared memory. Each rank
            // makes its incoming rings before it connects, so once the mesh
            // is up every peer's rings exist and can be opened.
            let local: Vec<bool> = addrs.iter().map(|a| a.ip() == mine.ip()).collect();
            let shared = cfg.shm_bytes > 0 && local.iter().filter(|&&l| l).count() > 1;
            let ring_key = if shared {
                shm::sweep_stale(std::path::Path::new(shm::DIR));
                ring_key(&mut client, prefix, rank, deadline)?
            } else {
                0
            };
            let incoming = if shared {
                shm::create_incoming(ring_key, rank, &local, cfg.nsocks, cfg.shm_bytes)
            } else {
                Vec::new()
            };
            let mut transport = Transport::establish_lanes(
                rank,
                cfg.size,
                comm_id,
                listener,
                &addrs,
                deadline,
                cfg.socket_buffer,
                cfg.secret.as_ref(),
                cfg.nsocks,
            )?;
            // KOLO_SHM_BYTES=0 means everything over TCP, also toward peers
            // that made rings for this rank.
            let outgoing = if shared {
                shm::open_outgoing(ring_key, rank, &local, cfg.nsocks)
            } else {
                Vec::new()
            };
            transport.attach_shm(outgoing, incoming);
            if cfg.heartbeat_timeout.is_some() {
                let beat = Heartbeat::start(rank, comm_id, &addrs, cfg.secret.as_ref());
                match beat {
                    Some(hb) => transport.attach_heartbeat(hb),
                    None => eprintln!(
                        "kolo: rank {rank}: no UDP socket for heartbeats: a frozen peer is \
                         found only by KOLO_TIMEOUT"
                    ),
                }
            }
            (transport, store)
        };
        let mut transport = transport;
        let switch = transport.abort_switch()?;
        let model = crate::calibrate::configured(&cfg);
        let mut comm = Communicator {
            cfg,
            model,
            auto: Vec::new(),
            inner: Mutex::new(Inner {
                transport,
                seq: 0,
                ws: Workspace::default(),
                failed: None,
            }),
            _store: store,
            switch,
        };
        // Nobody returns before everyone is connected, so the store may go
        // away, and every peer has opened this rank's rings.
        comm.barrier()?;
        comm.with_transport(|t| t.unlink_shm());
        if crate::calibrate::measures(&comm.cfg) {
            comm.model = crate::calibrate::measure(&comm)?;
        }
        // The tree's edge over the ring is a CPU-bound host's (see
        // `cost::select`): with a core per rank the ring is faster (16-core
        // host, N = 2..4), and so it is for two ranks that share memory
        // rings (2-core VM: 1.2-1.5x from 4 MiB; with 4 ranks the tree
        // still wins there; benches/RESULTS.md). The cores the ranks share
        // are the union of their affinity masks, not any one rank's: a
        // launcher that pins each rank to its own share leaves each seeing
        // only that.
        let mut crowded = false;
        if comm.local_size() == comm.size() && comm.size() > 1 {
            let mine = crate::host::cpu_mask(&crate::host::usable_cpus());
            let mut all = vec![0i64; mine.len() * comm.size()];
            comm.allgather(&mine, &mut all)?;
            let mut tcp = [i32::from(!comm.with_transport(|t| t.rings_to_all()))];
            comm.allreduce_with(&mut tcp, ReduceOp::Max, Algo::Rd)?;
            crowded =
                comm.size() >= crate::host::count_union(&all) && (comm.size() > 2 || tcp[0] == 1);
        }
        comm.auto = algo::cost::table(&comm.model, comm.size(), crowded);
        Ok(comm)
    }

    fn with_transport<R>(&self, f: impl FnOnce(&mut Transport) -> R) -> R {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .transport)
    }

    /// This rank, in `0..size()`.
    pub fn rank(&self) -> usize {
        self.cfg.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.cfg.size
    }
    /// Rank among the processes on this host.
    pub fn local_rank(&self) -> usize {
        self.cfg.local_rank
    }
    /// Number of processes on this host.
    pub fn local_size(&self) -> usize {
        self.cfg.local_size
    }
    /// The configuration this communicator was started with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Let an engine started on this communicator cache at least `min` negotiated tensors
    /// (a cache turned off with 0 stays off). Every rank must ask for the same.
    #[cfg_attr(not(feature = "torch"), allow(dead_code))]
    pub(crate) fn raise_cache_capacity(&mut self, min: usize) {
        if self.cfg.cache_capacity > 0 {
            self.cfg.cache_capacity = self.cfg.cache_capacity.max(min);
        }
    }
    /// Bytes this rank has sent / received (headers included, and payloads
    /// that went through shared memory to ranks of this host).
    pub fn bytes_on_wire(&self) -> (u64, u64) {
        self.with_transport(|t| (t.bytes_sent, t.bytes_received))
    }

    /// Of the bytes sent, the payload bytes that went through shared-memory
    /// rings to ranks of this host (`KOLO_SHM_BYTES`) rather than a socket.
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// assert_eq!(comm.bytes_through_shm(), 0);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn bytes_through_shm(&self) -> u64 {
        self.with_transport(|t| t.bytes_shm)
    }

    /// The algorithm [`Communicator::allreduce`] uses for `bytes` bytes.
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// println!("{}", comm.allreduce_algo(1 << 20).name());
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_algo(&self, bytes: usize) -> Algo {
        self.cfg
            .algo
            .unwrap_or(self.auto[algo::cost::bucket(bytes)])
    }

    /// The α-β-γ model this communicator chose its `auto` algorithms with:
    /// measured at start (the maximum over ranks, so every rank holds the
    /// same), or configured (`KOLO_ALPHA_US`, `KOLO_BETA_GBPS`,
    /// `KOLO_GAMMA_GBPS`).
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// assert_eq!(comm.cost_model(), kolo::algo::cost::Model::DEFAULT);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn cost_model(&self) -> algo::cost::Model {
        self.model
    }

    /// Where `auto` changes allreduce algorithm: `(smallest size in bytes,
    /// algorithm)` per run of sizes, in increasing size.
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// assert_eq!(comm.auto_crossovers()[0].0, 1);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn auto_crossovers(&self) -> Vec<(usize, Algo)> {
        algo::cost::crossovers(&self.auto)
    }

    /// Run a hand-made schedule of bytes in `buf` (the calibration probes).
    pub(crate) fn run_schedule(
        &self,
        name: &'static str,
        sched: &Schedule,
        buf: &mut [u8],
    ) -> Result<()> {
        let call = self.call::<u8>(name, coll::ALLGATHER, ReduceOp::Sum, 0, buf.len());
        self.run(call, sched, &[], buf, Ok(()))
    }

    /// Abort this communicator, from any thread: a collective blocked on it
    /// returns [`Error::Aborted`] at once, every later call fails the same
    /// way, and the peers hear of it through the abort frames a failure
    /// sends (NCCL's `ncclCommAbort`). Calling it again does nothing more.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// std::thread::scope(|s| {
    ///     s.spawn(|| {
    ///         std::thread::sleep(std::time::Duration::from_secs(5));
    ///         comm.abort(); // a watchdog gives up on the job
    ///     });
    ///     let mut v = vec![0f32; 16];
    ///     let _ = comm.allreduce(&mut v, kolo::ReduceOp::Sum);
    /// });
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn abort(&self) {
        self.switch.pull();
        // Idle: tell the peers now. Busy: the call in flight does, when it
        // wakes to the switch.
        if let Ok(mut g) = self.inner.try_lock() {
            self.fail_aborted(&mut g);
        }
    }

    /// The switch [`Communicator::abort`] pulls, for an owner (the engine)
    /// that aborts on a caller's behalf.
    pub(crate) fn abort_switch(&self) -> crate::transport::AbortSwitch {
        self.switch.clone()
    }

    /// After the switch was pulled: fail the communicator (once) and send
    /// the abort to every peer.
    fn fail_aborted(&self, g: &mut Inner) -> Error {
        if let Some(e) = &g.failed {
            return e.clone();
        }
        g.seq += 1;
        let call = Call {
            seq: g.seq,
            ..self.call::<u8>("abort", coll::BARRIER, ReduceOp::Sum, 0, 0)
        };
        let e = exec::aborted_here(&g.transport, &call);
        g.transport.abort_all(call.desc, call.seq, &e.to_string());
        g.failed = Some(e.clone());
        e
    }

    /// A waker that cuts [`Communicator::wait_incoming`] short from another thread.
    pub(crate) fn waker(&self) -> Result<std::sync::Arc<mio::Waker>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.transport.waker()
    }

    /// Sleep until a peer sends (or closes), the waker fires, or `deadline`.
    pub(crate) fn wait_incoming(&self, deadline: Instant) -> Result<Activity> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &g.failed {
            return Err(e.clone());
        }
        let woke = g.transport.wait_incoming(deadline)?;
        if self.switch.pulled() {
            return Err(self.fail_aborted(&mut g));
        }
        Ok(woke)
    }

    /// Elementwise reduction across ranks, in place; every rank gets the same bits.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// let mut g = vec![0.5f32; 1 << 20];
    /// comm.allreduce(&mut g, kolo::ReduceOp::Avg)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.allreduce_with(buf, op, self.allreduce_algo(std::mem::size_of_val(buf)))
    }

    /// [`Communicator::allreduce`] with a given algorithm. Every rank must pick
    /// the same one (the frames carry the element count, not the algorithm, so
    /// a disagreement shows up as a mismatch or a timeout).
    ///
    /// ```no_run
    /// use kolo::algo::cost::Algo;
    /// # let comm = kolo::Communicator::from_env()?;
    /// let mut g = vec![1.0f32; 1 << 20];
    /// comm.allreduce_with(&mut g, kolo::ReduceOp::Sum, Algo::Tree)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_with<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        algo: Algo,
    ) -> Result<()> {
        let (n, count) = (self.size(), buf.len());
        let sched = self.allreduce_schedule(algo, count, T::DTYPE.size());
        let mut call = self.call::<T>("allreduce", coll::ALLREDUCE, op, 0, count);
        if op == ReduceOp::Avg {
            call.divide_by = n;
        }
        self.run(call, &sched, &[], as_bytes_mut(buf), Ok(()))
    }

    /// One allreduce over several buffers as if they were laid end to end,
    /// each reduced in place (Gloo's allreduce over a list of pointers):
    /// tensors of a training step reduced by one collective, without copying
    /// them into one buffer and back. Every rank passes buffers of the same
    /// total length (how it is split may differ); the algorithm is chosen by
    /// the total size, and the bits equal [`Communicator::allreduce`] of the
    /// concatenation.
    ///
    /// ```
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// let (mut a, mut b) = (vec![1.0f32; 3], vec![2.0f32; 5]);
    /// comm.allreduce_parts(&mut [&mut a[..], &mut b[..]], kolo::ReduceOp::Sum)?;
    /// assert_eq!((a[0], b[4]), (1.0, 2.0));
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_parts<T: Element>(&self, parts: &mut [&mut [T]], op: ReduceOp) -> Result<()> {
        let bytes = parts.iter().map(|p| std::mem::size_of_val(*p)).sum();
        self.allreduce_parts_with(parts, op, self.allreduce_algo(bytes))
    }

    /// [`Communicator::allreduce_parts`] with a given algorithm (every rank
    /// the same, as for [`Communicator::allreduce_with`]).
    ///
    /// ```
    /// use kolo::algo::cost::Algo;
    /// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
    /// let (mut a, mut b) = (vec![1i32; 2], vec![2i32; 2]);
    /// comm.allreduce_parts_with(&mut [&mut a[..], &mut b[..]], kolo::ReduceOp::Max, Algo::Ring)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_parts_with<T: Element>(
        &self,
        parts: &mut [&mut [T]],
        op: ReduceOp,
        algo: Algo,
    ) -> Result<()> {
        let mut bytes: Vec<&mut [u8]> = parts.iter_mut().map(|p| as_bytes_mut(p)).collect();
        let n = if op == ReduceOp::Avg { self.size() } else { 1 };
        self.allreduce_parts_bytes(T::DTYPE, &mut bytes, op, Some(algo), n)
    }

    /// [`Communicator::allreduce_parts_with`] on raw bytes of `dtype`
    /// elements (each part a whole number of them, aligned), for the engine;
    /// `None`: the algorithm `auto` picks for the total size. An `Avg`
    /// divides by `divide_by` (the engine's count of contributing ranks).
    pub(crate) fn allreduce_parts_bytes(
        &self,
        dtype: DType,
        parts: &mut [&mut [u8]],
        op: ReduceOp,
        algo: Option<Algo>,
        divide_by: usize,
    ) -> Result<()> {
        let elem = dtype.size();
        let bytes: usize = parts.iter().map(|p| p.len()).sum();
        let check = match parts
            .iter()
            .find(|p| p.len() % elem != 0 || (p.as_ptr() as usize) % elem != 0)
        {
            Some(_) => Err(format!(
                "a part is not a whole number of aligned {dtype} elements"
            )),
            None => Ok(()),
        };
        let count = bytes / elem;
        let algo = algo.unwrap_or(self.allreduce_algo(bytes));
        let sched = self.allreduce_schedule(algo, count, elem);
        let mut call = self.call::<u8>("allreduce", coll::ALLREDUCE, op, 0, count);
        call.dtype = dtype;
        call.wire = dtype;
        call.desc.dtype = dtype.code();
        if op == ReduceOp::Avg {
            call.divide_by = divide_by;
        }
        self.run_with(call, check, |t, call, ws, opts| {
            exec::run_parts(t, &sched, call, parts, ws, opts)
        })
    }

    fn allreduce_schedule(&self, algo: Algo, count: usize, elem: usize) -> Schedule {
        let (r, n) = (self.rank(), self.size());
        match algo {
            // The ring walks the buffer in cache-sized slices (see ring::allreduce_sliced).
            Algo::Ring if self.cfg.slice_bytes > 0 => algo::ring::allreduce_sliced(
                r,
                n,
                count,
                algo::ring::slice_len(self.cfg.slice_bytes, n, elem),
            ),
            _ => algo::cost::allreduce_schedule(
                algo,
                r,
                n,
                count,
                (self.cfg.segment_bytes / elem).max(1),
            ),
        }
    }

    /// Allreduce of f32 values that travel as `wire` (`F16` or `BF16`): the
    /// same algorithm and schedule as [`Communicator::allreduce`] on this
    /// buffer, with half the bytes on the wire; every hop decodes, reduces in
    /// f32 and rounds the result to `wire` (see [`crate::exec`]), so every rank
    /// ends with the same bits. `Avg` divides the rounded sum by the rank count
    /// in f32. Used by [`crate::compress`].
    pub(crate) fn allreduce_narrow(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        wire: DType,
    ) -> Result<()> {
        let n = self.size();
        let count = buf.len();
        let check = if reduce::is_wire16(wire) {
            Ok(())
        } else {
            Err(format!("{wire} is not a 16-bit wire format"))
        };
        let algo = self.allreduce_algo(std::mem::size_of_val(buf));
        let sched = self.allreduce_schedule(algo, count, 4);
        let mut call = self.call::<f32>("allreduce", coll::ALLREDUCE_NARROW, op, 0, count);
        if check.is_ok() {
            call.wire = wire;
            call.desc.dtype = wire.code();
        }
        self.run(call, &sched, &[], as_bytes_mut(buf), check)?;
        if op == ReduceOp::Avg {
            reduce::divide(buf, n);
        }
        Ok(())
    }

    /// Allreduce of f32 values with gradient compression (see [`crate::compress`]):
    /// fp16/bf16 on the wire with f32 accumulation, or top-k sparsification with
    /// error feedback. `state` belongs to this tensor (it keeps the top-k residual
    /// between calls; give each tensor its own). Every rank must pass the same
    /// compression and op; every rank ends with the same bits. Returns what the
    /// call cost on the wire and what it did.
    ///
    /// ```no_run
    /// use kolo::compress::{Compression, CompressState, TopKConfig};
    /// # let comm = kolo::Communicator::from_env()?;
    /// let mut state = CompressState::new();
    /// let mut grad = vec![0.1f32; 1 << 20];
    /// let c = Compression::TopK(TopKConfig::default());
    /// let stats = comm.allreduce_compressed(&mut grad, kolo::ReduceOp::Avg, &c, &mut state)?;
    /// println!("sent {} bytes, {} values", stats.bytes_sent, stats.nnz);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_compressed(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        compression: &crate::compress::Compression,
        state: &mut crate::compress::CompressState,
    ) -> Result<crate::compress::Stats> {
        crate::compress::allreduce(self, buf, op, compression, state)
    }

    /// Small gathers among few ranks go direct (one step, every rank sending
    /// to every other); the rest round the ring (N-1 steps, bandwidth-optimal).
    fn allgather_schedule(&self, counts: &[usize], elem: usize) -> Schedule {
        let (r, n) = (self.rank(), self.size());
        let bytes = counts.iter().sum::<usize>() * elem;
        if n <= DIRECT_MAX_RANKS && bytes <= self.cfg.small_bytes {
            algo::direct::allgatherv(r, n, counts)
        } else {
            algo::ring::allgatherv(r, n, counts)
        }
    }

    /// Fail the next collective on this rank with `msg` as an invalid argument
    /// and tell every peer, so none waits for a call this rank will not make.
    pub(crate) fn fail_call(&self, name: &'static str, msg: String) -> Error {
        let call = self.call::<u8>(name, coll::ALLGATHER, ReduceOp::Sum, 0, 0);
        match self.run(call, &Schedule::default(), &[], &mut [], Err(msg)) {
            Err(e) => e,
            Ok(()) => Error::InvalidArgument(format!("{name}: failed")),
        }
    }

    /// Copy `root`'s buffer to every rank.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// let mut params = vec![comm.rank() as f64; 10];
    /// comm.broadcast(&mut params, 0)?;
    /// assert_eq!(params[0], 0.0);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let (r, n, count) = (self.rank(), self.size(), buf.len());
        let check = if root >= n {
            Err(format!("broadcast root {root} is not below size {n}"))
        } else {
            Ok(())
        };
        let elem = T::DTYPE.size();
        let sched = if root >= n {
            Schedule::default()
        } else if count * elem <= self.cfg.segment_bytes {
            algo::broadcast::binomial(r, n, root, count)
        } else {
            algo::broadcast::chain(r, n, root, count, (self.cfg.segment_bytes / elem).max(1))
        };
        let call = self.call::<T>("broadcast", coll::BROADCAST, ReduceOp::Sum, root, count);
        self.run(call, &sched, &[], as_bytes_mut(buf), check)
    }

    /// Gather every rank's `send` into `recv` (`size * send.len()` elements, rank order).
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// let mut all = vec![0i32; comm.size()];
    /// comm.allgather(&[comm.rank() as i32], &mut all)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allgather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        let check = if recv.len() != n * send.len() {
            Err(format!(
                "allgather: recv has {} elements, expected size * send = {n} * {} = {}",
                recv.len(),
                send.len(),
                n * send.len()
            ))
        } else {
            Ok(())
        };
        let sched = match check {
            Ok(()) => self.allgather_schedule(&vec![send.len(); n], T::DTYPE.size()),
            Err(_) => Schedule::default(),
        };
        let call = self.call::<T>("allgather", coll::ALLGATHER, ReduceOp::Sum, 0, send.len());
        self.run(call, &sched, as_bytes(send), as_bytes_mut(recv), check)
    }

    /// Gather with a different count per rank: `counts[i]` elements from rank i,
    /// laid out in rank order in `recv`.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// let counts: Vec<usize> = (0..comm.size()).map(|i| i + 1).collect();
    /// let mine = vec![1u8; comm.rank() + 1];
    /// let mut all = vec![0u8; counts.iter().sum()];
    /// comm.allgatherv(&mine, &mut all, &counts)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allgatherv<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        let (r, n) = (self.rank(), self.size());
        let total: usize = counts.iter().sum();
        let check = if counts.len() != n {
            Err(format!(
                "allgatherv: {} counts given for {n} ranks",
                counts.len()
            ))
        } else if counts[r] != send.len() {
            Err(format!(
                "allgatherv: counts[{r}] = {} but send has {} elements",
                counts[r],
                send.len()
            ))
        } else if recv.len() != total {
            Err(format!(
                "allgatherv: recv has {} elements, counts sum to {total}",
                recv.len()
            ))
        } else {
            Ok(())
        };
        let sched = match check {
            Ok(()) => self.allgather_schedule(counts, T::DTYPE.size()),
            Err(_) => Schedule::default(),
        };
        let call = self.call::<T>("allgatherv", coll::ALLGATHERV, ReduceOp::Sum, 0, total);
        self.run(call, &sched, as_bytes(send), as_bytes_mut(recv), check)
    }

    /// Reduce `send` (`size * recv.len()` elements) across ranks and leave block
    /// `rank` of the result in `recv`.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// let send = vec![1.0f32; 4 * comm.size()];
    /// let mut mine = vec![0.0f32; 4];
    /// comm.reduce_scatter(&send, &mut mine, kolo::ReduceOp::Sum)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let (r, n, per) = (self.rank(), self.size(), recv.len());
        let check = if send.len() != n * per {
            Err(format!(
                "reduce_scatter: send has {} elements, expected size * recv = {n} * {per} = {}",
                send.len(),
                n * per
            ))
        } else {
            Ok(())
        };
        // The ring reduces in place, so it works on a copy of the input.
        let mut work: Vec<T> = if check.is_ok() {
            send.to_vec()
        } else {
            Vec::new()
        };
        let sched = match check {
            Ok(()) => algo::ring::reduce_scatter(r, n, per),
            Err(_) => Schedule::default(),
        };
        let call = self.call::<T>("reduce_scatter", coll::REDUCE_SCATTER, op, 0, per);
        self.run(call, &sched, &[], as_bytes_mut(&mut work), check)?;
        recv.copy_from_slice(&work[r * per..(r + 1) * per]);
        if op == ReduceOp::Avg {
            reduce::divide(recv, n);
        }
        Ok(())
    }

    /// Block j of `send` goes to rank j; block i of `recv` comes from rank i.
    /// Both hold `size` equal blocks.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// let send: Vec<i64> = (0..comm.size() as i64).collect();
    /// let mut recv = vec![0i64; comm.size()];
    /// comm.alltoall(&send, &mut recv)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn alltoall<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        let check = if send.len() != recv.len() || send.len() % n != 0 {
            Err(format!(
                "alltoall: send ({}) and recv ({}) must have the same length, a multiple of size {n}",
                send.len(),
                recv.len()
            ))
        } else {
            Ok(())
        };
        let per = send.len() / n;
        let sched = match check {
            Ok(()) => algo::alltoall::pairwise(self.rank(), n, per),
            Err(_) => Schedule::default(),
        };
        let call = self.call::<T>("alltoall", coll::ALLTOALL, ReduceOp::Sum, 0, per);
        self.run(call, &sched, as_bytes(send), as_bytes_mut(recv), check)
    }

    /// Return only when every rank has entered the barrier.
    ///
    /// ```no_run
    /// # let comm = kolo::Communicator::from_env()?;
    /// comm.barrier()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn barrier(&self) -> Result<()> {
        let sched = algo::doubling::barrier(self.rank(), self.size());
        let mut call = self.call::<u8>("barrier", coll::BARRIER, ReduceOp::Sum, 0, 0);
        call.desc.dtype = 0;
        call.desc.op = 0;
        self.run(call, &sched, &[], &mut [], Ok(()))
    }

    fn call<T: Element>(
        &self,
        name: &'static str,
        code: u8,
        op: ReduceOp,
        root: usize,
        count: usize,
    ) -> Call {
        let reduces = matches!(
            code,
            coll::ALLREDUCE | coll::REDUCE_SCATTER | coll::ALLREDUCE_NARROW
        );
        Call {
            desc: Desc {
                coll: code,
                dtype: T::DTYPE.code(),
                op: if reduces { op.code() } else { 0 },
                root: root as u32,
                count: count as u64,
            },
            seq: 0,
            dtype: T::DTYPE,
            wire: T::DTYPE,
            op,
            name,
            divide_by: 0,
        }
    }

    /// Run one collective. A local argument error (`check`) fails this rank and
    /// tells the peers, so no rank is left waiting on a call that never comes.
    fn run(
        &self,
        call: Call,
        sched: &Schedule,
        input: &[u8],
        output: &mut [u8],
        check: std::result::Result<(), String>,
    ) -> Result<()> {
        self.run_with(call, check, |t, call, ws, opts| {
            exec::run(t, sched, call, input, output, ws, opts)
        })
    }

    /// [`Communicator::run`] with the executor call given (`exec::run` or
    /// `exec::run_parts`).
    fn run_with(
        &self,
        mut call: Call,
        check: std::result::Result<(), String>,
        exec: impl FnOnce(&mut Transport, &Call, &mut Workspace, Opts) -> Result<()>,
    ) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &g.failed {
            return Err(e.clone());
        }
        if self.switch.pulled() {
            return Err(self.fail_aborted(&mut g));
        }
        g.seq += 1;
        call.seq = g.seq;
        let inner = &mut *g;
        let res = match check {
            Err(msg) => {
                let e = Error::InvalidArgument(format!(
                    "rank {}: {} #{}: {msg}",
                    self.rank(),
                    call.name,
                    call.seq
                ));
                inner
                    .transport
                    .abort_all(call.desc, call.seq, &e.to_string());
                Err(e)
            }
            Ok(()) => {
                let opts = Opts {
                    segment_bytes: self.cfg.segment_bytes,
                    min_stripe: self.cfg.min_stripe,
                    spin: self.cfg.spin,
                    timeout: self.cfg.timeout,
                    peer_timeout: self.cfg.peer_timeout,
                    heartbeat_timeout: self.cfg.heartbeat_timeout,
                };
                exec(&mut inner.transport, &call, &mut inner.ws, opts)
            }
        };
        if let Err(e) = &res {
            inner.failed = Some(e.clone());
            crate::report::publish(&self.cfg, e);
        }
        res
    }
}

/// The dtype of `T`, for callers that dispatch at run time.
pub fn dtype_of<T: Element>() -> DType {
    T::DTYPE
}
