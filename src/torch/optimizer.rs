//! [`DistributedOptimizer`]: a tch optimizer whose steps use the gradients of all ranks.

use super::engine_ops::engine_broadcast_many;
use super::reducer::{Reducer, Submit};
use super::{check, first_disagreeing, hash_bytes, host_slice, to_host, torch_err, RESERVED};
use crate::compress::Compression;
use crate::engine::Engine;
use crate::{Communicator, Error, Result};
use std::sync::Arc;
use tch::{nn, Device, Tensor};

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
    /// Declared first: dropped (its hooks removed) before anything else.
    reducer: Box<Reducer>,
    engine: Arc<Engine>,
    vs: nn::VarStore,
    opt: nn::Optimizer,
    /// Pinned host buffers for CUDA gradients, one per kind and device.
    staging: Vec<(Device, Tensor)>,
    /// How gradients are reduced (compression, predivide factor).
    how: Submit,
    /// Backward passes accumulated per optimizer step (Horovod's `backward_passes_per_step`).
    passes_per_step: usize,
    /// Backward passes since the last step.
    passes: usize,
    /// Inside [`DistributedOptimizer::no_sync`].
    no_sync: bool,
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
        mut comm: Communicator,
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
        // Room in the engine's response cache for every gradient and parameter broadcast
        // (it never evicts), so that large models keep the cached fast path.
        comm.raise_cache_capacity(2 * named.len() + 64);
        let overlap = comm.config().torch_overlap;
        let engine = Arc::new(Engine::start(comm)?);
        // Hooks go on the parameters that train now, sorted by name.
        let hooked: Vec<(String, Tensor)> = trainable_named(&vs)?
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let reducer = Reducer::new(engine.clone(), hooked, overlap)?;
        Ok(DistributedOptimizer {
            reducer,
            engine,
            vs,
            opt,
            staging: Vec::new(),
            how: Submit {
                compression: Compression::None,
                predivide: 1.0,
            },
            passes_per_step: 1,
            passes: 0,
            no_sync: false,
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
        self.how.compression = c;
    }

    /// The compression set with [`DistributedOptimizer::set_compression`].
    pub fn compression(&self) -> &Compression {
        &self.how.compression
    }

    /// Reduce gradients over several backward passes per step (Horovod's
    /// `backward_passes_per_step`): [`backward_step`](Self::backward_step) then
    /// accumulates the gradients of `k` passes (their sum, as one process's `k` backward
    /// passes would) and reduces and steps on the `k`-th. Every rank must choose the same.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.set_backward_passes_per_step(4)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn set_backward_passes_per_step(&mut self, k: usize) -> Result<()> {
        if k == 0 || self.passes > 0 {
            return Err(Error::InvalidArgument(format!(
                "torch: rank {}: backward passes per step: {k} must be at least 1, and set \
                 between steps ({} passes pending)",
                self.rank(),
                self.passes
            )));
        }
        self.passes_per_step = k;
        Ok(())
    }

    /// Horovod's gradient predivide factor `f`: each rank's gradient is divided by `f`
    /// before the sum and the sum multiplied by `f / size` (the same average, with another
    /// rounding; for half-precision gradients that could overflow a sum). 1, the default,
    /// averages in one division. Floating-point gradients only; every rank must choose the
    /// same.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.set_gradient_predivide_factor(dopt.size() as f64)?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn set_gradient_predivide_factor(&mut self, f: f64) -> Result<()> {
        if !(f.is_finite() && f > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "torch: rank {}: gradient predivide factor {f} is not a positive number",
                self.rank()
            )));
        }
        self.how.predivide = f;
        Ok(())
    }

    /// Run `f` with gradient synchronisation off, as DDP's `no_sync`: backward passes in
    /// it only accumulate gradients, and the first [`backward_step`](Self::backward_step)
    /// after it reduces the sum and steps.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = nn::linear(vs.root(), 4, 1, Default::default());
    /// let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// let loss = |x: &Tensor| net.forward(x).square().mean(Kind::Float);
    /// let (a, b) = (Tensor::ones([8, 4], (Kind::Float, Device::Cpu)), Tensor::zeros([8, 4], (Kind::Float, Device::Cpu)));
    /// dopt.no_sync(|d| d.backward_step(&loss(&a)))?; // accumulates only
    /// dopt.backward_step(&loss(&b))?; // reduces the sum of both, steps
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn no_sync<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let was = std::mem::replace(&mut self.no_sync, true);
        let r = f(self);
        self.no_sync = was;
        r
    }

    /// Average the gradients of the trainable variables across ranks, in place, through
    /// the engine, under their variables' names, and wait for them: those a hook
    /// submitted during [`backward`](Self::backward) and the rest. A variable without a
    /// gradient on this rank (unused in the forward pass) gets a zero gradient, so that
    /// every rank submits every name; frozen variables are skipped (freeze the same ones
    /// on every rank). Called by [`step`](Self::step); public for loops that call
    /// `backward` and the optimizer's `step` themselves.
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
        let trainable = trainable_named(&self.vs)?;
        self.reducer.finish(trainable, &self.how, &mut self.staging)
    }

    /// Run `loss.backward()` for this step, zeroing the gradients first when it is the
    /// step's first pass. On the step's last pass (see
    /// [`set_backward_passes_per_step`](Self::set_backward_passes_per_step) and
    /// [`no_sync`](Self::no_sync)), each gradient goes to the engine from an autograd hook
    /// as soon as backward has accumulated it (`KOLO_TORCH_OVERLAP`, on by default), and
    /// [`step`](Self::step) then waits only for what is still in flight.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = nn::linear(vs.root(), 4, 1, Default::default());
    /// let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// let x = Tensor::ones([8, 4], (Kind::Float, Device::Cpu));
    /// dopt.backward(&net.forward(&x).square().mean(Kind::Float))?;
    /// dopt.step()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        if self.passes == 0 {
            self.opt.zero_grad();
        }
        self.passes += 1;
        if self.sync_pass() {
            self.reducer.arm(&self.how);
        }
        if let Err(e) = loss.f_backward() {
            // Reduce what there is, so that the other ranks are not left waiting.
            if self.sync_pass() {
                let _ = self.allreduce_gradients();
            }
            self.passes = 0;
            return Err(torch_err("backward")(e));
        }
        Ok(())
    }

    /// Whether the current backward pass is the last before a step.
    fn sync_pass(&self) -> bool {
        !self.no_sync && self.passes >= self.passes_per_step
    }

    /// Reduce the gradients ([`allreduce_gradients`](Self::allreduce_gradients)) and step
    /// the optimizer; the next [`backward`](Self::backward) starts a new step.
    ///
    /// ```no_run
    /// # use kolo::torch::tch::{nn, nn::OptimizerConfig, Device, Tensor};
    /// # let comm = kolo::Communicator::from_env()?;
    /// # let vs = nn::VarStore::new(Device::Cpu);
    /// # let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    /// # let loss = Tensor::from(0.0);
    /// let mut dopt = kolo::torch::DistributedOptimizer::new(comm, vs, opt)?;
    /// dopt.backward(&loss)?;
    /// dopt.step()?;
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn step(&mut self) -> Result<()> {
        self.passes = 0;
        self.allreduce_gradients()?;
        self.opt.step();
        Ok(())
    }

    /// One training step on this rank's shard: zero the gradients, run
    /// [`backward`](Self::backward) (which hands each gradient to the engine as soon as it
    /// is ready), wait for the averaged gradients and step the optimizer. With the mean
    /// loss over each rank's equal-sized shard, this is the step one process would take on
    /// the whole global batch. With several passes per step, or inside
    /// [`no_sync`](Self::no_sync), a pass that does not end the step only accumulates.
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
        self.backward(loss)?;
        if self.sync_pass() {
            self.step()?;
        }
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
        let DistributedOptimizer {
            reducer,
            engine,
            vs,
            opt,
            ..
        } = self;
        // Removes the hooks and gives back its reference to the engine.
        drop(reducer);
        let engine = Arc::into_inner(engine).ok_or_else(|| {
            Error::InvalidArgument("torch: the engine is still referenced at shutdown".into())
        })?;
        Ok((engine.shutdown()?, vs, opt))
    }

    /// All variables with their names, sorted by name (the same order on every rank).
    fn sorted_variables(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }
}

/// The trainable, unfrozen variables of `vs` with their names, in creation order.
fn trainable_named(vs: &nn::VarStore) -> Result<Vec<(String, Tensor)>> {
    let vars = vs.variables_.lock().unwrap_or_else(|p| p.into_inner());
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
