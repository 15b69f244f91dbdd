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

use crate::compress::Compression;
use crate::engine::{Engine, Handle};
use crate::{Communicator, DType, Element, Error, ReduceOp, Result};
use half::{bf16, f16};
/// The `tch` crate this module is built against (0.24.0); using it through `kolo::torch::tch`
/// keeps a program's tensors the same type as kolo's.
pub use tch;
use tch::{nn, Device, Kind, Tensor};

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
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
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

/// A pinned host buffer of at least `numel` elements of `dt` for `device`, reused across
/// calls (one per kind and device, so that groups of one call never share one).
fn staging_buffer(
    staging: &mut Vec<(Device, Tensor)>,
    dt: DType,
    device: Device,
    numel: usize,
) -> Result<Tensor> {
    let kind = kind_of(dt);
    let e = torch_err("pinned staging buffer");
    if let Some(pos) = staging
        .iter()
        .position(|(d, b)| *d == device && b.kind() == kind)
    {
        if staging[pos].1.numel() >= numel {
            return Ok(staging[pos].1.shallow_clone());
        }
        drop(staging.remove(pos));
    }
    let buf = Tensor::f_empty([numel.max(1) as i64], (kind, Device::Cpu))
        .and_then(|b| b.f_pin_memory(device))
        .map_err(e)?;
    staging.push((device, buf.shallow_clone()));
    Ok(buf)
}

fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    a.numel() == 0 || a.data_ptr() == b.data_ptr()
}

/// Reduce `items` (engine name, tensor) in place through `engine`: every tensor is handed
/// to the engine with [`Engine::allreduce_async_raw`], in the order given, and only then
/// are the handles awaited, so the engine can negotiate them with the other ranks (which may
/// submit them in another order) and fuse them into buffers of up to
/// `KOLO_FUSION_THRESHOLD` bytes.
///
/// Where the engine reads and writes:
/// - a contiguous CPU tensor: its own memory (no copy);
/// - a non-contiguous CPU tensor: a contiguous copy, copied back afterwards;
/// - CUDA tensors: the tensors of one kind and device are packed into one flat device
///   buffer, copied to a pinned host buffer (`staging`, reused across calls) in one
///   device-to-host copy, each tensor's slice of it submitted, and the whole buffer copied
///   back in one host-to-device copy.
///
/// Every buffer the engine touches is held (`keep`) until all handles have completed, also
/// when a submission or the exchange fails.
fn engine_allreduce_many(
    engine: &Engine,
    items: &[(String, Tensor)],
    op: ReduceOp,
    staging: &mut Vec<(Device, Tensor)>,
    compression: &Compression,
) -> Result<()> {
    let e = torch_err("engine allreduce");
    let _guard = tch::no_grad_guard();
    // Check everything before submitting anything.
    let dtypes: Vec<DType> = items
        .iter()
        .map(|(name, t)| check(t, name))
        .collect::<Result<_>>()?;
    // Memory the engine works on, per item: (address, elements).
    let mut at: Vec<(*mut u8, usize)> = vec![(std::ptr::null_mut(), 0); items.len()];
    let mut keep: Vec<Tensor> = Vec::new();
    // CPU copies to write back: (tensor, its contiguous copy).
    let mut cpu_back: Vec<(Tensor, Tensor)> = Vec::new();
    // CUDA tensors by (kind, device), in order.
    let mut groups: Vec<((DType, Device), Vec<usize>)> = Vec::new();
    for (i, ((_, t), &dt)) in items.iter().zip(&dtypes).enumerate() {
        match t.device() {
            Device::Cpu => {
                let host = if t.is_contiguous() {
                    t.shallow_clone()
                } else {
                    let c = t.f_contiguous().map_err(&e)?;
                    cpu_back.push((t.shallow_clone(), c.shallow_clone()));
                    c
                };
                at[i] = (host.data_ptr().cast(), host.numel());
                keep.push(host);
            }
            d => match groups.iter_mut().find(|(k, _)| *k == (dt, d)) {
                Some((_, v)) => v.push(i),
                None => groups.push(((dt, d), vec![i])),
            },
        }
    }
    // CUDA back copies: (flat device buffer, its pinned host copy, members).
    let mut cuda_back: Vec<(Tensor, Tensor, Vec<usize>)> = Vec::new();
    for ((dt, device), members) in groups {
        let numel: usize = members.iter().map(|&i| items[i].1.numel()).sum();
        let flat = if members.len() == 1 {
            items[members[0]].1.f_reshape([-1]).map_err(&e)?
        } else {
            let views: Vec<Tensor> = members
                .iter()
                .map(|&i| items[i].1.f_reshape([-1]))
                .collect::<std::result::Result<_, _>>()
                .map_err(&e)?;
            Tensor::f_cat(&views, 0).map_err(&e)?
        };
        let flat = flat.f_contiguous().map_err(&e)?;
        let mut host = staging_buffer(staging, dt, device, numel)?
            .f_narrow(0, 0, numel as i64)
            .map_err(&e)?;
        host.f_copy_(&flat).map_err(&e)?;
        let base: *mut u8 = host.data_ptr().cast();
        let mut off = 0;
        for &i in &members {
            let n = items[i].1.numel();
            at[i] = (base.wrapping_add(off * dt.size()), n);
            off += n;
        }
        keep.push(host.shallow_clone());
        cuda_back.push((flat, host, members));
    }

    let mut handles: Vec<Handle<()>> = Vec::with_capacity(items.len());
    let mut failed = None;
    for (((name, _), &dt), &(ptr, count)) in items.iter().zip(&dtypes).zip(&at) {
        // SAFETY: `ptr` addresses `count` contiguous elements of `dt` in a CPU tensor held in
        // `keep`, aligned for `dt` (tensor storage is), and distinct items never overlap.
        // Nothing reads or writes that memory until every handle submitted here has
        // completed: this function waits for all of them below before it touches the
        // tensors again or returns, whatever fails.
        // Compression applies to float32 gradients; other kinds go as they are.
        let c = if dt == DType::F32 {
            compression
        } else {
            &Compression::None
        };
        match unsafe { engine.allreduce_async_raw_compressed(name, ptr, count, dt, op, c) } {
            Ok(h) => handles.push(h),
            Err(err) => {
                failed = Some(err);
                break;
            }
        }
    }
    for h in handles {
        if let Err(err) = h.wait() {
            failed.get_or_insert(err);
        }
    }
    if let Some(err) = failed {
        return Err(err);
    }
    drop(keep);
    for (mut t, c) in cpu_back {
        t.f_copy_(&c).map_err(&e)?;
    }
    for (mut flat, host, members) in cuda_back {
        flat.f_copy_(&host).map_err(&e)?;
        // Unpack (nothing to do when the flat buffer is a view of the single tensor).
        let mut off = 0i64;
        for &i in &members {
            let mut t = items[i].1.shallow_clone();
            let n = t.numel() as i64;
            if members.len() > 1 || !same_storage(&t, &flat) {
                let src = flat
                    .f_narrow(0, off, n)
                    .and_then(|s| s.f_view(t.size().as_slice()))
                    .map_err(&e)?;
                t.f_copy_(&src).map_err(&e)?;
            }
            off += n;
        }
    }
    Ok(())
}

/// Elementwise reduction of a tensor across ranks, in place, through an [`Engine`] (which
/// owns the communicator, so [`allreduce_tensor`] cannot be used meanwhile). Every rank
/// must submit a tensor under the same `name`, of the same kind and number of elements;
/// the call blocks until the result is in `t`. CPU and CUDA tensors, any strides.
///
/// ```
/// use kolo::torch::{engine_allreduce_tensor, tch::{Device, Kind, Tensor}};
/// let comm = kolo::Communicator::init(kolo::Config::local(0, 1, 0))?;
/// let engine = kolo::engine::Engine::start(comm)?;
/// let mut t = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
/// engine_allreduce_tensor(&engine, "stats", &mut t, kolo::ReduceOp::Sum)?;
/// assert_eq!(t.double_value(&[0, 0]), 1.0);
/// engine.shutdown()?;
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn engine_allreduce_tensor(
    engine: &Engine,
    name: &str,
    t: &mut Tensor,
    op: ReduceOp,
) -> Result<()> {
    engine_allreduce_many(
        engine,
        &[(name.to_string(), t.shallow_clone())],
        op,
        &mut Vec::new(),
        &Compression::None,
    )
}

/// Broadcast `items` (engine name, tensor) from `root` through `engine`, in place: every
/// tensor is copied into a `Vec` and submitted, then all are awaited and copied back.
fn engine_broadcast_many(engine: &Engine, items: &[(String, Tensor)], root: usize) -> Result<()> {
    type Finish = Box<dyn FnOnce() -> Result<()>>;
    let dtypes: Vec<DType> = items
        .iter()
        .map(|(name, t)| check(t, name))
        .collect::<Result<_>>()?;
    let mut hosts = Vec::with_capacity(items.len());
    for (name, t) in items {
        hosts.push(to_host(t, name)?);
    }
    let mut pending: Vec<Finish> = Vec::with_capacity(items.len());
    let mut failed = None;
    for (((name, t), &dt), (host, copied)) in items.iter().zip(&dtypes).zip(hosts) {
        let (t, mut host) = (t.shallow_clone(), host);
        let submitted: Result<Finish> = with_elem!(dt, T => {
            // SAFETY: `host` is a contiguous CPU tensor of kind `dt`, read only here.
            let v = unsafe { host_slice::<T>(&host) }.to_vec();
            engine.broadcast_async(name, v, root).map(|h| {
                Box::new(move || {
                    let v = h.wait()?;
                    // SAFETY: as above; nothing else uses `host` now.
                    unsafe { host_slice_mut::<T>(&mut host) }.copy_from_slice(&v);
                    if copied {
                        let mut t = t;
                        tch::no_grad(|| t.f_copy_(&host))
                            .map_err(torch_err("broadcast_parameters"))?;
                    }
                    Ok(())
                }) as Finish
            })
        });
        match submitted {
            Ok(f) => pending.push(f),
            Err(err) => {
                failed = Some(err);
                break;
            }
        }
    }
    for finish in pending {
        if let Err(err) = finish() {
            failed.get_or_insert(err);
        }
    }
    failed.map_or(Ok(()), Err)
}

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

/// Wraps a [`nn::VarStore`] and its [`nn::Optimizer`] for data-parallel training, with a
/// kolo [`Engine`] running on the communicator: each
/// [`backward_step`](Self::backward_step) averages the gradients of all ranks through the
/// engine before the optimizer step.
///
/// Every gradient is submitted to the engine under its variable's name in the
/// [`nn::VarStore`] (`"fc1.weight"`, ...), with [`ReduceOp::Avg`]. The engine agrees with
/// the other ranks on which names are ready (so the ranks may produce them in any order),
/// fuses the ready gradients of one kind into buffers of up to `KOLO_FUSION_THRESHOLD`
/// bytes ([`crate::Config::fusion_threshold`], 64 MiB by default; gradients of
/// `KOLO_FUSION_INPLACE_BYTES` and more are reduced alone, in place), and caches the
/// negotiation so that repeated steps are cheap. Set those in the environment, or in the
/// [`crate::Config`] the communicator is built from.
///
/// The engine owns the communicator from [`new`](Self::new) until
/// [`shutdown`](Self::shutdown) gives it back; meanwhile other collectives go through
/// [`engine`](Self::engine) (e.g. [`engine_allreduce_tensor`]). Names starting with
/// `kolo.torch/` and the variable names are taken by this type.
///
/// Every rank must build the same model (same variable names, shapes and kinds; the
/// creation order may differ); [`new`](Self::new) checks this across ranks.
///
/// ```no_run
/// use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
/// let comm = kolo::Communicator::from_env()?;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _net = nn::linear(vs.root(), 8, 2, Default::default());
/// let opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
/// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
/// dopt.broadcast_parameters(0)?;
/// // ... training ...
/// let (comm, vs, opt) = dopt.shutdown()?;
/// # Ok::<(), kolo::Error>(())
/// ```
pub struct DistributedOptimizer {
    engine: Engine,
    vs: nn::VarStore,
    opt: nn::Optimizer,
    /// Pinned host buffers for CUDA gradients, one per kind and device.
    staging: Vec<(Device, Tensor)>,
    /// How float32 gradients travel (top-k keeps its error feedback per variable).
    compression: Compression,
}

impl std::fmt::Debug for DistributedOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedOptimizer")
            .field("rank", &self.engine.rank())
            .field("size", &self.engine.size())
            .field("variables", &self.vs.len())
            .finish()
    }
}

impl DistributedOptimizer {
    /// Wrap `vs` and `opt` (built from `vs`) and start an [`Engine`] on `comm`. A
    /// collective: every rank calls it, and all get an error when the ranks' variables
    /// differ in names, shapes, kinds or trainability, or when a variable has an
    /// unsupported kind or device (the communicator is then dropped).
    ///
    /// ```no_run
    /// use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// let comm = kolo::Communicator::from_env()?;
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn new(
        comm: Communicator,
        vs: nn::VarStore,
        opt: nn::Optimizer,
    ) -> Result<DistributedOptimizer> {
        // Describe the layout: named variables sorted by name, with shape, kind and whether
        // they train. (The order they were created in does not matter: the engine matches
        // gradients by name.)
        let mut desc = String::new();
        let mut bad = None;
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in &named {
            if let Err(e) = check(t, name) {
                bad.get_or_insert(e);
            }
            desc += &format!(
                "{name}:{:?}:{:?}:{};",
                t.size(),
                t.f_kind().ok(),
                t.requires_grad()
            );
        }
        // Every rank takes part in the check even when its own variables are bad, so no
        // rank is left waiting.
        let local = match bad {
            Some(_) => u64::MAX - comm.rank() as u64,
            None => hash_bytes(0xcbf2_9ce4_8422_2325, desc.as_bytes()),
        };
        let differs = first_disagreeing(&comm, local)?;
        if let Some(e) = bad {
            return Err(e);
        }
        if let Some(peer) = differs {
            return Err(Error::Mismatch {
                rank: comm.rank(),
                peer,
                op: "DistributedOptimizer::new".into(),
                detail: "ranks built different models (variable names, shapes, kinds or \
                         trainability differ, or a rank has an unsupported variable)"
                    .into(),
            });
        }
        Ok(DistributedOptimizer {
            engine: Engine::start(comm)?,
            vs,
            opt,
            staging: Vec::new(),
            compression: Compression::None,
        })
    }

    /// The engine that owns the communicator, for other collectives during training (see
    /// [`engine_allreduce_tensor`]). Avoid the names of the variables and names starting
    /// with `kolo.torch/`.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// let mut loss = Tensor::from(0.25f64);
    /// kolo::torch::engine_allreduce_tensor(dopt.engine(), "loss", &mut loss, kolo::ReduceOp::Avg)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.engine.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.engine.size()
    }

    /// The wrapped variable store (for saving, or building more of the model).
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// if dopt.rank() == 0 {
    ///     dopt.var_store().save("model.safetensors").unwrap();
    /// }
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The wrapped optimizer (to change the learning rate, say).
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.optimizer_mut().set_lr(0.01);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn optimizer_mut(&mut self) -> &mut nn::Optimizer {
        &mut self.opt
    }

    /// Copy every variable (trainable or not) from rank `root` to all ranks, through the
    /// engine. Call it once after building the model, so all ranks start from the same
    /// parameters.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.broadcast_parameters(0)?;
    /// assert!(dopt.parameters_in_sync()?);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn broadcast_parameters(&mut self, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::InvalidArgument(format!(
                "torch: broadcast_parameters: root {root} is not below size {}",
                self.size()
            )));
        }
        let items: Vec<(String, Tensor)> = self
            .sorted_variables()
            .into_iter()
            .map(|(name, t)| (format!("{RESERVED}broadcast/{name}"), t))
            .collect();
        engine_broadcast_many(&self.engine, &items, root)
    }

    /// The trainable, unfrozen variables with their names, in creation order.
    fn trainable_named(&self) -> Result<Vec<(String, Tensor)>> {
        let vars = self.vs.variables_.lock().unwrap_or_else(|p| p.into_inner());
        // Names by storage address (variables of no elements may share one).
        let mut by_addr: std::collections::HashMap<usize, Vec<(&String, &Tensor)>> =
            std::collections::HashMap::new();
        for (name, t) in &vars.named_variables {
            by_addr
                .entry(t.data_ptr() as usize)
                .or_default()
                .push((name, t));
        }
        let mut out = Vec::new();
        for v in &vars.trainable_variables {
            let p = &v.tensor;
            if !p.requires_grad() {
                continue; // frozen (VarStore::freeze): no gradient, on every rank
            }
            let cands = by_addr
                .get(&(p.data_ptr() as usize))
                .map_or(&[][..], |c| &c[..]);
            let name = match cands {
                [(name, _)] => (*name).clone(),
                _ => cands
                    .iter()
                    .find(|(_, t)| t.f_is_set_to(p).unwrap_or(false))
                    .map(|(name, _)| (*name).clone())
                    .ok_or_else(|| {
                        Error::InvalidArgument(
                            "torch: a trainable variable has no name in the VarStore".into(),
                        )
                    })?,
            };
            out.push((name, p.shallow_clone()));
        }
        Ok(out)
    }

    /// Compress float32 gradients on the wire from now on (fp16/bf16 with f32
    /// accumulation, or top-k with error feedback kept per variable by the engine).
    /// Every rank must choose the same.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.set_compression(kolo::compress::Compression::Fp16);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn set_compression(&mut self, c: Compression) {
        self.compression = c;
    }

    /// The compression set with [`DistributedOptimizer::set_compression`].
    pub fn compression(&self) -> &Compression {
        &self.compression
    }

    /// Average the gradients of the trainable variables across ranks, in place, through
    /// the engine: every gradient is submitted under its variable's name, then all are
    /// awaited (see the type's documentation). A variable without a gradient on this rank
    /// (unused in the forward pass) gets a zero gradient, so that every rank submits every
    /// name; frozen variables are skipped (freeze the same ones on every rank). Called by
    /// [`backward_step`](Self::backward_step); public for loops that call `backward` and
    /// `step` themselves.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// # let loss = Tensor::from(0.0);
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.optimizer_mut().zero_grad();
    /// loss.backward();
    /// dopt.allreduce_gradients()?;
    /// dopt.optimizer_mut().step();
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_gradients(&mut self) -> Result<()> {
        let e = torch_err("gradients");
        let mut grads = Vec::new();
        for (name, p) in self.trainable_named()? {
            let mut g = p.f_grad().map_err(&e)?;
            if !g.defined() {
                // d(sum(p * 0))/dp = 0 defines p's gradient as zeros.
                p.f_mul_scalar(0.0)
                    .and_then(|z| z.f_sum(None::<Kind>))
                    .and_then(|s| s.f_backward())
                    .map_err(&e)?;
                g = p.f_grad().map_err(&e)?;
            }
            grads.push((name, g));
        }
        engine_allreduce_many(
            &self.engine,
            &grads,
            ReduceOp::Avg,
            &mut self.staging,
            &self.compression,
        )
    }

    /// One training step on this rank's shard: zero the gradients, run `loss.backward()`,
    /// average the gradients across ranks through the engine, and step the optimizer.
    /// With the mean loss over each rank's equal-sized shard, this is the step one process
    /// would take on the whole global batch.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = nn::linear(vs.root(), 4, 1, Default::default());
    /// let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// let x = Tensor::ones([8, 4], (Kind::Float, Device::Cpu));
    /// let loss = net.forward(&x).square().mean(Kind::Float);
    /// dopt.backward_step(&loss)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.opt.zero_grad();
        loss.f_backward().map_err(torch_err("backward"))?;
        self.allreduce_gradients()?;
        self.opt.step();
        Ok(())
    }

    /// Whether every variable is bitwise equal on all ranks (compares a 64-bit hash of
    /// each rank's variables, gathered through the engine). A collective: every rank gets
    /// the same answer.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// assert!(dopt.parameters_in_sync()?);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn parameters_in_sync(&self) -> Result<bool> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for (name, t) in self.sorted_variables() {
            let dt = check(&t, &name)?;
            let (host, _) = to_host(&t, "parameters_in_sync")?;
            // SAFETY: a contiguous CPU tensor of kind `dt`, read only here.
            h = with_elem!(dt, T => {
                hash_bytes(h, crate::element::as_bytes(unsafe { host_slice::<T>(&host) }))
            });
        }
        let all = self
            .engine
            .allgather_async(&format!("{RESERVED}parameters_in_sync"), vec![h as i64])?
            .wait()?;
        Ok(all.iter().all(|&x| x == all[0]))
    }

    /// Stop the engine and take the communicator, the variable store and the optimizer
    /// back. A collective: every rank must call it (it returns once all have).
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// let (comm, vs, opt) = dopt.shutdown()?;
    /// comm.barrier()?; // blocking collectives work again
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn shutdown(self) -> Result<(Communicator, nn::VarStore, nn::Optimizer)> {
        let comm = self.engine.shutdown()?;
        Ok((comm, self.vs, self.opt))
    }

    /// All variables with their names, sorted by name (the same order on every rank).
    fn sorted_variables(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }
}
