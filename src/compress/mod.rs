//! Gradient compression for allreduce: fewer bytes on the wire for the same
//! training result.
//!
//! * [`Compression::Fp16`] / [`Compression::Bf16`]: values travel as 16-bit
//!   floats, but every reduction hop decodes, accumulates in f32 and re-encodes
//!   ([`crate::exec`] "narrowing"): the rank's own contribution is added at full
//!   precision and only partial sums are rounded, once per hop. The chunk owner
//!   keeps exactly the rounded bits it sends, so every rank ends bitwise equal.
//!   For `Avg`, values are pre-scaled by 1/N before encoding so sums stay below
//!   fp16's 65504 ([`Prescale`]). Half the bytes of the uncompressed call, with
//!   the same algorithm and message count.
//! * [`Compression::TopK`]: top-k sparsification with error feedback (Deep
//!   Gradient Compression, Lin et al. 2018; error-feedback SGD, Karimireddy et
//!   al. 2019); see [`topk`].
//!
//! Every call returns [`Stats`]: bytes sent and received counted at the socket,
//! values contributed, whether it fell back to dense, and whether any value is
//! NaN or infinite (reported, not silently spread).
//!
//! ```no_run
//! use kolo::compress::{Compression, CompressState};
//! # let comm = kolo::Communicator::from_env()?;
//! let mut grad = vec![1e-3f32; 1 << 20];
//! let mut state = CompressState::new(); // one per tensor, kept across steps
//! let c = Compression::parse("topk:0.01").unwrap();
//! let stats = comm.allreduce_compressed(&mut grad, kolo::ReduceOp::Avg, &c, &mut state)?;
//! assert!(!stats.non_finite);
//! # Ok::<(), kolo::Error>(())
//! ```

pub mod topk;

pub use topk::{Selection, TopKConfig};

use crate::comm::Communicator;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::reduce::{self, ReduceOp};

/// How an allreduce compresses its f32 values.
///
/// ```
/// use kolo::compress::Compression;
/// assert_eq!(Compression::parse("fp16"), Some(Compression::Fp16));
/// assert_eq!(Compression::parse("topk:0.05").unwrap().to_string(), "topk:0.05");
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Compression {
    /// Plain f32 allreduce.
    #[default]
    None,
    /// IEEE half precision on the wire, f32 accumulation.
    Fp16,
    /// bfloat16 on the wire, f32 accumulation.
    Bf16,
    /// Top-k sparsification with error feedback.
    TopK(TopKConfig),
}

impl Compression {
    /// Parse `none`, `fp16`, `bf16`, `topk` or `topk:DENSITY` (e.g. `topk:0.01`).
    ///
    /// ```
    /// use kolo::compress::Compression;
    /// assert!(matches!(Compression::parse("topk"), Some(Compression::TopK(c)) if c.density == 0.01));
    /// assert_eq!(Compression::parse("topk:2"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Compression> {
        let s = s.trim().to_ascii_lowercase();
        Some(match s.as_str() {
            "none" => Compression::None,
            "fp16" | "f16" | "half" => Compression::Fp16,
            "bf16" | "bfloat16" => Compression::Bf16,
            "topk" => Compression::TopK(TopKConfig::default()),
            _ => {
                let d: f64 = s.strip_prefix("topk:")?.parse().ok()?;
                if !(d > 0.0 && d <= 1.0) {
                    return None;
                }
                Compression::TopK(TopKConfig {
                    density: d,
                    ..TopKConfig::default()
                })
            }
        })
    }
}

/// Prints the form [`Compression::parse`] reads.
///
/// ```
/// assert_eq!(kolo::compress::Compression::Bf16.to_string(), "bf16");
/// ```
impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Fp16 => f.write_str("fp16"),
            Compression::Bf16 => f.write_str("bf16"),
            Compression::TopK(c) => write!(f, "topk:{}", c.density),
        }
    }
}

/// Pre-scaling of fp16/bf16 values by 1/N before encoding, so that the sum of N
/// large values does not overflow the wire format (fp16 ends at 65504).
///
/// ```
/// use kolo::compress::Prescale;
/// assert_eq!(Prescale::default(), Prescale::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prescale {
    /// On for `Avg` (the division happens first instead of last), off otherwise.
    #[default]
    Auto,
    /// Also for `Sum`: divide by N before, multiply by N after (in f32).
    On,
    /// Never.
    Off,
}

/// What one compressed call did.
///
/// ```
/// let s = kolo::compress::Stats::default();
/// assert_eq!((s.bytes_sent, s.nnz, s.fell_back_to_dense), (0, 0, false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Bytes this rank wrote to its sockets for the call (frame headers included).
    pub bytes_sent: u64,
    /// Bytes this rank read from its sockets for the call.
    pub bytes_received: u64,
    /// Values this rank contributed: the selected entries for top-k, every
    /// element for dense calls.
    pub nnz: usize,
    /// Values summed into the result over all ranks (top-k: the gathered pairs).
    pub nnz_total: usize,
    /// A top-k call sent its tensor densely (small tensor, or sparse would cost more).
    pub fell_back_to_dense: bool,
    /// The result, or this rank's contribution, holds a NaN or an infinity.
    pub non_finite: bool,
}

/// Per-tensor state kept across calls: the top-k error-feedback residual and
/// momentum, the step count (for density warm-up) and reusable buffers. Give
/// every tensor its own; one used with a tensor of another length is an error.
///
/// ```
/// let mut s = kolo::compress::CompressState::new();
/// assert_eq!(s.step(), 0);
/// assert!(s.residual().is_empty());
/// s.prescale = kolo::compress::Prescale::On;
/// ```
#[derive(Debug, Clone, Default)]
pub struct CompressState {
    /// fp16/bf16 pre-scaling for this tensor.
    pub prescale: Prescale,
    pub(crate) residual: Vec<f32>,
    pub(crate) momentum: Vec<f32>,
    pub(crate) step: u64,
}

impl CompressState {
    /// Empty state: no residual yet, step 0.
    ///
    /// ```
    /// assert_eq!(kolo::compress::CompressState::new().step(), 0);
    /// ```
    pub fn new() -> CompressState {
        CompressState::default()
    }

    /// The error-feedback residual: what selection has not sent yet (empty
    /// before the first top-k call or without error feedback).
    ///
    /// ```
    /// assert!(kolo::compress::CompressState::new().residual().is_empty());
    /// ```
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Top-k calls made with this state.
    ///
    /// ```
    /// assert_eq!(kolo::compress::CompressState::new().step(), 0);
    /// ```
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Forget the residual, momentum and step count (keeps [`CompressState::prescale`]).
    ///
    /// ```
    /// let mut s = kolo::compress::CompressState::new();
    /// s.reset();
    /// assert_eq!(s.step(), 0);
    /// ```
    pub fn reset(&mut self) {
        self.residual = Vec::new();
        self.momentum = Vec::new();
        self.step = 0;
    }
}

/// Payload bytes one rank sends in a dense ring allreduce of `count` f32
/// values on `nranks` ranks: `2 (N-1)/N * 4 count` (chunk rounding included,
/// frame headers not). The baseline of the compression ratio.
///
/// ```
/// assert_eq!(kolo::compress::dense_ring_bytes(1000, 4), 6000);
/// assert_eq!(kolo::compress::dense_ring_bytes(1000, 1), 0);
/// ```
pub fn dense_ring_bytes(count: usize, nranks: usize) -> u64 {
    if nranks <= 1 {
        return 0;
    }
    crate::algo::ring::allreduce(0, nranks, count).elements_sent() as u64 * 4
}

/// Whether any value is NaN or infinite (branch-free, vectorizes).
pub(crate) fn any_non_finite(v: &[f32]) -> bool {
    v.chunks(4096).any(|c| {
        c.iter().fold(0u32, |a, x| {
            a | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
        }) != 0
    })
}

/// The implementation of [`Communicator::allreduce_compressed`].
pub(crate) fn allreduce(
    comm: &Communicator,
    buf: &mut [f32],
    op: ReduceOp,
    compression: &Compression,
    state: &mut CompressState,
) -> Result<Stats> {
    let before = comm.bytes_on_wire();
    let mut stats = match compression {
        Compression::None => {
            comm.allreduce(buf, op)?;
            Stats {
                nnz: buf.len(),
                nnz_total: buf.len() * comm.size(),
                non_finite: any_non_finite(buf),
                ..Stats::default()
            }
        }
        Compression::Fp16 => cast(comm, buf, op, DType::F16, state.prescale)?,
        Compression::Bf16 => cast(comm, buf, op, DType::BF16, state.prescale)?,
        Compression::TopK(cfg) => topk::allreduce(comm, buf, op, cfg, state)?,
    };
    let after = comm.bytes_on_wire();
    stats.bytes_sent = after.0 - before.0;
    stats.bytes_received = after.1 - before.1;
    Ok(stats)
}

/// fp16/bf16 on the wire, f32 accumulation.
fn cast(
    comm: &Communicator,
    buf: &mut [f32],
    op: ReduceOp,
    wire: DType,
    prescale: Prescale,
) -> Result<Stats> {
    let n = comm.size();
    let sums = matches!(op, ReduceOp::Sum | ReduceOp::Avg);
    let pre = n > 1
        && sums
        && match prescale {
            Prescale::Auto => op == ReduceOp::Avg,
            Prescale::On => true,
            Prescale::Off => false,
        };
    if pre {
        // True division: the correctly rounded x/N, as Avg would compute last.
        reduce::divide(buf, n);
        comm.allreduce_narrow(buf, ReduceOp::Sum, wire)?;
        if op == ReduceOp::Sum {
            let m = n as f32;
            buf.iter_mut().for_each(|x| *x *= m);
        }
    } else {
        comm.allreduce_narrow(buf, op, wire)?;
    }
    Ok(Stats {
        nnz: buf.len(),
        nnz_total: buf.len() * n,
        non_finite: any_non_finite(buf),
        ..Stats::default()
    })
}

/// A local argument error on every rank's behalf: this rank fails and tells
/// its peers, so nobody waits for a collective this rank will not run.
pub(crate) fn invalid(comm: &Communicator, msg: String) -> Error {
    comm.fail_call("allreduce_compressed", msg)
}
