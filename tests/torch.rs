//! kolo::torch (feature `torch`): data-parallel training (gradients averaged through the
//! engine) is equivalent to one process on the whole batch, also when the ranks create
//! their variables, and so submit their gradients, in different orders; parameters
//! broadcast and stay in sync, every supported tensor kind round-trips through the
//! collectives (blocking and through the engine), bad input gives errors, the CUDA path
//! (when a GPU is present), and the train_digits example reaches 95% on 4 ranks under
//! kolorun.
//!
//! Ranks are threads in this process (tests/common), each with its own VarStore. The
//! gradients are reduced while backward runs (`KOLO_TORCH_OVERLAP`, on by default) unless a
//! test turns that off; tests/torch_training has the training features.
mod common;
mod torch_training;

use common::{mix, run_ranks, run_ranks_with};
use kolo::engine::Engine;
use kolo::torch::tch::{self, nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
use kolo::torch::{
    allgather_tensor, allreduce_tensor, broadcast_tensor, dtype_of, engine_allreduce_tensor,
    DistributedOptimizer,
};
use kolo::{Communicator, Config, Error, ReduceOp};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Deterministic values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (mix(seed ^ ((i as u64) << 20)) >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
        .collect()
}

fn tensor(seed: u64, shape: &[i64]) -> Tensor {
    let n = shape.iter().product::<i64>() as usize;
    Tensor::from_slice(&values(seed, n)).reshape(shape)
}

const IN: i64 = 5;
const HIDDEN: i64 = 8;
const OUT: i64 = 3;
const GLOBAL_BATCH: i64 = 8;
const STEPS: u64 = 30;

/// A two-layer tanh MLP in f64 with fixed initial weights (the same on every rank unless
/// `init_seed` differs).
fn model(vs: &mut nn::VarStore, init_seed: u64) -> impl Module {
    model_in_order(vs, init_seed, [0, 1, 2, 3])
}

/// [`model`] with its four variables (w1, b1, w2, b2) created in `order`: the order of
/// `VarStore::trainable_variables`, in which `DistributedOptimizer` submits the gradients.
fn model_in_order(vs: &mut nn::VarStore, init_seed: u64, order: [usize; 4]) -> impl Module {
    vs.set_kind(Kind::Double);
    let root = vs.root();
    let spec: [(&str, Vec<i64>); 4] = [
        ("w1", vec![HIDDEN, IN]),
        ("b1", vec![HIDDEN]),
        ("w2", vec![OUT, HIDDEN]),
        ("b2", vec![OUT]),
    ];
    let mut vars: [Option<Tensor>; 4] = Default::default();
    for i in order {
        let (name, shape) = &spec[i];
        vars[i] = Some(root.var_copy(name, &tensor(init_seed + i as u64, shape)));
    }
    let [w1, b1, w2, b2] = vars.map(|v| v.expect("every variable created"));
    nn::func(move |x| (x.matmul(&w1.tr()) + &b1).tanh().matmul(&w2.tr()) + &b2)
}

/// Input and target of global batch `step`.
fn batch(step: u64) -> (Tensor, Tensor) {
    (
        tensor(1000 + step, &[GLOBAL_BATCH, IN]),
        tensor(5000 + step, &[GLOBAL_BATCH, OUT]),
    )
}

fn sgd() -> nn::Sgd {
    nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
}

/// Every variable, sorted by name, flattened into one vector.
fn params(vs: &nn::VarStore) -> Vec<f64> {
    let mut named: Vec<_> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
        .iter()
        .flat_map(|(_, t)| Vec::<f64>::try_from(t.reshape([-1])).unwrap())
        .collect()
}

/// One process training on the whole global batch.
fn reference() -> Vec<f64> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = model(&mut vs, 7);
    let mut opt = sgd().build(&vs, 0.1).unwrap();
    for step in 0..STEPS {
        let (x, y) = batch(step);
        let loss = (net.forward(&x) - y).square().mean(Kind::Double);
        opt.backward_step(&loss);
    }
    params(&vs)
}

/// Rank `comm.rank()` trains on its shard of each global batch, with its variables
/// created in `order(rank)`.
fn data_parallel(comm: Communicator, order: impl Fn(usize) -> [usize; 4]) -> Vec<f64> {
    let (r, n) = (comm.rank() as i64, comm.size() as i64);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = model_in_order(&mut vs, 7, order(comm.rank()));
    let opt = sgd().build(&vs, 0.1).unwrap();
    let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
    let per = GLOBAL_BATCH / n;
    for step in 0..STEPS {
        let (x, y) = batch(step);
        let (x, y) = (x.narrow(0, r * per, per), y.narrow(0, r * per, per));
        let loss = (net.forward(&x) - y).square().mean(Kind::Double);
        dopt.backward_step(&loss).unwrap();
    }
    assert!(dopt.parameters_in_sync().unwrap());
    let (_comm, vs, _opt) = dopt.shutdown().unwrap();
    params(&vs)
}

/// Training on N = 1, 2, 4 ranks ends within 1e-10 of one process and bitwise equal on
/// every rank. `tweak` sets the engine's fusion settings; `order` the variables' creation
/// (and gradient submission) order on each rank.
fn check_equivalence(
    tweak: impl Fn(&mut Config) + Sync,
    order: impl Fn(usize) -> [usize; 4] + Sync,
) {
    tch::set_num_threads(1);
    let want = reference();
    for n in [1, 2, 4] {
        let got = run_ranks_with(n, &tweak, |c| data_parallel(c, &order));
        for (r, p) in got.iter().enumerate() {
            assert_eq!(p.len(), want.len());
            let worst = p
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-10,
                "N={n} rank {r}: parameters differ from one process by {worst:e}"
            );
            let same = p
                .iter()
                .zip(&got[0])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "N={n}: rank {r}'s parameters are not bitwise rank 0's"
            );
        }
        // The parameters moved: the test is not vacuous.
        let init = {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let _ = model(&mut vs, 7);
            params(&vs)
        };
        assert!(got[0].iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

const CREATION_ORDER: fn(usize) -> [usize; 4] = |_| [0, 1, 2, 3];

#[test]
fn equivalence_with_one_process_default_fusion() {
    check_equivalence(|_| {}, CREATION_ORDER);
}

#[test]
fn equivalence_with_one_process_small_fusion_buffers() {
    // Fusion buffers of 100 bytes: several per step, and tensors larger than a buffer;
    // tensors of 128 bytes and more (w1, 320 bytes) reduced alone in place.
    check_equivalence(
        |c| {
            c.fusion_threshold = 100;
            c.fusion_inplace_bytes = 128;
        },
        CREATION_ORDER,
    );
}

#[test]
fn equivalence_with_rank_dependent_gradient_order() {
    // Each rank creates its variables in another order, so it submits its gradients to
    // the engine in another order; the engine matches them by name.
    let order = |rank: usize| [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]][rank % 4];
    check_equivalence(|_| {}, order);
    check_equivalence(|c| c.fusion_threshold = 100, order);
}

#[test]
fn equivalence_with_one_process_without_overlap() {
    // KOLO_TORCH_OVERLAP=0: every gradient submitted after backward.
    let order = |rank: usize| [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]][rank % 4];
    check_equivalence(|c| c.torch_overlap = false, CREATION_ORDER);
    check_equivalence(|c| c.torch_overlap = false, order);
}

#[test]
fn broadcast_parameters_makes_ranks_identical() {
    tch::set_num_threads(1);
    let got = run_ranks(3, |comm| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _net = model(&mut vs, 100 + comm.rank() as u64);
        // A non-trainable buffer too (like batch-norm statistics).
        let _ = vs
            .root()
            .add("stats", tensor(200 + comm.rank() as u64, &[4]), false);
        let opt = sgd().build(&vs, 0.1).unwrap();
        let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
        let before = dopt.parameters_in_sync().unwrap();
        dopt.broadcast_parameters(1).unwrap();
        let after = dopt.parameters_in_sync().unwrap();
        let root_bad = dopt.broadcast_parameters(3);
        let (_comm, vs, _opt) = dopt.shutdown().unwrap();
        (before, after, params(&vs), root_bad)
    });
    let want = {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = model(&mut vs, 101);
        let _ = vs.root().add("stats", tensor(201, &[4]), false);
        params(&vs)
    };
    for (r, (before, after, p, root_bad)) in got.into_iter().enumerate() {
        assert!(
            !before,
            "rank {r}: differently initialised ranks reported in sync"
        );
        assert!(after, "rank {r}: not in sync after broadcast_parameters");
        assert_eq!(p, want, "rank {r}: parameters are not rank 1's");
        assert!(matches!(root_bad, Err(Error::InvalidArgument(_))));
    }
}

/// Small integers whose sum over up to 4 ranks is exact in every kind.
fn int_tensor(rank: usize, kind: Kind, shape: &[i64]) -> Tensor {
    let n = shape.iter().product::<i64>() as usize;
    let v: Vec<i64> = (0..n)
        .map(|i| (mix(((rank as u64) << 32) | i as u64) % 7) as i64)
        .collect();
    Tensor::from_slice(&v).reshape(shape).to_kind(kind)
}

const KINDS: [Kind; 7] = [
    Kind::Uint8,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::BFloat16,
    Kind::Float,
    Kind::Double,
];

#[test]
fn every_supported_kind_round_trips() {
    tch::set_num_threads(1);
    let n = 3;
    let shape = [5i64, 7];
    let sum_of = |kind: Kind| {
        (0..n)
            .map(|r| int_tensor(r, Kind::Int64, &shape))
            .reduce(|a, b| a + b)
            .unwrap()
            .to_kind(kind)
    };
    let errs = run_ranks(n, |comm| {
        let mut errs = Vec::new();
        let r = comm.rank();
        for kind in KINDS {
            let mut fail = |what: &str| errs.push(format!("rank {r} {kind:?}: {what}"));
            dtype_of(kind).unwrap();
            // Allreduce (sum) of a contiguous tensor.
            let mut t = int_tensor(r, kind, &shape);
            allreduce_tensor(&comm, &mut t, ReduceOp::Sum).unwrap();
            if t.kind() != kind || !t.equal(&sum_of(kind)) {
                fail("allreduce sum");
            }
            // A non-contiguous view (transpose) is reduced in place too.
            let base = int_tensor(r, kind, &shape);
            let mut view = base.tr();
            allreduce_tensor(&comm, &mut view, ReduceOp::Max).unwrap();
            let max = (0..n)
                .map(|q| int_tensor(q, kind, &shape))
                .reduce(|a, b| a.maximum(&b))
                .unwrap();
            if !base.equal(&max) {
                fail("allreduce max through a transposed view");
            }
            // Broadcast from rank 2.
            let mut b = int_tensor(r, kind, &shape);
            broadcast_tensor(&comm, &mut b, 2).unwrap();
            if !b.equal(&int_tensor(2, kind, &shape)) {
                fail("broadcast");
            }
            // Allgather: [size, ..shape], rank order.
            let g = allgather_tensor(&comm, &int_tensor(r, kind, &shape)).unwrap();
            let want = Tensor::stack(
                &(0..n)
                    .map(|q| int_tensor(q, kind, &shape))
                    .collect::<Vec<_>>(),
                0,
            );
            if g.size() != [n as i64, 5, 7] || g.kind() != kind || !g.equal(&want) {
                fail("allgather");
            }
        }
        // Avg of floats: (0 + 1 + 2) / 3 = 1.
        let mut a = Tensor::full([4], r as f64, (Kind::Float, Device::Cpu));
        allreduce_tensor(&comm, &mut a, ReduceOp::Avg).unwrap();
        if !a.equal(&Tensor::ones([4], (Kind::Float, Device::Cpu))) {
            errs.push(format!("rank {r}: avg"));
        }
        // A 0-dim tensor.
        let mut s = Tensor::from(r as i64);
        allreduce_tensor(&comm, &mut s, ReduceOp::Sum).unwrap();
        if s.int64_value(&[]) != 3 {
            errs.push(format!("rank {r}: scalar"));
        }
        // The same through the engine: every kind, contiguous and through a view.
        let engine = Engine::start(comm).unwrap();
        for kind in KINDS {
            let mut t = int_tensor(r, kind, &shape);
            engine_allreduce_tensor(&engine, &format!("{kind:?}"), &mut t, ReduceOp::Sum).unwrap();
            if t.kind() != kind || !t.equal(&sum_of(kind)) {
                errs.push(format!("rank {r} {kind:?}: engine allreduce sum"));
            }
            let base = int_tensor(r, kind, &shape);
            let mut view = base.tr();
            engine_allreduce_tensor(&engine, "view", &mut view, ReduceOp::Sum).unwrap();
            if !base.equal(&sum_of(kind)) {
                errs.push(format!(
                    "rank {r} {kind:?}: engine allreduce through a view"
                ));
            }
        }
        engine.shutdown().unwrap();
        errs
    });
    let errs: Vec<String> = errs.into_iter().flatten().collect();
    assert!(errs.is_empty(), "{errs:#?}");
}

#[test]
fn unsupported_input_is_an_error() {
    tch::set_num_threads(1);
    let got = run_ranks(2, |comm| {
        let mut out = Vec::new();
        for kind in [Kind::Bool, Kind::Int8, Kind::Int16, Kind::ComplexFloat] {
            let mut t = Tensor::zeros([3], (kind, Device::Cpu));
            out.push(allreduce_tensor(&comm, &mut t, ReduceOp::Sum));
            out.push(broadcast_tensor(&comm, &mut t, 0));
            out.push(allgather_tensor(&comm, &t).map(|_| ()));
        }
        // Undefined tensor (a gradient that was never computed).
        let mut undefined = Tensor::zeros([2], (Kind::Float, Device::Cpu)).grad();
        out.push(allreduce_tensor(&comm, &mut undefined, ReduceOp::Sum));
        // The communicator still works afterwards.
        let mut ok = Tensor::ones([2], (Kind::Float, Device::Cpu));
        allreduce_tensor(&comm, &mut ok, ReduceOp::Sum).unwrap();
        assert_eq!(ok.double_value(&[0]), 2.0);
        // Through the engine: refused before anything is submitted; the engine still works.
        let engine = Engine::start(comm).unwrap();
        let mut t = Tensor::zeros([3], (Kind::Bool, Device::Cpu));
        out.push(engine_allreduce_tensor(
            &engine,
            "bool",
            &mut t,
            ReduceOp::Sum,
        ));
        out.push(engine_allreduce_tensor(
            &engine,
            "undefined",
            &mut undefined,
            ReduceOp::Sum,
        ));
        engine_allreduce_tensor(&engine, "ok", &mut ok, ReduceOp::Sum).unwrap();
        assert_eq!(ok.double_value(&[0]), 4.0);
        engine.shutdown().unwrap();
        out
    });
    for (r, results) in got.iter().enumerate() {
        for res in results {
            match res {
                Err(Error::InvalidArgument(m)) => assert!(m.contains("torch"), "{m}"),
                other => panic!("rank {r}: expected InvalidArgument, got {other:?}"),
            }
        }
    }
}

#[test]
fn different_models_are_a_mismatch_on_every_rank() {
    tch::set_num_threads(1);
    let got = run_ranks(3, |comm| {
        let vs = nn::VarStore::new(Device::Cpu);
        let width = if comm.rank() == 2 { 5 } else { 4 };
        let _ = nn::linear(vs.root(), 3, width, Default::default());
        let opt = sgd().build(&vs, 0.1).unwrap();
        DistributedOptimizer::new(comm, vs, opt).map(|_| ())
    });
    for (r, res) in got.iter().enumerate() {
        assert!(
            matches!(res, Err(Error::Mismatch { .. })),
            "rank {r}: {res:?}"
        );
    }
}

#[test]
fn unused_parameters_get_zero_gradients() {
    // Rank 0 never uses `spare`; rank 1 does. Both must submit every gradient.
    tch::set_num_threads(1);
    let got = run_ranks(2, |comm| {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::ones([3], (Kind::Float, Device::Cpu)));
        let spare = vs
            .root()
            .var_copy("spare", &Tensor::ones([2], (Kind::Float, Device::Cpu)));
        // A frozen variable (no gradient) is skipped.
        let frozen = vs
            .root()
            .var_copy("frozen", &Tensor::ones([2], (Kind::Float, Device::Cpu)))
            .set_requires_grad(false);
        let opt = nn::Sgd::default().build(&vs, 1.0).unwrap();
        let rank = comm.rank();
        let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
        let loss = match rank {
            1 => w.sum(Kind::Float) + spare.sum(Kind::Float) * 2.0,
            _ => w.sum(Kind::Float),
        };
        dopt.backward_step(&loss).unwrap();
        assert!(dopt.parameters_in_sync().unwrap());
        dopt.shutdown().unwrap();
        assert_eq!(Vec::<f32>::try_from(&frozen).unwrap(), [1.0; 2]);
        (
            Vec::<f32>::try_from(&w).unwrap(),
            Vec::<f32>::try_from(&spare).unwrap(),
        )
    });
    for (w, spare) in got {
        // w: gradient 1 on both ranks; spare: (0 + 2) / 2 = 1.
        assert_eq!(w, [0.0; 3]);
        assert_eq!(spare, [0.0; 2]);
    }
}

#[test]
fn cuda_tensors_and_training() {
    if !tch::Cuda::is_available() {
        println!("SKIPPED cuda_tensors_and_training: CUDA is not available (tch::Cuda::is_available() is false)");
        return;
    }
    tch::set_num_threads(1);
    let n = 2;
    let want = reference();
    // Small fusion buffers: several per step.
    let tweak = |c: &mut Config| c.fusion_threshold = 100;
    let got = run_ranks_with(n, tweak, |comm| {
        let dev = kolo::torch::cuda_device(&comm).unwrap();
        assert_eq!(
            dev,
            Device::Cuda(comm.local_rank() % tch::Cuda::device_count() as usize)
        );
        // Every kind through the CUDA staging path.
        for kind in KINDS {
            let mut t = int_tensor(comm.rank(), kind, &[5, 7]).to_device(dev);
            allreduce_tensor(&comm, &mut t, ReduceOp::Sum).unwrap();
            let sum = (int_tensor(0, Kind::Int64, &[5, 7]) + int_tensor(1, Kind::Int64, &[5, 7]))
                .to_kind(kind);
            assert_eq!(t.device(), dev);
            assert!(t.to_device(Device::Cpu).equal(&sum), "{kind:?}");
            let g = allgather_tensor(&comm, &t).unwrap();
            assert_eq!(g.device(), dev);
            let mut b = int_tensor(comm.rank(), kind, &[3]).to_device(dev);
            broadcast_tensor(&comm, &mut b, 1).unwrap();
            assert!(b.to_device(Device::Cpu).equal(&int_tensor(1, kind, &[3])));
        }
        // Training on the GPU matches one CPU process.
        let (r, size) = (comm.rank() as i64, comm.size() as i64);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = model(&mut vs, 7);
        vs.set_device(dev);
        let w: Vec<Tensor> = {
            let v = vs.variables();
            ["w1", "b1", "w2", "b2"]
                .iter()
                .map(|k| v[*k].shallow_clone())
                .collect()
        };
        let net =
            nn::func(move |x| (x.matmul(&w[0].tr()) + &w[1]).tanh().matmul(&w[2].tr()) + &w[3]);
        let opt = sgd().build(&vs, 0.1).unwrap();
        let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
        // Through the engine's staging path too (a transposed view).
        for kind in KINDS {
            let base = int_tensor(r as usize, kind, &[5, 7]).to_device(dev);
            let mut view = base.tr();
            engine_allreduce_tensor(dopt.engine(), "cuda", &mut view, ReduceOp::Sum).unwrap();
            let sum = (int_tensor(0, Kind::Int64, &[5, 7]) + int_tensor(1, Kind::Int64, &[5, 7]))
                .to_kind(kind);
            assert!(base.to_device(Device::Cpu).equal(&sum), "engine {kind:?}");
        }
        let per = GLOBAL_BATCH / size;
        for step in 0..STEPS {
            let (x, y) = batch(step);
            let x = x.narrow(0, r * per, per).to_device(dev);
            let y = y.narrow(0, r * per, per).to_device(dev);
            let loss = (net.forward(&x) - y).square().mean(Kind::Double);
            dopt.backward_step(&loss).unwrap();
        }
        assert!(dopt.parameters_in_sync().unwrap());
        let (_comm, trained, _opt) = dopt.shutdown().unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = model(&mut vs, 7);
        vs.copy(&trained).unwrap();
        params(&vs)
    });
    for p in got {
        let worst = p
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // cuBLAS may order sums differently from the CPU.
        assert!(worst <= 1e-9, "CUDA training differs from CPU by {worst:e}");
    }
    println!(
        "cuda_tensors_and_training: ran on {} CUDA device(s)",
        tch::Cuda::device_count()
    );
}

/// `target/<profile>/examples/train_digits`, built with the torch feature (a no-op when
/// cargo finds it up to date; `scripts/test.sh` builds it beforehand).
fn train_digits() -> PathBuf {
    let kolorun = Path::new(env!("CARGO_BIN_EXE_kolorun"));
    let dir = kolorun.parent().unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--features", "torch", "--example", "train_digits"])
        .arg("--manifest-path")
        .arg(manifest.join("Cargo.toml"));
    if dir.file_name().is_some_and(|d| d == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build --example train_digits failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("examples").join("train_digits")
}

#[test]
fn train_digits_reaches_95_percent_on_4_ranks() {
    train_digits_reaches_95_percent("none");
}

#[test]
fn train_digits_with_fp16_gradients_reaches_95_percent_on_4_ranks() {
    train_digits_reaches_95_percent("fp16");
}

fn train_digits_reaches_95_percent(compression: &str) {
    let exe = train_digits();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kolorun"))
        .args(["-np", "4", "--start-timeout", "60"])
        .arg(&exe)
        .args(["--epochs", "20", "--compression", compression])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kolorun");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).ok();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            // kolorun forwards SIGTERM to its ranks.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(6));
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out_t.join().unwrap(), err_t.join().unwrap());
    let status = status.unwrap_or_else(|| panic!("train_digits ran past 300 s:\n{out}\n{err}"));
    assert!(
        status.success(),
        "train_digits failed ({status}):\n{out}\n{err}"
    );
    print!("{out}");
    let acc: f64 = out
        .lines()
        .find_map(|l| l.split("final_accuracy=").nth(1))
        .unwrap_or_else(|| panic!("no final_accuracy= line:\n{out}\n{err}"))
        .trim()
        .parse()
        .expect("final_accuracy is a number");
    assert!(
        out.contains(&format!("compression {compression},")),
        "the run used --compression {compression}:\n{out}"
    );
    assert!(acc >= 0.95, "final accuracy {acc} < 0.95:\n{out}");
}

/// Pids of live processes whose environment holds every `KEY=VALUE` in `want`.
fn pids_with_env(want: &[String]) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if want.iter().all(|w| vars.contains(&w.as_bytes())) {
            out.push(pid);
        }
    }
    out
}

/// `train_digits --elastic` under `kolorun -np 4 --min-np 2 --max-np 4`: member 2 is
/// killed after epoch 5 and training goes on with 3 ranks; then the discovery script
/// offers the fourth slot again, a new member joins, and the run still reaches 95%.
#[test]
fn train_digits_elastic_survives_a_kill_and_a_join() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let exe = train_digits();
    let dir = std::env::temp_dir().join(format!("kolo-elastic-digits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "localhost:4\n").unwrap();
    let tag = format!("KOLO_TEST_TAG={}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kolorun"))
        .args([
            "-np",
            "4",
            "--min-np",
            "2",
            "--max-np",
            "4",
            "--max-host-failures",
            "5",
        ])
        .args(["--discovery-interval", "0.5", "--host-discovery-script"])
        .arg(format!("cat {}", hosts.display()))
        .arg(&exe)
        .args(["--elastic", "--epochs", "24"])
        .env("KOLO_TEST_TAG", std::process::id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kolorun");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|p| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(p).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(l);
            }
        })
    })
    .collect();
    let text = |lines: &Arc<Mutex<Vec<String>>>| {
        lines.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut wait_for = |what: &str, pred: &dyn Fn(&str) -> bool| loop {
        if text(&lines).lines().any(pred) {
            return;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            // SAFETY: kill(2) on our own child's pid; kolorun stops its ranks.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            panic!("waiting for {what}:\n{}", text(&lines));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for("epoch 5", &|l| l.contains("epoch   5/"));
    std::fs::write(&hosts, "localhost:3\n").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let victims = pids_with_env(&[tag.clone(), "KOLO_MEMBER_ID=2".into()]);
    assert_eq!(victims.len(), 1, "member 2: {victims:?}");
    // SAFETY: kill(2) on a rank of the job this test started.
    unsafe { libc::kill(victims[0], libc::SIGKILL) };
    wait_for("an epoch on 3 ranks", &|l| l.contains("ranks 3 "));
    std::fs::write(&hosts, "localhost:4\n").unwrap();
    wait_for("the new member", &|l| l.contains("members [0, 1, 3, 4]"));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ran past 300 s:\n{}",
            text(&lines)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        r.join().unwrap();
    }
    let out = text(&lines);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "kolorun failed ({status}):\n{out}");
    print!("{out}");
    let acc: f64 = out
        .lines()
        .find_map(|l| l.split("final_accuracy=").nth(1))
        .unwrap_or_else(|| panic!("no final_accuracy= line:\n{out}"))
        .trim()
        .parse()
        .expect("final_accuracy is a number");
    assert!(acc >= 0.95, "final accuracy {acc} < 0.95:\n{out}");
    // The joined member received the model from several survivors.
    assert!(
        out.lines()
            .any(|l| l.contains("member 4 is rank 3 of 4") && l.contains("from ranks [0, 1, 2]")),
        "{out}"
    );
}
