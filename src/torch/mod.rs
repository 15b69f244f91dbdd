//! Data-parallel training of [`tch`] (libtorch) models: collectives on tensors and a
//! [`DistributedOptimizer`] that averages gradients across ranks through kolo's
//! [`Engine`]. Behind the `torch` feature (`tch = "=0.24.0"`, PyTorch 2.11.0;
//! `scripts/setup-libtorch.sh` sets it up).
//!
//! Every rank builds the same model, [`DistributedOptimizer::broadcast_parameters`]
//! makes the parameters equal, and each [`DistributedOptimizer::backward_step`] averages
//! the gradients of all ranks before the optimizer step, so all ranks stay bitwise
//! identical and train as one process would on the union of their batches. The gradients
//! go through the engine, each under its variable's name: the ranks may produce them in
//! any order, and the engine fuses them into buffers of up to `KOLO_FUSION_THRESHOLD`.
//! Each gradient is submitted from an autograd hook as soon as backward has accumulated
//! it (`KOLO_TORCH_OVERLAP`, on by default), so communication overlaps the rest of
//! backward.
//!
//! Layout: this file has the tensor collectives; `engine_ops` reduces many tensors through
//! the engine, `hooks` (with `hooks.cpp`) installs the autograd hooks, `reducer` is one
//! step's gradient reduction, and `optimizer` is [`DistributedOptimizer`].
//!
//! ```
//! use kolo::torch::tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
//! use kolo::torch::DistributedOptimizer;
//!
//! // Under a launcher: kolo::Communicator::from_env()?; here a job of one rank.
//! let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root() / "fc", 64, 10, Default::default());
//! let opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.1).unwrap();
//! // Starts an engine on the communicator (given back by shutdown).
//! let mut dopt = DistributedOptimizer::new(comm, vs, opt)?;
//! dopt.broadcast_parameters(0)?;
//! for _step in 0..10 {
//!     // This rank's shard of the batch.
//!     let x = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
//!     let y = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
//!     let loss = net.forward(&x).cross_entropy_for_logits(&y);
//!     dopt.backward_step(&loss)?; // zero_grad, backward, average gradients, step
//! }
//! assert!(dopt.parameters_in_sync()?);
//! let (comm, vs, opt) = dopt.shutdown()?;
//! # Ok::<(), kolo::Error>(())
//! ```
//!
//! Supported tensor kinds are those kolo reduces ([`DType`]): `Uint8`, `Int`, `Int64`,
//! `Half`, `BFloat16`, `Float` and `Double`; devices are the CPU and CUDA. Contiguous CPU
//! gradients are reduced in their own memory; CUDA gradients are staged through pinned
//! host memory (one device-to-host and one host-to-device copy per kind and device per
//! step). Anything else gives [`Error::InvalidArgument`].
//!
//! [`allreduce_tensor`], [`broadcast_tensor`] and [`allgather_tensor`] are blocking
//! collectives on a [`Communicator`] (not one an engine owns);
//! [`engine_allreduce_tensor`] reduces a tensor through an engine.

use crate::{Communicator, DType, Element, Error, ReduceOp, Result};
/// The `tch` crate this module is built against (0.24.0); using it through `kolo::torch::tch`
/// keeps a program's tensors the same type as kolo's.
pub use tch;
use tch::{Device, Kind, Tensor};

/// The kolo [`DType`] of a tensor kind, or an error naming the supported kinds.
///
/// ```
/// use kolo::torch::{dtype_of, tch::Kind};
/// assert_eq!(dtype_of(Kind::Float)?, kolo::DType::F32);
/// assert!(dtype_of(Kind::Bool).is_err());
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn dtype_of(kind: Kind) -> Result<DType> {
    Ok(match kind {
        Kind::Uint8 => DType::U8,
        Kind::Int => DType::I32,
        Kind::Int64 => DType::I64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        other => {
            return Err(Error::InvalidArgument(format!(
                "torch: tensor kind {other:?} is not supported (supported: Uint8, Int, Int64, \
                 Half, BFloat16, Float, Double)"
            )))
        }
    })
}

/// The tensor kind of a kolo [`DType`] (the inverse of [`dtype_of`]).
///
/// ```
/// use kolo::torch::{kind_of, tch::Kind};
/// assert_eq!(kind_of(kolo::DType::BF16), Kind::BFloat16);
/// ```
pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::U8 => Kind::Uint8,
        DType::I32 => Kind::Int,
        DType::I64 => Kind::Int64,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
    }
}

/// The CUDA device this rank should use: `cuda:(local_rank % device_count)`.
/// An error when CUDA is not available.
///
/// ```no_run
/// let comm = kolo::Communicator::from_env()?;
/// let device = kolo::torch::cuda_device(&comm)?;
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn cuda_device(comm: &Communicator) -> Result<Device> {
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    if count <= 0 {
        return Err(Error::InvalidArgument(format!(
            "torch: rank {} asked for a CUDA device but CUDA is not available",
            comm.rank()
        )));
    }
    Ok(Device::Cuda(comm.local_rank() % count as usize))
}

fn torch_err(what: &str) -> impl Fn(tch::TchError) -> Error + '_ {
    move |e| Error::InvalidArgument(format!("torch: {what}: {e}"))
}

/// Check that `t` is something kolo can move, and return its dtype.
fn check(t: &Tensor, what: &str) -> Result<DType> {
    if !t.defined() {
        return Err(Error::InvalidArgument(format!(
            "torch: {what}: the tensor is undefined"
        )));
    }
    let kind = t.f_kind().map_err(torch_err(what))?;
    let dt = dtype_of(kind)?;
    match t.device() {
        Device::Cpu | Device::Cuda(_) => {}
        d => {
            return Err(Error::InvalidArgument(format!(
                "torch: {what}: device {d:?} is not supported (CPU and CUDA are)"
            )))
        }
    }
    if t.is_sparse() || t.is_mkldnn() {
        return Err(Error::InvalidArgument(format!(
            "torch: {what}: sparse and MKL-DNN tensors are not supported"
        )));
    }
    Ok(dt)
}

/// Runs `$body` with `$T` bound to the element type of `$dt`.
macro_rules! with_elem {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            $crate::DType::U8 => {
                type $T = u8;
                $body
            }
            $crate::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
        }
    };
}

/// The elements of a contiguous CPU tensor as a slice.
///
/// # Safety
/// `t` must be defined, contiguous, on the CPU, of the kind matching `T`, and nothing may
/// write its storage while the slice lives.
unsafe fn host_slice<T: Element>(t: &Tensor) -> &[T] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    let p = t.data_ptr() as *const T;
    debug_assert!(p.is_aligned());
    std::slice::from_raw_parts(p, n)
}

/// The elements of a contiguous CPU tensor as a mutable slice.
///
/// # Safety
/// As for [`host_slice`], and nothing else may read or write the storage (no other tensor
/// sharing it is used) while the slice lives.
unsafe fn host_slice_mut<T: Element>(t: &mut Tensor) -> &mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    let p = t.data_ptr() as *mut T;
    debug_assert!(p.is_aligned());
    std::slice::from_raw_parts_mut(p, n)
}

/// A contiguous CPU tensor holding `t`'s values (`t` itself when it already is one), and
/// whether it is a copy that has to be written back. CUDA tensors go through pinned memory.
fn to_host(t: &Tensor, what: &str) -> Result<(Tensor, bool)> {
    let e = torch_err(what);
    match t.device() {
        Device::Cpu if t.is_contiguous() => Ok((t.shallow_clone(), false)),
        Device::Cpu => Ok((t.f_contiguous().map_err(e)?, true)),
        d @ Device::Cuda(_) => {
            let mut host = Tensor::f_empty(t.size(), (t.f_kind().map_err(&e)?, Device::Cpu))
                .and_then(|h| h.f_pin_memory(d))
                .map_err(&e)?;
            host.f_copy_(t).map_err(&e)?;
            Ok((host, true))
        }
        d => Err(Error::InvalidArgument(format!(
            "torch: {what}: device {d:?} is not supported"
        ))),
    }
}

/// Elementwise reduction of a tensor across ranks, in place (any shape, CPU or CUDA).
/// Every rank must pass a tensor of the same kind and number of elements.
///
/// ```no_run
/// use kolo::torch::{allreduce_tensor, tch::{Device, Kind, Tensor}};
/// let comm = kolo::Communicator::from_env()?;
/// let mut t = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
/// allreduce_tensor(&comm, &mut t, kolo::ReduceOp::Sum)?;
/// assert_eq!(t.double_value(&[0, 0]), comm.size() as f64);
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn allreduce_tensor(comm: &Communicator, t: &mut Tensor, op: ReduceOp) -> Result<()> {
    let what = "allreduce_tensor";
    let dt = check(t, what)?;
    let (mut host, copied) = to_host(t, what)?;
    // SAFETY: `host` is a contiguous CPU tensor of kind `dt`, used by nobody else here.
    with_elem!(dt, T => comm.allreduce(unsafe { host_slice_mut::<T>(&mut host) }, op))?;
    if copied {
        tch::no_grad(|| t.f_copy_(&host)).map_err(torch_err(what))?;
    }
    Ok(())
}

/// Copy `root`'s tensor into every rank's tensor, in place. Every rank must pass a tensor
/// of the same kind and number of elements.
///
/// ```no_run
/// use kolo::torch::{broadcast_tensor, tch::{Device, Kind, Tensor}};
/// let comm = kolo::Communicator::from_env()?;
/// let mut t = Tensor::full([4], comm.rank() as f64, (Kind::Double, Device::Cpu));
/// broadcast_tensor(&comm, &mut t, 0)?;
/// assert_eq!(t.double_value(&[3]), 0.0);
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn broadcast_tensor(comm: &Communicator, t: &mut Tensor, root: usize) -> Result<()> {
    let what = "broadcast_tensor";
    let dt = check(t, what)?;
    let (mut host, copied) = to_host(t, what)?;
    // SAFETY: as in allreduce_tensor.
    with_elem!(dt, T => comm.broadcast(unsafe { host_slice_mut::<T>(&mut host) }, root))?;
    if copied {
        tch::no_grad(|| t.f_copy_(&host)).map_err(torch_err(what))?;
    }
    Ok(())
}

/// Gather every rank's tensor: the result has shape `[size, ..t.shape]` (rank `i`'s tensor
/// at index `i`), on `t`'s device. Every rank must pass the same shape and kind.
///
/// ```no_run
/// use kolo::torch::{allgather_tensor, tch::{Device, Kind, Tensor}};
/// let comm = kolo::Communicator::from_env()?;
/// let mine = Tensor::full([2], comm.rank() as i64, (Kind::Int64, Device::Cpu));
/// let all = allgather_tensor(&comm, &mine)?;
/// assert_eq!(all.size(), [comm.size() as i64, 2]);
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn allgather_tensor(comm: &Communicator, t: &Tensor) -> Result<Tensor> {
    let what = "allgather_tensor";
    let e = torch_err(what);
    let dt = check(t, what)?;
    let (send, _) = to_host(t, what)?;
    let mut shape = vec![comm.size() as i64];
    shape.extend(t.size());
    let mut recv = Tensor::f_empty(&shape[..], (kind_of(dt), Device::Cpu)).map_err(&e)?;
    // SAFETY: `send` and `recv` are distinct contiguous CPU tensors of kind `dt`.
    with_elem!(dt, T => comm.allgather(unsafe { host_slice::<T>(&send) }, unsafe {
        host_slice_mut::<T>(&mut recv)
    }))?;
    match t.device() {
        Device::Cpu => Ok(recv),
        d => recv.f_to_device(d).map_err(e),
    }
}

/// Prefix of the engine names this module uses for its own operations (parameter
/// broadcasts, the sync check); gradients go under their variable names.
const RESERVED: &str = "kolo.torch/";

/// A 64-bit fingerprint of bytes (FNV-1a over 8-byte words, then a final mix).
fn hash_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29)
}

/// Gather one u64 from every rank; the index of the first rank whose value differs from
/// rank 0's, if any.
fn first_disagreeing(comm: &Communicator, v: u64) -> Result<Option<usize>> {
    let mut all = vec![0i64; comm.size()];
    comm.allgather(&[v as i64], &mut all)?;
    Ok(all.iter().position(|&x| x != all[0]))
}

mod engine_ops;
mod hooks;
mod optimizer;
mod reducer;

pub use engine_ops::engine_allreduce_tensor;
pub use optimizer::DistributedOptimizer;
