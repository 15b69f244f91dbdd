//! The gradient reduction of one step: with overlap on, each parameter's post-accumulate-grad
//! hook ([`super::hooks`]) submits its gradient to the engine while backward goes on; what
//! the hooks did not submit (overlap off, unused parameters, CUDA and other gradients the
//! engine cannot reduce in place) is submitted after backward, and then everything is
//! awaited.
//!
//! Results are bitwise the same on every rank: each rank scales its own contribution the
//! same way before the sum, the engine's sum is the same everywhere, and so is the scaling
//! after it.

use super::engine_ops::{submit_many, Batch};
use super::{check, hooks, torch_err};
use crate::compress::Compression;
use crate::engine::{Engine, Handle};
use crate::{DType, Error, ReduceOp, Result};
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{Device, Tensor};

/// How the gradients of a synchronised pass are reduced.
#[derive(Clone, Debug)]
pub(super) struct Submit {
    /// How float32 gradients travel.
    pub compression: Compression,
    /// Horovod's gradient predivide factor: each rank divides by it before the sum, and
    /// the sum is multiplied by `predivide / size` (1: an average, as one division).
    pub predivide: f64,
}

/// A gradient the engine is reducing in its own memory; `grad` holds that memory, and
/// dropping it waits for the handle first, so no path frees memory the engine writes.
struct InFlight {
    handle: Option<Handle<()>>,
    grad: Tensor,
}

impl InFlight {
    fn wait(mut self) -> Result<()> {
        self.handle.take().map_or(Ok(()), Handle::wait)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.wait();
        }
    }
}

// The hooks reach the reducer from autograd's threads through a raw address.
const _: fn() = || {
    fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<Reducer>();
};

struct Step {
    /// The parameters with hooks, by hook index: (name, tensor).
    params: Vec<(String, Tensor)>,
    /// Set while a synchronised backward pass runs: hooks submit only then.
    armed: Option<Submit>,
    /// Which parameters a hook submitted in this step.
    submitted: Vec<bool>,
    inflight: Vec<InFlight>,
    /// The first error a hook met (reported by [`Reducer::finish`]).
    error: Option<Error>,
}

/// The hooks' shared state. Boxed by its owner: the hooks hold its address until
/// [`Drop`] removes them.
pub(super) struct Reducer {
    engine: Arc<Engine>,
    step: Mutex<Step>,
    hooked: bool,
}

/// The hooks call back into this from the autograd thread. Never unwinds.
extern "C" fn grad_ready(ctx: *mut c_void, index: usize, status: c_int) {
    // SAFETY: `ctx` is the address of a live boxed Reducer: hooks are removed (Drop) before
    // the box is freed.
    let reducer = unsafe { &*(ctx as *const Reducer) };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        reducer.on_ready(index, status)
    }));
    if r.is_err() {
        let rank = reducer.engine.rank();
        reducer
            .lock()
            .error
            .get_or_insert(Error::InvalidArgument(format!(
                "torch: rank {rank}: the gradient hook of parameter #{index} panicked"
            )));
    }
}

impl Reducer {
    /// State for `params` (name, tensor); with `overlap`, a hook on each (all of them
    /// leaves that require grad).
    pub(super) fn new(
        engine: Arc<Engine>,
        params: Vec<(String, Tensor)>,
        overlap: bool,
    ) -> Result<Box<Reducer>> {
        let n = params.len();
        let me = Box::new(Reducer {
            engine,
            step: Mutex::new(Step {
                params,
                armed: None,
                submitted: vec![false; n],
                inflight: Vec::new(),
                error: None,
            }),
            hooked: overlap,
        });
        if overlap {
            let ctx = &*me as *const Reducer as *mut c_void;
            let step = me.lock();
            for (i, (name, t)) in step.params.iter().enumerate() {
                // SAFETY: `ctx` outlives the hooks (Drop removes them, also those
                // installed before a failure here), and `grad_ready` is thread-safe.
                if let Err(e) = unsafe { hooks::install(t, name, grad_ready, ctx, i) } {
                    drop(step);
                    return Err(e);
                }
            }
        }
        Ok(me)
    }

    fn lock(&self) -> MutexGuard<'_, Step> {
        self.step.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now until [`Reducer::finish`], hooks submit the gradients they see.
    pub(super) fn arm(&self, how: &Submit) {
        if self.hooked {
            self.lock().armed = Some(how.clone());
        }
    }

    /// A hook saw parameter `index`'s gradient accumulated for this pass.
    fn on_ready(&self, index: usize, status: c_int) {
        let mut step = self.lock();
        let Some(how) = step.armed.clone() else {
            return; // an accumulation pass, or a backward outside the optimizer's
        };
        let name = step.params[index].0.clone();
        if step.submitted[index] {
            // The engine may be reading the gradient that autograd just added to.
            step.error.get_or_insert(Error::InvalidArgument(format!(
                "torch: rank {}: the gradient of {name:?} was accumulated again after it \
                 was submitted in this step (use set_backward_passes_per_step or no_sync \
                 for several backward passes per step)",
                self.engine.rank()
            )));
            return;
        }
        if status != 0 {
            return; // the shim could not prepare it: reduced after backward
        }
        let grad = step.params[index].1.f_grad();
        match grad
            .map_err(torch_err("gradient"))
            .and_then(|g| self.submit(&name, g, &how))
        {
            Ok(Some(f)) => {
                step.inflight.push(f);
                step.submitted[index] = true;
            }
            Ok(None) => {}
            Err(e) => {
                step.error.get_or_insert(e);
            }
        }
    }

    /// Submit a contiguous CPU gradient in place; `None` for the others (reduced after
    /// backward, through the staging path).
    fn submit(&self, name: &str, g: Tensor, how: &Submit) -> Result<Option<InFlight>> {
        if !g.defined() || g.device() != Device::Cpu || !g.is_contiguous() {
            return Ok(None);
        }
        let dt = check(&g, name)?;
        let op = prescale(std::slice::from_ref(&g), dt, how.predivide)?;
        let c = if dt == DType::F32 {
            &how.compression
        } else {
            &Compression::None
        };
        // SAFETY: `g` is a contiguous CPU tensor of `dt`, held in the InFlight until its
        // handle completes; autograd does not touch a leaf's gradient again in this pass
        // (a second accumulation is reported as an error), and the shim gave it memory of
        // its own. Nothing else reads or writes it until `finish` has waited.
        let handle = unsafe {
            self.engine.allreduce_async_raw_compressed(
                name,
                g.data_ptr().cast(),
                g.numel(),
                dt,
                op,
                c,
            )?
        };
        Ok(Some(InFlight {
            handle: Some(handle),
            grad: g,
        }))
    }

    /// Reduce the gradients of `trainable` (name, parameter; those requiring grad now):
    /// submit the ones no hook submitted (an undefined gradient becomes zeros, so that all
    /// ranks submit every name), then wait for everything and scale.
    pub(super) fn finish(
        &self,
        trainable: Vec<(String, Tensor)>,
        how: &Submit,
        staging: &mut Vec<(Device, Tensor)>,
    ) -> Result<()> {
        let (inflight, error, submitted) = {
            let mut step = self.lock();
            step.armed = None;
            let mut done: Vec<String> = (step.params.iter().zip(&step.submitted))
                .filter(|(_, &s)| s)
                .map(|((name, _), _)| name.clone())
                .collect();
            done.sort_unstable();
            step.submitted.iter_mut().for_each(|s| *s = false);
            (std::mem::take(&mut step.inflight), step.error.take(), done)
        };
        let mut failed = error;
        let mut rest = Vec::new();
        for (name, p) in trainable {
            if submitted.binary_search(&name).is_err() {
                match grad_or_zeros(&name, &p) {
                    Ok(g) => rest.push((name, g)),
                    Err(err) => {
                        failed.get_or_insert(err);
                    }
                }
            }
        }
        // Submit the rest before waiting for anything: a rank waiting for its own hooks'
        // gradients first could wait for one that another rank submits only here. (Every
        // rank submits the rest even after an error, so that none is left waiting.)
        let batch = self.submit_rest(&rest, how, staging);
        let mut grads: Vec<Tensor> = Vec::with_capacity(inflight.len() + rest.len());
        for f in inflight {
            grads.push(f.grad.shallow_clone());
            if let Err(err) = f.wait() {
                failed.get_or_insert(err);
            }
        }
        match batch.and_then(Batch::wait) {
            Ok(()) => grads.extend(rest.into_iter().map(|(_, g)| g)),
            Err(err) => {
                failed.get_or_insert(err);
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        postscale(&grads, how.predivide, self.engine.size())
    }

    /// Submit `rest` (name, gradient), each kind with its own reduction op.
    fn submit_rest(
        &self,
        rest: &[(String, Tensor)],
        how: &Submit,
        staging: &mut Vec<(Device, Tensor)>,
    ) -> Result<Batch> {
        let grads: Vec<Tensor> = rest.iter().map(|(_, g)| g.shallow_clone()).collect();
        let floats = grads.iter().all(|g| is_float(g.kind()));
        if !floats && how.predivide != 1.0 {
            return Err(Error::InvalidArgument(
                "torch: a gradient predivide factor needs floating-point gradients".into(),
            ));
        }
        let op = match rest.first() {
            Some((name, g)) => prescale(&grads, check(g, name)?, how.predivide)?,
            None => ReduceOp::Avg,
        };
        submit_many(&self.engine, rest, op, staging, &how.compression)
    }
}

/// `p`'s gradient; zeros (set without autograd, so no hook fires) when it has none.
fn grad_or_zeros(name: &str, p: &Tensor) -> Result<Tensor> {
    let e = torch_err("gradients");
    let g = p.f_grad().map_err(&e)?;
    if g.defined() {
        return Ok(g);
    }
    hooks::zero_grad_of(p, name)?;
    p.f_grad().map_err(e)
}

fn is_float(k: tch::Kind) -> bool {
    matches!(
        k,
        tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Float | tch::Kind::Double
    )
}

/// Divide `grads` by the predivide factor (when not 1) and return the op to reduce with.
fn prescale(grads: &[Tensor], dt: DType, predivide: f64) -> Result<ReduceOp> {
    if predivide == 1.0 {
        return Ok(ReduceOp::Avg);
    }
    if !matches!(dt, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
        return Err(Error::InvalidArgument(
            "torch: a gradient predivide factor needs floating-point gradients".into(),
        ));
    }
    let _guard = tch::no_grad_guard();
    for g in grads {
        let _ = g
            .shallow_clone()
            .f_div_scalar_(predivide)
            .map_err(torch_err("predivide"))?;
    }
    Ok(ReduceOp::Sum)
}

/// Multiply the summed `grads` by `predivide / size` (nothing to do after an average).
fn postscale(grads: &[Tensor], predivide: f64, size: usize) -> Result<()> {
    if predivide == 1.0 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    for g in grads {
        let _ = g
            .shallow_clone()
            .f_mul_scalar_(predivide / size as f64)
            .map_err(torch_err("postscale"))?;
    }
    Ok(())
}

impl Drop for Reducer {
    /// Remove the hooks (they hold this address) and wait for what is still in flight.
    fn drop(&mut self) {
        let ctx = self as *const Reducer as *mut c_void;
        let step = self.step.get_mut().unwrap_or_else(|p| p.into_inner());
        if self.hooked {
            for (name, t) in &step.params {
                // Only a C++ exception makes this fail; the hook would then keep a
                // dangling address, so say so.
                if let Err(e) = hooks::remove(t, name, ctx) {
                    eprintln!("kolo: {e}");
                }
            }
        }
        // Each waits for its handle as it drops.
        step.inflight.clear();
    }
}
