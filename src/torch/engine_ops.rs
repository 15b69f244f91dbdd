//! Reductions and broadcasts of many tensors through the [`Engine`]: CPU tensors in their
//! own memory, CUDA tensors staged through pinned host buffers.

use super::{check, host_slice, host_slice_mut, kind_of, to_host, torch_err};
use crate::compress::Compression;
use crate::engine::{Engine, Handle};
use crate::{DType, Error, ReduceOp, Result};
use tch::{Device, Tensor};

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

/// Reduce `items` (engine name, tensor) in place through `engine`: [`submit_many`], then
/// [`Batch::wait`].
pub(super) fn engine_allreduce_many(
    engine: &Engine,
    items: &[(String, Tensor)],
    op: ReduceOp,
    staging: &mut Vec<(Device, Tensor)>,
    compression: &Compression,
) -> Result<()> {
    submit_many(engine, items, op, staging, compression)?.wait()
}

/// Allreduces handed to the engine by [`submit_many`], with every buffer the engine
/// touches held (`keep`) until all handles have completed, also when a submission or the
/// exchange fails.
pub(super) struct Batch {
    handles: Vec<Handle<()>>,
    failed: Option<Error>,
    keep: Vec<Tensor>,
    /// CPU copies to write back: (tensor, its contiguous copy).
    cpu_back: Vec<(Tensor, Tensor)>,
    /// CUDA back copies: (flat device buffer, its pinned host copy, member tensors).
    cuda_back: Vec<(Tensor, Tensor, Vec<Tensor>)>,
}

/// Hand every tensor of `items` (engine name, tensor) to the engine with
/// [`Engine::allreduce_async_raw`], in the order given, without waiting, so the engine can
/// negotiate them with the other ranks (which may submit them in another order) and fuse
/// them into buffers of up to `KOLO_FUSION_THRESHOLD` bytes. An error before anything was
/// submitted comes back here; a later one from [`Batch::wait`].
///
/// Where the engine reads and writes:
/// - a contiguous CPU tensor: its own memory (no copy);
/// - a non-contiguous CPU tensor: a contiguous copy, copied back afterwards;
/// - CUDA tensors: the tensors of one kind and device are packed into one flat device
///   buffer, copied to a pinned host buffer (`staging`, reused across calls) in one
///   device-to-host copy, each tensor's slice of it submitted, and the whole buffer copied
///   back in one host-to-device copy.
pub(super) fn submit_many(
    engine: &Engine,
    items: &[(String, Tensor)],
    op: ReduceOp,
    staging: &mut Vec<(Device, Tensor)>,
    compression: &Compression,
) -> Result<Batch> {
    let e = torch_err("engine allreduce");
    let _guard = tch::no_grad_guard();
    // Check everything before submitting anything.
    let dtypes: Vec<DType> = items
        .iter()
        .map(|(name, t)| check(t, name))
        .collect::<Result<_>>()?;
    let mut batch = Batch {
        handles: Vec::with_capacity(items.len()),
        failed: None,
        keep: Vec::new(),
        cpu_back: Vec::new(),
        cuda_back: Vec::new(),
    };
    // Memory the engine works on, per item: (address, elements).
    let mut at: Vec<(*mut u8, usize)> = vec![(std::ptr::null_mut(), 0); items.len()];
    // CUDA tensors by (kind, device), in order.
    let mut groups: Vec<((DType, Device), Vec<usize>)> = Vec::new();
    for (i, ((_, t), &dt)) in items.iter().zip(&dtypes).enumerate() {
        match t.device() {
            Device::Cpu => {
                let host = if t.is_contiguous() {
                    t.shallow_clone()
                } else {
                    let c = t.f_contiguous().map_err(&e)?;
                    batch.cpu_back.push((t.shallow_clone(), c.shallow_clone()));
                    c
                };
                at[i] = (host.data_ptr().cast(), host.numel());
                batch.keep.push(host);
            }
            d => match groups.iter_mut().find(|(k, _)| *k == (dt, d)) {
                Some((_, v)) => v.push(i),
                None => groups.push(((dt, d), vec![i])),
            },
        }
    }
    for ((dt, device), members) in groups {
        stage_group(items, dt, device, &members, staging, &mut at, &mut batch)?;
    }
    for (((name, _), &dt), &(ptr, count)) in items.iter().zip(&dtypes).zip(&at) {
        // Compression applies to float32 gradients; other kinds go as they are.
        let c = if dt == DType::F32 {
            compression
        } else {
            &Compression::None
        };
        // SAFETY: `ptr` addresses `count` contiguous elements of `dt` in a CPU tensor held in
        // `batch.keep`, aligned for `dt` (tensor storage is), and distinct items never
        // overlap. Nothing reads or writes that memory until every handle submitted here has
        // completed: `Batch::wait` waits for all of them before it touches the tensors again
        // or returns, whatever fails, and dropping a batch waits too.
        match unsafe { engine.allreduce_async_raw_compressed(name, ptr, count, dt, op, c) } {
            Ok(h) => batch.handles.push(h),
            Err(err) => {
                batch.failed = Some(err);
                break;
            }
        }
    }
    Ok(batch)
}

/// Pack the CUDA tensors `members` of `items` (one kind and device) into one flat device
/// buffer and copy it to a pinned host buffer, recording each member's host slice in `at`.
fn stage_group(
    items: &[(String, Tensor)],
    dt: DType,
    device: Device,
    members: &[usize],
    staging: &mut Vec<(Device, Tensor)>,
    at: &mut [(*mut u8, usize)],
    batch: &mut Batch,
) -> Result<()> {
    let e = torch_err("engine allreduce");
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
    for &i in members {
        let n = items[i].1.numel();
        at[i] = (base.wrapping_add(off * dt.size()), n);
        off += n;
    }
    batch.keep.push(host.shallow_clone());
    let tensors = members
        .iter()
        .map(|&i| items[i].1.shallow_clone())
        .collect();
    batch.cuda_back.push((flat, host, tensors));
    Ok(())
}

impl Batch {
    /// Wait for every handle, then copy the results back where they were staged.
    pub(super) fn wait(mut self) -> Result<()> {
        let e = torch_err("engine allreduce");
        let _guard = tch::no_grad_guard();
        let mut failed = self.failed.take();
        for h in std::mem::take(&mut self.handles) {
            if let Err(err) = h.wait() {
                failed.get_or_insert(err);
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        self.keep.clear();
        for (mut t, c) in std::mem::take(&mut self.cpu_back) {
            t.f_copy_(&c).map_err(&e)?;
        }
        for (mut flat, host, members) in std::mem::take(&mut self.cuda_back) {
            flat.f_copy_(&host).map_err(&e)?;
            // Unpack (nothing to do when the flat buffer is a view of the single tensor).
            let mut off = 0i64;
            for mut t in members.iter().map(Tensor::shallow_clone) {
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
}

impl Drop for Batch {
    /// A batch dropped without [`Batch::wait`] (an early return) still waits for its
    /// handles, so the engine never writes memory that has been freed.
    fn drop(&mut self) {
        for h in self.handles.drain(..) {
            let _ = h.wait();
        }
    }
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
pub(super) fn engine_broadcast_many(
    engine: &Engine,
    items: &[(String, Tensor)],
    root: usize,
) -> Result<()> {
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
