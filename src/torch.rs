//! Data-parallel training of [`tch`] (libtorch) models: collectives on tensors and a
//! [`DistributedOptimizer`] that averages gradients across ranks. Behind the `torch`
//! feature (`tch = "=0.24.0"`, PyTorch 2.11.0; `scripts/setup-libtorch.sh` sets it up).
//!
//! Every rank builds the same model, [`DistributedOptimizer::broadcast_parameters`]
//! makes the parameters equal, and each [`DistributedOptimizer::backward_step`] averages
//! the gradients of all ranks before the optimizer step, so all ranks stay bitwise
//! identical and train as one process would on the union of their batches.
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
//! let mut dopt = DistributedOptimizer::new(&comm, vs, opt)?;
//! dopt.broadcast_parameters(0)?;
//! for _step in 0..10 {
//!     // This rank's shard of the batch.
//!     let x = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
//!     let y = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
//!     let loss = net.forward(&x).cross_entropy_for_logits(&y);
//!     dopt.backward_step(&loss)?; // zero_grad, backward, average gradients, step
//! }
//! assert!(dopt.parameters_in_sync()?);
//! # Ok::<(), kolo::Error>(())
//! ```
//!
//! Supported tensor kinds are those kolo reduces ([`DType`]): `Uint8`, `Int`, `Int64`,
//! `Half`, `BFloat16`, `Float` and `Double`; devices are the CPU and CUDA. CUDA tensors
//! are staged through pinned host memory (one device-to-host and one host-to-device copy
//! per bucket). Anything else gives [`Error::InvalidArgument`].

use crate::{Communicator, DType, Element, Error, ReduceOp, Result};
use half::{bf16, f16};
/// The `tch` crate this module is built against (0.24.0); using it through `kolo::torch::tch`
/// keeps a program's tensors the same type as kolo's.
pub use tch;
use tch::{nn, Device, Kind, Tensor};

/// Default size of a gradient bucket: gradients of one kind are packed into flat
/// buffers of up to this many bytes, one allreduce each.
///
/// ```no_run
/// assert_eq!(kolo::torch::DEFAULT_BUCKET_BYTES, 64 << 20);
/// ```
pub const DEFAULT_BUCKET_BYTES: usize = 64 << 20;

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

/// The collective [`fused`] runs on each bucket.
#[derive(Clone, Copy)]
enum Fused {
    Allreduce(ReduceOp),
    Broadcast(usize),
}

/// Run `coll` over `tensors` (in place) in fused buckets: tensors of one kind and device are
/// flattened into contiguous buffers of up to `bucket_bytes` (a larger tensor gets a bucket
/// of its own), each bucket is staged to the host once (pinned memory for CUDA, kept in
/// `staging` for reuse), reduced or broadcast with one collective, and copied back.
///
/// This is the one place the gradient traffic goes through, kept small so it can be
/// replaced by kolo's engine (asynchronous named operations with fusion) and compression.
/// Every rank must pass the same list of kinds and shapes in the same order.
fn fused(
    comm: &Communicator,
    tensors: &mut [Tensor],
    coll: Fused,
    bucket_bytes: usize,
    staging: &mut Vec<Tensor>,
) -> Result<()> {
    let what = "fused collective";
    let e = torch_err(what);
    // Group indices by (kind, device), keeping the order inside each group.
    let mut groups: Vec<((DType, Device), Vec<usize>)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let key = (check(t, what)?, t.device());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let _guard = tch::no_grad_guard();
    for ((dt, device), idx) in groups {
        let elem = dt.size();
        let mut start = 0;
        while start < idx.len() {
            // Take tensors while they fit; always at least one.
            let mut end = start + 1;
            let mut bytes = tensors[idx[start]].numel() * elem;
            while end < idx.len() && bytes + tensors[idx[end]].numel() * elem <= bucket_bytes {
                bytes += tensors[idx[end]].numel() * elem;
                end += 1;
            }
            let members = &idx[start..end];
            start = end;
            let numel: usize = members.iter().map(|&i| tensors[i].numel()).sum();
            // One flat contiguous buffer on the tensors' device.
            let flat = if members.len() == 1 {
                tensors[members[0]].f_reshape([-1]).map_err(&e)?
            } else {
                let views: Vec<Tensor> = members
                    .iter()
                    .map(|&i| tensors[i].f_reshape([-1]))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(&e)?;
                Tensor::f_cat(&views, 0).map_err(&e)?
            };
            let flat = flat.f_contiguous().map_err(&e)?;
            let mut host = match device {
                Device::Cpu => flat.shallow_clone(),
                _ => {
                    let buf = staging_buffer(staging, dt, device, numel)?;
                    let mut host = buf.f_narrow(0, 0, numel as i64).map_err(&e)?;
                    host.f_copy_(&flat).map_err(&e)?;
                    host
                }
            };
            // SAFETY: `host` is a contiguous CPU tensor of kind `dt` that only this code uses.
            with_elem!(dt, T => {
                let s = unsafe { host_slice_mut::<T>(&mut host) };
                match coll {
                    Fused::Allreduce(op) => comm.allreduce(s, op),
                    Fused::Broadcast(root) => comm.broadcast(s, root),
                }
            })?;
            let mut flat = flat;
            if device != Device::Cpu {
                flat.f_copy_(&host).map_err(&e)?;
            }
            // Unpack (a no-op copy when the flat buffer is the tensor itself, i.e. a single
            // contiguous tensor: reshape returned a view of it).
            let mut off = 0i64;
            for &i in members {
                let t = &mut tensors[i];
                let n = t.numel() as i64;
                if members.len() > 1 || !same_storage(t, &flat) {
                    let src = flat
                        .f_narrow(0, off, n)
                        .and_then(|s| s.f_view(t.size().as_slice()))
                        .map_err(&e)?;
                    t.f_copy_(&src).map_err(&e)?;
                }
                off += n;
            }
        }
    }
    Ok(())
}

fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    a.numel() == 0 || a.data_ptr() == b.data_ptr()
}

/// A pinned host buffer of at least `numel` elements of `dt` for `device`, reused across calls.
fn staging_buffer(
    staging: &mut Vec<Tensor>,
    dt: DType,
    device: Device,
    numel: usize,
) -> Result<Tensor> {
    let kind = kind_of(dt);
    let e = torch_err("pinned staging buffer");
    if let Some(pos) = staging.iter().position(|b| b.kind() == kind) {
        if staging[pos].numel() >= numel {
            return Ok(staging[pos].shallow_clone());
        }
        drop(staging.remove(pos));
    }
    let buf = Tensor::f_empty([numel as i64], (kind, Device::Cpu))
        .and_then(|b| b.f_pin_memory(device))
        .map_err(e)?;
    staging.push(buf.shallow_clone());
    Ok(buf)
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

/// Wraps a [`nn::VarStore`] and its [`nn::Optimizer`] for data-parallel training: each
/// [`backward_step`](Self::backward_step) averages the gradients of all ranks (in fused
/// buckets, [`DEFAULT_BUCKET_BYTES`] each) before the optimizer step.
///
/// Every rank must build the same model (same variable names, shapes and kinds, created in
/// the same order); [`new`](Self::new) checks this across ranks.
///
/// ```no_run
/// use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
/// let comm = kolo::Communicator::from_env()?;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _net = nn::linear(vs.root(), 8, 2, Default::default());
/// let opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
/// let mut dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
/// dopt.broadcast_parameters(0)?;
/// # Ok::<(), kolo::Error>(())
/// ```
pub struct DistributedOptimizer<'c> {
    comm: &'c Communicator,
    vs: nn::VarStore,
    opt: nn::Optimizer,
    bucket_bytes: usize,
    staging: Vec<Tensor>,
}

impl std::fmt::Debug for DistributedOptimizer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedOptimizer")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .field("variables", &self.vs.len())
            .field("bucket_bytes", &self.bucket_bytes)
            .finish()
    }
}

impl<'c> DistributedOptimizer<'c> {
    /// Wrap `vs` and `opt` (built from `vs`). A collective: every rank calls it, and all
    /// get an error when the ranks' variables differ in names, shapes or kinds, or when a
    /// variable has an unsupported kind or device.
    ///
    /// ```no_run
    /// use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// let comm = kolo::Communicator::from_env()?;
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn new(
        comm: &'c Communicator,
        vs: nn::VarStore,
        opt: nn::Optimizer,
    ) -> Result<DistributedOptimizer<'c>> {
        // Describe the layout: named variables sorted by name, then the trainable ones in
        // optimizer order.
        let mut desc = String::new();
        let mut bad = None;
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in &named {
            if let Err(e) = check(t, name) {
                bad.get_or_insert(e);
            }
            desc += &format!("{name}:{:?}:{:?};", t.size(), t.f_kind().ok());
        }
        for t in vs.trainable_variables() {
            desc += &format!("{:?}:{:?};", t.size(), t.f_kind().ok());
        }
        // Every rank takes part in the check even when its own variables are bad, so no
        // rank is left waiting.
        let local = match bad {
            Some(_) => u64::MAX - comm.rank() as u64,
            None => hash_bytes(0xcbf2_9ce4_8422_2325, desc.as_bytes()),
        };
        let differs = first_disagreeing(comm, local)?;
        if let Some(e) = bad {
            return Err(e);
        }
        if let Some(peer) = differs {
            return Err(Error::Mismatch {
                rank: comm.rank(),
                peer,
                op: "DistributedOptimizer::new".into(),
                detail: "ranks built different models (variable names, shapes or kinds differ, \
                         or a rank has an unsupported variable)"
                    .into(),
            });
        }
        Ok(DistributedOptimizer {
            comm,
            vs,
            opt,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            staging: Vec::new(),
        })
    }

    /// The communicator.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// assert_eq!(dopt.comm().size(), comm.size());
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn comm(&self) -> &'c Communicator {
        self.comm
    }

    /// The wrapped variable store (for saving, or building more of the model).
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// if comm.rank() == 0 {
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
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// dopt.optimizer_mut().set_lr(0.01);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn optimizer_mut(&mut self) -> &mut nn::Optimizer {
        &mut self.opt
    }

    /// Size limit of a gradient bucket in bytes.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// assert_eq!(dopt.bucket_bytes(), kolo::torch::DEFAULT_BUCKET_BYTES);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// Set the bucket size limit (must be positive, and the same on every rank).
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// dopt.set_bucket_bytes(4 << 20)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn set_bucket_bytes(&mut self, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Err(Error::InvalidArgument(
                "torch: bucket size must be positive".into(),
            ));
        }
        self.bucket_bytes = bytes;
        Ok(())
    }

    /// Copy every variable (trainable or not) from rank `root` to all ranks. Call it once
    /// after building the model, so all ranks start from the same parameters.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// dopt.broadcast_parameters(0)?;
    /// assert!(dopt.parameters_in_sync()?);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn broadcast_parameters(&mut self, root: usize) -> Result<()> {
        if root >= self.comm.size() {
            return Err(Error::InvalidArgument(format!(
                "torch: broadcast_parameters: root {root} is not below size {}",
                self.comm.size()
            )));
        }
        let mut vars = self.sorted_variables();
        fused(
            self.comm,
            &mut vars,
            Fused::Broadcast(root),
            self.bucket_bytes,
            &mut self.staging,
        )
    }

    /// Average the gradients of the trainable variables across ranks, in place. A variable
    /// without a gradient on this rank (unused in the forward pass) gets a zero gradient so
    /// that all ranks reduce the same buckets; frozen variables are skipped (freeze the same
    /// ones on every rank). Called by [`backward_step`](Self::backward_step);
    /// public for loops that call `backward` and `step` themselves.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// # let loss = Tensor::from(0.0);
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// dopt.optimizer_mut().zero_grad();
    /// loss.backward();
    /// dopt.allreduce_gradients()?;
    /// dopt.optimizer_mut().step();
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn allreduce_gradients(&mut self) -> Result<()> {
        let e = torch_err("gradients");
        let mut grads = Vec::new();
        for p in self.vs.trainable_variables() {
            if !p.requires_grad() {
                continue; // frozen (VarStore::freeze): no gradient, on every rank
            }
            let mut g = p.f_grad().map_err(&e)?;
            if !g.defined() {
                // d(sum(p * 0))/dp = 0 defines p's gradient as zeros.
                p.f_mul_scalar(0.0)
                    .and_then(|z| z.f_sum(None::<Kind>))
                    .and_then(|s| s.f_backward())
                    .map_err(&e)?;
                g = p.f_grad().map_err(&e)?;
            }
            grads.push(g);
        }
        fused(
            self.comm,
            &mut grads,
            Fused::Allreduce(ReduceOp::Avg),
            self.bucket_bytes,
            &mut self.staging,
        )
    }

    /// One training step on this rank's shard: zero the gradients, run `loss.backward()`,
    /// average the gradients across ranks, and step the optimizer. With the mean loss over
    /// each rank's equal-sized shard, this is the step one process would take on the
    /// whole global batch.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = nn::linear(vs.root(), 4, 1, Default::default());
    /// let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
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
    /// each rank's variables). A collective: every rank gets the same answer.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// assert!(dopt.parameters_in_sync()?);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn parameters_in_sync(&self) -> Result<bool> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for t in self.sorted_variables() {
            let dt = check(&t, "parameters_in_sync")?;
            let (host, _) = to_host(&t, "parameters_in_sync")?;
            // SAFETY: a contiguous CPU tensor of kind `dt`, read only here.
            h = with_elem!(dt, T => {
                hash_bytes(h, crate::element::as_bytes(unsafe { host_slice::<T>(&host) }))
            });
        }
        Ok(first_disagreeing(self.comm, h)?.is_none())
    }

    /// Take the variable store and the optimizer back.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let dopt = kolo::torch::DistributedOptimizer::new(&comm, vs, opt)?;
    /// let (vs, opt) = dopt.into_parts();
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn into_parts(self) -> (nn::VarStore, nn::Optimizer) {
        (self.vs, self.opt)
    }

    /// All variables, sorted by name (the same order on every rank).
    fn sorted_variables(&self) -> Vec<Tensor> {
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.into_iter().map(|(_, t)| t).collect()
    }
}
