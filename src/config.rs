//! One place for configuration: a [`Config`] filled from `KOLO_*` variables,
//! from the variables other launchers set (torchrun, mpirun, srun), or in code.

use crate::error::{Error, Result};
use std::time::Duration;

/// Default segment size: big enough to amortise a syscall, small enough that a
/// reduced segment stays in L2 while the next one is on the wire.
pub const DEFAULT_SEGMENT_BYTES: usize = 512 * 1024;
/// Default port of the rendezvous store when none is given (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Every variable kolo reads, with its default and meaning; `kolorun --help` prints this.
pub const ENV_DOC: &[(&str, &str, &str)] = &[
    ("KOLO_RANK", "-", "rank of this process (else RANK, OMPI_COMM_WORLD_RANK, SLURM_PROCID)"),
    ("KOLO_SIZE", "-", "number of ranks (else WORLD_SIZE, OMPI_COMM_WORLD_SIZE, SLURM_NTASKS)"),
    ("KOLO_LOCAL_RANK", "0", "rank on this host (else LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID)"),
    ("KOLO_LOCAL_SIZE", "1", "ranks on this host (else LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE, SLURM_NTASKS_PER_NODE)"),
    ("KOLO_MASTER_ADDR", "127.0.0.1 if all ranks are local", "host of the rendezvous store (else MASTER_ADDR)"),
    ("KOLO_MASTER_PORT", "29500", "port of the rendezvous store (else MASTER_PORT)"),
    ("KOLO_STORE", "rank0", "who serves the store: rank0, or external (a launcher such as kolorun)"),
    ("KOLO_SECRET", "- (kolorun: a fresh random one per job)", "shared secret every connection proves with an HMAC handshake; the same on every rank; never printed (without it a job on non-loopback addresses refuses to start unless KOLO_INSECURE=1; on loopback it runs unauthenticated and warns once)"),
    ("KOLO_INSECURE", "0", "1: let a job whose addresses are not loopback run without KOLO_SECRET, unauthenticated (without it such a job refuses to start)"),
    ("KOLO_IFACE", "auto", "interface whose address is advertised to peers (auto: the one that routes to the master)"),
    ("KOLO_TIMEOUT", "60", "seconds a collective may go without moving a byte before it fails"),
    ("KOLO_PEER_TIMEOUT", "6", "seconds without any answer from a peer's host (TCP keepalive/ACKs) while a collective waits on it before it is declared lost (0: never; a hung but reachable peer is caught by KOLO_TIMEOUT)"),
    ("KOLO_HEARTBEAT_TIMEOUT", "10", "seconds without a heartbeat from a peer (each rank's library sends one every 0.5 s from a thread of its own, over UDP on its data port) while a collective waits before that peer is named frozen (stopped, a paused VM), without waiting for KOLO_TIMEOUT; a rank busy between collectives keeps beating (0: off)"),
    ("KOLO_START_TIMEOUT", "60", "seconds to wait for every rank to arrive at rendezvous"),
    ("KOLO_SEGMENT_BYTES", "524288", "pipeline segment size in bytes"),
    ("KOLO_SPIN_US", "50", "microseconds to busy-poll sockets before sleeping in epoll"),
    ("KOLO_SMALL_BYTES", "65536", "allgather of at most this many bytes on up to 16 ranks goes to every rank in one step instead of around the ring"),
    ("KOLO_ALGO", "auto", "allreduce algorithm: auto, ring, tree, rhd, rd or binomial (auto: by the alpha-beta-gamma model measured at start, per message size and world size; kolo-bench prints the crossovers)"),
    ("KOLO_CALIBRATE", "1", "measure alpha (latency per step), beta (bandwidth) and gamma (reduction speed) between neighbours at start, a few ms (0: use KOLO_ALPHA_US/KOLO_BETA_GBPS/KOLO_GAMMA_GBPS or built-in defaults 20 us, 1.5 GB/s, 5 GB/s)"),
    ("KOLO_ALPHA_US", "measured", "latency of one step in microseconds, for the algorithm choice (set: not measured)"),
    ("KOLO_BETA_GBPS", "measured", "bandwidth between neighbours in GB/s, for the algorithm choice (set: not measured)"),
    ("KOLO_GAMMA_GBPS", "measured", "reduction throughput in GB/s, for the algorithm choice (set: not measured)"),
    ("KOLO_NSOCKS", "1", "TCP connections each way per peer (1 to 8); a message of at least twice KOLO_MIN_STRIPE is striped across them (no consistent gain measured on loopback; see benches/RESULTS.md)"),
    ("KOLO_MIN_STRIPE", "262144", "with KOLO_NSOCKS > 1, the smallest stripe in bytes: smaller messages stay on one connection"),
    ("KOLO_SHM_BYTES", "1048576", "shared-memory ring per direction and connection between ranks that advertise the same address (at most 64 MiB of rings per rank: smaller with many ranks, none below 128 KiB): bulk payloads (over 64 KiB) go through it when it has room, headers stay on TCP (0: everything over TCP)"),
    ("KOLO_SOCKET_BUFFER", "1048576", "SO_SNDBUF/SO_RCVBUF of data connections in bytes (0: kernel autotuning)"),
    ("KOLO_SLICE_BYTES", "524288", "large allreduces run the ring over slices of this many bytes per 2 ranks (N/2 times this for N ranks; 0: one slice), so reduced data is forwarded while in cache"),
    ("KOLO_FUSION_THRESHOLD", "67108864", "engine: ready allreduces of one dtype are packed into fusion buffers of at most this many bytes (0: no fusion)"),
    ("KOLO_FUSION_INPLACE_BYTES", "1048576", "engine: an allreduce tensor at least this big runs alone, in place (copying it into a fusion buffer and back costs more than the latency fusion saves)"),
    ("KOLO_CYCLE_TIME_MS", "1", "engine: after the first new tensor, wait at most this long for more before negotiating (a pause of an eighth of it, or the caller blocking on a result still pending, ends a burst early)"),
    ("KOLO_CACHE_CAPACITY", "1024", "engine: negotiated tensors remembered so that repeated steps agree by one small exchange of bits instead of full descriptions (0: no cache)"),
    ("KOLO_STALL_WARNING_S", "60", "engine: log which ranks are missing which tensors once a tensor has waited this long"),
    ("KOLO_STALL_SHUTDOWN_S", "600", "engine: fail tensors that have waited this long for missing ranks (0: never)"),
    ("KOLO_TIMELINE", "-", "engine: write a Chrome-trace/Perfetto timeline to <path>.<rank>.json"),
    ("KOLO_TORCH_OVERLAP", "1", "torch: DistributedOptimizer submits each gradient to the engine from an autograd hook as soon as backward has accumulated it, so the allreduce overlaps the rest of backward (0: all gradients after backward, as before)"),
    ("KOLO_MEMBER_ID", "KOLO_RANK", "elastic: stable id of this member across membership epochs (kolorun --min-np sets it)"),
    ("KOLO_MIN_NP", "1", "elastic: fewest members the job continues with"),
    ("KOLO_ELASTIC_TIMEOUT", "30", "elastic: seconds an epoch's registration waits for live members that have not registered"),
    ("KOLO_ELASTIC_CONNECT_TIMEOUT", "10", "elastic: seconds to connect an epoch's mesh (a member lost during the change is noticed within it)"),
];

/// Everything a [`crate::Communicator`] needs to start.
///
/// ```
/// let cfg = kolo::Config::local(0, 1, 29999);
/// assert_eq!(cfg.size, 1);
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// This process's rank, in `0..size`.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
    /// Rank among the processes on this host.
    pub local_rank: usize,
    /// Number of processes on this host.
    pub local_size: usize,
    /// Host of the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// Whether rank 0 serves the store (false when a launcher serves it).
    pub serve_store: bool,
    /// Shared job secret (`KOLO_SECRET`): every store and data connection
    /// starts with a mutual HMAC handshake over it; `None`: unauthenticated.
    pub secret: Option<crate::auth::Secret>,
    /// Run unauthenticated on non-loopback addresses (`KOLO_INSECURE=1`);
    /// without it such a job with no secret refuses to start.
    pub insecure: bool,
    /// Interface or address to advertise (`KOLO_IFACE`); `None` picks automatically.
    pub iface: Option<String>,
    /// How long a collective may go without any byte moving before it fails.
    pub timeout: Duration,
    /// How long a peer's host may stay silent (no data, no ACK of our data or
    /// keepalive probes) while a collective waits on it before the peer is
    /// declared lost (`None`: never). A peer that is alive but not reading
    /// (stopped, busy) still answers at the TCP level, so only [`Config::timeout`]
    /// catches it.
    pub peer_timeout: Option<Duration>,
    /// How long a peer's heartbeats may stop while a collective waits before
    /// it is named frozen (`KOLO_HEARTBEAT_TIMEOUT`; `None`: off).
    pub heartbeat_timeout: Option<Duration>,
    /// Deadline for rendezvous and connection setup.
    pub start_timeout: Duration,
    /// Pipeline segment size in bytes.
    pub segment_bytes: usize,
    /// TCP connections each way per peer (`KOLO_NSOCKS`, 1 to 8).
    pub nsocks: usize,
    /// With `nsocks` > 1, the smallest stripe of a message, in bytes.
    pub min_stripe: usize,
    /// How long to busy-poll before blocking in epoll.
    pub spin: Duration,
    /// Allgather up to this many bytes (on up to 16 ranks) goes directly to every rank.
    pub small_bytes: usize,
    /// Ring allreduce works through the buffer in slices of this many bytes (0: whole buffer).
    pub slice_bytes: usize,
    /// Allreduce algorithm to force (`None`: choose by message size).
    pub algo: Option<crate::algo::cost::Algo>,
    /// Measure the cost model at start ([`crate::algo::cost::Model`]) for
    /// what `alpha_us`, `beta_gbps` and `gamma_gbps` leave unset.
    pub calibrate: bool,
    /// Latency of one step in microseconds (`None`: measured or default).
    pub alpha_us: Option<f64>,
    /// Bandwidth between neighbours in GB/s (`None`: measured or default).
    pub beta_gbps: Option<f64>,
    /// Reduction throughput in GB/s (`None`: measured or default).
    pub gamma_gbps: Option<f64>,
    /// Socket buffer size for data connections (0: kernel autotuning, which
    /// starts sends at 16 KiB, far below what a bulk transfer needs).
    pub socket_buffer: usize,
    /// Bytes of each shared-memory ring to a rank of the same host
    /// (`KOLO_SHM_BYTES`; 0: none).
    pub shm_bytes: usize,
    /// Engine: largest fusion buffer in bytes (0: every tensor alone).
    pub fusion_threshold: usize,
    /// Engine: tensors at least this big are reduced alone, in place.
    pub fusion_inplace_bytes: usize,
    /// Engine: how long to gather more tensors after the first one arrives.
    pub cycle_time: Duration,
    /// Engine: how many negotiated tensors the response cache remembers.
    pub cache_capacity: usize,
    /// Engine: a tensor waiting this long for missing ranks is reported.
    pub stall_warning: Duration,
    /// Engine: a tensor waiting this long for missing ranks fails (`None`: never).
    pub stall_shutdown: Option<Duration>,
    /// Engine: timeline path prefix (`<path>.<rank>.json`).
    pub timeline: Option<std::path::PathBuf>,
    /// `kolo::torch`: reduce gradients while backward runs (`KOLO_TORCH_OVERLAP`).
    pub torch_overlap: bool,
}

impl Config {
    /// A config for `size` ranks on this host with the store on 127.0.0.1:`port`.
    pub fn local(rank: usize, size: usize, port: u16) -> Config {
        Config {
            rank,
            size,
            local_rank: rank,
            local_size: size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            insecure: false,
            heartbeat_timeout: Some(Duration::from_secs(10)),
            serve_store: true,
            secret: None,
            iface: None,
            timeout: Duration::from_secs(60),
            peer_timeout: Some(Duration::from_secs(6)),
            start_timeout: Duration::from_secs(60),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            nsocks: 1,
            min_stripe: 256 << 10,
            spin: Duration::from_micros(50),
            small_bytes: 64 * 1024,
            slice_bytes: 512 << 10,
            socket_buffer: 1 << 20,
            shm_bytes: 1 << 20,
            algo: None,
            calibrate: true,
            alpha_us: None,
            beta_gbps: None,
            gamma_gbps: None,
            fusion_threshold: 64 << 20,
            fusion_inplace_bytes: 1 << 20,
            cycle_time: Duration::from_millis(1),
            cache_capacity: 1024,
            stall_warning: Duration::from_secs(60),
            stall_shutdown: Some(Duration::from_secs(600)),
            timeline: None,
            torch_overlap: true,
        }
    }

    /// Fill from the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_vars(|k| std::env::var(k).ok())
    }

    /// Fill from any variable source (used by tests and by `from_env`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        // Launcher families in order of precedence; the first that defines a rank wins,
        // so a Slurm allocation running mpirun (which also sets SLURM_PROCID) still works.
        let families: [(&str, [&str; 4]); 4] = [
            (
                "kolo",
                [
                    "KOLO_RANK",
                    "KOLO_SIZE",
                    "KOLO_LOCAL_RANK",
                    "KOLO_LOCAL_SIZE",
                ],
            ),
            (
                "torchrun",
                ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
            ),
            (
                "mpirun",
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_SIZE",
                ],
            ),
            (
                "srun",
                [
                    "SLURM_PROCID",
                    "SLURM_NTASKS",
                    "SLURM_LOCALID",
                    "SLURM_NTASKS_PER_NODE",
                ],
            ),
        ];
        let num = |k: &str| -> Result<Option<usize>> {
            let Some(v) = get(k).filter(|v| !v.trim().is_empty()) else {
                return Ok(None);
            };
            // SLURM_NTASKS_PER_NODE may read "4(x2)"; the leading number is ours.
            let head = match k {
                "SLURM_NTASKS_PER_NODE" => v.trim().split('(').next().unwrap_or(""),
                _ => v.trim(),
            };
            match head.parse::<usize>() {
                Ok(x) if x <= MAX_RANKS => Ok(Some(x)),
                _ => Err(Error::Config(format!(
                    "{k}={v:?} is not an integer from 0 to {MAX_RANKS}"
                ))),
            }
        };
        let mut chosen = None;
        for (name, vars) in families.iter() {
            if get(vars[0]).is_some_and(|v| !v.trim().is_empty()) {
                chosen = Some((*name, *vars));
                break;
            }
        }
        let (family, vars) = chosen.ok_or_else(|| {
            Error::Config(
                "no rank given: set KOLO_RANK and KOLO_SIZE (or start under kolorun, torchrun, mpirun or srun)"
                    .into(),
            )
        })?;
        let rank = num(vars[0])?.expect("checked above");
        let size = num(vars[1])?.ok_or_else(|| {
            Error::Config(format!(
                "{} is set ({family}) but {} is missing",
                vars[0], vars[1]
            ))
        })?;
        if size == 0 {
            return Err(Error::Config(format!(
                "{}=0: world size must be at least 1",
                vars[1]
            )));
        }
        if rank >= size {
            return Err(Error::Config(format!(
                "{}={rank} contradicts {}={size}: rank must be below size",
                vars[0], vars[1]
            )));
        }
        let local_rank = num(vars[2])?;
        let local_size = num(vars[3])?;
        let (local_rank, local_size) = match (local_rank, local_size) {
            (Some(r), Some(s)) => (r, s),
            (Some(r), None) => (r, size),
            (None, Some(s)) => (rank % s.max(1), s),
            (None, None) => (rank, size),
        };
        if local_size == 0 || local_size > size {
            return Err(Error::Config(format!(
                "{}={local_size} contradicts {}={size}: local size must be in 1..=size",
                vars[3], vars[1]
            )));
        }
        if local_rank >= local_size {
            return Err(Error::Config(format!(
                "{}={local_rank} contradicts {}={local_size}: local rank must be below local size",
                vars[2], vars[3]
            )));
        }
        let master_addr = match get("KOLO_MASTER_ADDR").or_else(|| get("MASTER_ADDR")) {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if local_size == size => "127.0.0.1".to_string(),
            _ => {
                return Err(Error::Config(format!(
                    "KOLO_MASTER_ADDR (or MASTER_ADDR) is not set and the job spans several hosts \
                     ({family}: local size {local_size} < size {size})"
                )))
            }
        };
        let port_var = get("KOLO_MASTER_PORT").or_else(|| get("MASTER_PORT"));
        let master_port = match port_var.filter(|p| !p.trim().is_empty()) {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "KOLO_MASTER_PORT/MASTER_PORT={p:?} is not a port number (1 to 65535)"
                    ))
                })?,
        };
        let serve_store = match get("KOLO_STORE").as_deref().map(str::trim) {
            None | Some("") | Some("rank0") => true,
            Some("external") => false,
            Some(o) => {
                return Err(Error::Config(format!(
                    "KOLO_STORE={o:?}: expected rank0 or external"
                )))
            }
        };
        let mut cfg = Config::local(rank, size, master_port);
        cfg.local_rank = local_rank;
        cfg.local_size = local_size;
        cfg.master_addr = master_addr;
        cfg.serve_store = serve_store;
        cfg.secret = get("KOLO_SECRET").and_then(|s| crate::auth::Secret::new(&s));
        cfg.iface = get("KOLO_IFACE").filter(|s| !s.trim().is_empty());
        cfg.timeline = get("KOLO_TIMELINE")
            .filter(|s| !s.trim().is_empty())
            .map(std::path::PathBuf::from);
        cfg.tune(&Vars(&get))?;
        Ok(cfg)
    }

    /// The performance and timing variables, each range-checked.
    fn tune(&mut self, v: &Vars<'_>) -> Result<()> {
        const GIB: usize = 1 << 30;
        self.timeout = v.secs("KOLO_TIMEOUT", MAX_WAIT_S)?.unwrap_or(self.timeout);
        self.start_timeout = v
            .secs("KOLO_START_TIMEOUT", MAX_WAIT_S)?
            .unwrap_or(self.start_timeout);
        if let Some(s) = v.secs_or_zero("KOLO_PEER_TIMEOUT", MAX_WAIT_S)? {
            self.peer_timeout = s;
        }
        if let Some(s) = v.secs_or_zero("KOLO_HEARTBEAT_TIMEOUT", MAX_WAIT_S)? {
            self.heartbeat_timeout = s;
        }
        let ints: [(&str, usize, usize, &mut usize); 9] = [
            ("KOLO_SEGMENT_BYTES", 4096, GIB, &mut self.segment_bytes),
            (
                "KOLO_NSOCKS",
                1,
                crate::transport::MAX_LANES,
                &mut self.nsocks,
            ),
            ("KOLO_MIN_STRIPE", 1, GIB, &mut self.min_stripe),
            ("KOLO_SHM_BYTES", 0, GIB, &mut self.shm_bytes),
            ("KOLO_SMALL_BYTES", 0, GIB, &mut self.small_bytes),
            ("KOLO_SLICE_BYTES", 0, 64 * GIB, &mut self.slice_bytes),
            ("KOLO_SOCKET_BUFFER", 0, GIB, &mut self.socket_buffer),
            (
                "KOLO_FUSION_THRESHOLD",
                0,
                64 * GIB,
                &mut self.fusion_threshold,
            ),
            (
                "KOLO_FUSION_INPLACE_BYTES",
                0,
                64 * GIB,
                &mut self.fusion_inplace_bytes,
            ),
        ];
        for (k, lo, hi, slot) in ints {
            if let Some(x) = v.int(k, lo, hi)? {
                *slot = x;
            }
        }
        if let Some(x) = v.int("KOLO_CACHE_CAPACITY", 0, 1 << 24)? {
            self.cache_capacity = x;
        }
        if let Some(us) = v.int("KOLO_SPIN_US", 0, 1_000_000)? {
            self.spin = Duration::from_micros(us as u64);
        }
        if let Some(ms) = v.num("KOLO_CYCLE_TIME_MS", 0.0, 10_000.0)? {
            self.cycle_time = Duration::from_secs_f64(ms / 1000.0);
        }
        if let Some(s) = v.num("KOLO_STALL_WARNING_S", 0.0, MAX_WAIT_S)? {
            self.stall_warning = Duration::from_secs_f64(s);
        }
        if let Some(s) = v.secs_or_zero("KOLO_STALL_SHUTDOWN_S", MAX_WAIT_S)? {
            self.stall_shutdown = s;
        }
        self.torch_overlap = match v.text("KOLO_TORCH_OVERLAP").as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(x) => return Err(v.bad("KOLO_TORCH_OVERLAP", x, "expected 0 (off) or 1 (on)")),
        };
        self.insecure = match v.text("KOLO_INSECURE").as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(x) => return Err(v.bad("KOLO_INSECURE", x, "expected 0 or 1")),
        };
        self.calibrate = match v.text("KOLO_CALIBRATE").as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(x) => return Err(v.bad("KOLO_CALIBRATE", x, "expected 0 or 1")),
        };
        self.alpha_us = v.num("KOLO_ALPHA_US", 0.0, 1e7)?;
        self.beta_gbps = v.num("KOLO_BETA_GBPS", 1e-6, 1e6)?;
        self.gamma_gbps = v.num("KOLO_GAMMA_GBPS", 1e-6, 1e6)?;
        self.algo = match v.text("KOLO_ALGO").as_deref() {
            None | Some("auto") => None,
            Some(a) => Some(crate::algo::cost::Algo::parse(a).ok_or_else(|| {
                v.bad(
                    "KOLO_ALGO",
                    a,
                    "expected auto, ring, tree, rhd, rd or binomial",
                )
            })?),
        };
        Ok(())
    }
}

/// The most ranks a job may have: far more than any machine room, small
/// enough that per-rank tables stay allocatable.
pub(crate) const MAX_RANKS: usize = 1 << 20;

/// The longest wait any variable may ask for: a week. Far beyond any job's
/// need, far below where `Duration` arithmetic overflows.
pub const MAX_WAIT_S: f64 = 7.0 * 24.0 * 3600.0;

/// A variable source, read with range checks: a value out of range or not a
/// number is a configuration error naming the variable, never a panic.
pub(crate) struct Vars<'a>(pub(crate) &'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    /// The trimmed value; `None` when unset or empty.
    pub(crate) fn text(&self, k: &str) -> Option<String> {
        (self.0)(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    pub(crate) fn bad(&self, k: &str, v: &str, want: &str) -> Error {
        Error::Config(format!("{k}={v:?}: {want}"))
    }

    /// An integer in `lo..=hi`.
    pub(crate) fn int(&self, k: &str, lo: usize, hi: usize) -> Result<Option<usize>> {
        let Some(v) = self.text(k) else {
            return Ok(None);
        };
        match v.parse::<usize>() {
            Ok(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(self.bad(k, &v, &format!("expected an integer from {lo} to {hi}"))),
        }
    }

    /// A number in `lo..=hi` (fractions allowed).
    pub(crate) fn num(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f64>> {
        let Some(v) = self.text(k) else {
            return Ok(None);
        };
        match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= lo && x <= hi => Ok(Some(x)),
            _ => Err(self.bad(k, &v, &format!("expected a number from {lo} to {hi}"))),
        }
    }

    /// Seconds above 0 and at most `hi`.
    pub(crate) fn secs(&self, k: &str, hi: f64) -> Result<Option<Duration>> {
        match self.num(k, 0.0, hi)? {
            Some(s) if s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(_) => Err(self.bad(k, "0", "must be above 0 seconds")),
            None => Ok(None),
        }
    }

    /// Seconds up to `hi`, where 0 means never: `Some(None)`.
    pub(crate) fn secs_or_zero(&self, k: &str, hi: f64) -> Result<Option<Option<Duration>>> {
        Ok(self
            .num(k, 0.0, hi)?
            .map(|s| (s > 0.0).then(|| Duration::from_secs_f64(s))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn reads_each_launcher() {
        let c = cfg(&[
            ("KOLO_RANK", "1"),
            ("KOLO_SIZE", "4"),
            ("KOLO_MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((c.rank, c.size, c.master_port), (1, 4, 1234));
        let c = cfg(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "3"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "3"),
        ])
        .unwrap();
        assert_eq!(
            (c.rank, c.size, c.local_rank, c.master_addr.as_str()),
            (2, 3, 2, "127.0.0.1")
        );
        let c = cfg(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("SLURM_PROCID", "0"),
        ])
        .unwrap();
        assert_eq!(c.rank, 3);
        let c = cfg(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("MASTER_ADDR", "n1"),
        ])
        .unwrap();
        assert_eq!(
            (c.rank, c.local_rank, c.local_size, c.master_addr.as_str()),
            (5, 1, 4, "n1")
        );
    }

    #[test]
    fn names_missing_and_contradictory_variables() {
        let e = cfg(&[]).unwrap_err().to_string();
        assert!(e.contains("KOLO_RANK"), "{e}");
        let e = cfg(&[("KOLO_RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("KOLO_SIZE"), "{e}");
        let e = cfg(&[("KOLO_RANK", "4"), ("KOLO_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KOLO_RANK=4") && e.contains("KOLO_SIZE=4"),
            "{e}"
        );
        let e = cfg(&[("KOLO_RANK", "x"), ("KOLO_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KOLO_RANK"), "{e}");
        let e = cfg(&[
            ("KOLO_RANK", "0"),
            ("KOLO_SIZE", "4"),
            ("KOLO_LOCAL_SIZE", "2"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = cfg(&[
            ("KOLO_RANK", "0"),
            ("KOLO_SIZE", "2"),
            ("KOLO_TIMEOUT", "-1"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("KOLO_TIMEOUT"), "{e}");
    }

    #[test]
    fn nsocks_and_min_stripe() {
        let with = |k: &str, v: &str| cfg(&[("KOLO_RANK", "0"), ("KOLO_SIZE", "2"), (k, v)]);
        let c = cfg(&[("KOLO_RANK", "0"), ("KOLO_SIZE", "2")]).unwrap();
        assert_eq!((c.nsocks, c.min_stripe), (1, 256 << 10));
        assert_eq!(with("KOLO_NSOCKS", "4").unwrap().nsocks, 4);
        assert_eq!(with("KOLO_MIN_STRIPE", "65536").unwrap().min_stripe, 65536);
        for bad in ["0", "9", "x"] {
            let e = with("KOLO_NSOCKS", bad).unwrap_err().to_string();
            assert!(e.contains("KOLO_NSOCKS"), "{e}");
        }
    }

    #[test]
    fn torch_overlap_is_0_or_1() {
        let with = |v: &str| {
            cfg(&[
                ("KOLO_RANK", "0"),
                ("KOLO_SIZE", "1"),
                ("KOLO_TORCH_OVERLAP", v),
            ])
        };
        assert!(
            cfg(&[("KOLO_RANK", "0"), ("KOLO_SIZE", "1")])
                .unwrap()
                .torch_overlap
        );
        assert!(with("1").unwrap().torch_overlap);
        assert!(!with("0").unwrap().torch_overlap);
        for bad in ["2", "-1", "yes"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("KOLO_TORCH_OVERLAP"), "{e}");
        }
    }

    #[test]
    fn secret_is_read_and_never_shown() {
        let c = cfg(&[("KOLO_RANK", "0"), ("KOLO_SIZE", "1")]).unwrap();
        assert!(c.secret.is_none());
        let c = cfg(&[
            ("KOLO_RANK", "0"),
            ("KOLO_SIZE", "1"),
            ("KOLO_SECRET", "s3cr3t-value"),
        ])
        .unwrap();
        assert_eq!(c.secret, crate::auth::Secret::new("s3cr3t-value"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let c = cfg(&[("KOLO_RANK", "0"), ("KOLO_SIZE", "1"), ("KOLO_SECRET", "")]).unwrap();
        assert!(c.secret.is_none(), "empty means unset");
    }
}
