//! Training features of `DistributedOptimizer` with gradients reduced while backward runs
//! (`KOLO_TORCH_OVERLAP`, on by default) and without: unused, frozen and twice-used
//! parameters, gradient accumulation (passes per step, `no_sync`), the predivide factor,
//! ranks producing gradients in different orders, and (from the engine's timeline) the
//! first gradient submitted before backward has finished.

use super::common::run_ranks_with;
use super::{batch, params, sgd, tensor, GLOBAL_BATCH, HIDDEN, IN, OUT, STEPS};
use kolo::torch::tch::{self, nn, nn::OptimizerConfig, Device, Kind, Tensor};
use kolo::torch::{engine_allreduce_tensor, DistributedOptimizer};
use kolo::{Config, ReduceOp};
use std::path::{Path, PathBuf};

/// A two-layer model whose second weight is used twice, with a parameter used only in
/// some steps (`spare`) and a frozen one (`frozen`, requires_grad false).
struct Feat {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    spare: Tensor,
    frozen: Tensor,
}

fn feat_model(vs: &mut nn::VarStore) -> Feat {
    vs.set_kind(Kind::Double);
    let root = vs.root();
    let var = |name: &str, seed: u64, shape: &[i64]| root.var_copy(name, &tensor(seed, shape));
    Feat {
        w1: var("w1", 7, &[HIDDEN, IN]),
        b1: var("b1", 8, &[HIDDEN]),
        w2: var("w2", 9, &[OUT, HIDDEN]),
        b2: var("b2", 10, &[OUT]),
        spare: var("spare", 11, &[OUT]),
        frozen: var("frozen", 12, &[OUT]).set_requires_grad(false),
    }
}

fn uses_spare(step: u64) -> bool {
    step % 3 == 1
}

/// The model's output. With `early`, the transposes of `w2` are taken before the first
/// layer, so autograd reaches them after the first layer's parameters (their nodes have
/// lower sequence numbers): the gradients come in another order than without.
fn feat_forward(f: &Feat, x: &Tensor, step: u64, early: bool) -> Tensor {
    let pre = early.then(|| (f.w2.tr(), f.w2.tr()));
    let h = (x.matmul(&f.w1.tr()) + &f.b1).tanh();
    let (w2a, w2b) = pre.unwrap_or_else(|| (f.w2.tr(), f.w2.tr()));
    let out = h.matmul(&w2a) + &f.b2 + &f.frozen + h.matmul(&w2b).tanh() * 0.5;
    if uses_spare(step) {
        out + &f.spare
    } else {
        out
    }
}

fn mse(out: Tensor, y: &Tensor) -> Tensor {
    (out - y).square().mean(Kind::Double)
}

/// How a data-parallel run accumulates `passes` backward passes per step.
#[derive(Clone, Copy, Debug)]
enum Acc {
    PassesPerStep,
    NoSync,
}

/// One process on the whole batch: `passes` micro-batches per step, gradients summed. An
/// unused `spare` gets a zero gradient, as DistributedOptimizer gives it.
fn feat_reference(passes: u64) -> Vec<f64> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let f = feat_model(&mut vs);
    let mut opt = sgd().build(&vs, 0.1).unwrap();
    for step in 0..STEPS {
        opt.zero_grad();
        for m in 0..passes {
            let (x, y) = batch(step * passes + m);
            let mut loss = mse(feat_forward(&f, &x, step, false), &y);
            if !uses_spare(step) {
                loss += f.spare.sum(Kind::Double) * 0.0;
            }
            loss.backward();
        }
        opt.step();
    }
    params(&vs)
}

fn feat_data_parallel(comm: kolo::Communicator, passes: u64, acc: Acc, predivide: f64) -> Vec<f64> {
    let (r, n) = (comm.rank() as i64, comm.size() as i64);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let f = feat_model(&mut vs);
    let opt = sgd().build(&vs, 0.1).unwrap();
    let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
    if let Acc::PassesPerStep = acc {
        dopt.set_backward_passes_per_step(passes as usize).unwrap();
    }
    dopt.set_gradient_predivide_factor(predivide).unwrap();
    let per = GLOBAL_BATCH / n;
    for step in 0..STEPS {
        for m in 0..passes {
            let (x, y) = batch(step * passes + m);
            let (x, y) = (x.narrow(0, r * per, per), y.narrow(0, r * per, per));
            let loss = mse(feat_forward(&f, &x, step, r % 2 == 1), &y);
            match acc {
                Acc::NoSync if m + 1 < passes => dopt.no_sync(|d| d.backward_step(&loss)),
                _ => dopt.backward_step(&loss),
            }
            .unwrap();
        }
    }
    assert!(dopt.parameters_in_sync().unwrap());
    let (_comm, vs, _opt) = dopt.shutdown().unwrap();
    assert!(
        vs.variables()["frozen"].equal(&tensor(12, &[OUT])),
        "a frozen parameter moved"
    );
    params(&vs)
}

/// Within 1e-10 of `want`, bitwise equal across ranks, and moved from the start.
fn assert_equivalent(what: &str, want: &[f64], got: &[Vec<f64>]) {
    for (r, p) in got.iter().enumerate() {
        assert_eq!(p.len(), want.len());
        let worst = p
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-10,
            "{what}: rank {r} differs from one process by {worst:e}"
        );
        let same = p
            .iter()
            .zip(&got[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{what}: rank {r}'s parameters are not bitwise rank 0's"
        );
    }
    let init = params(&{
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = feat_model(&mut vs);
        vs
    });
    assert!(got[0].iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-3));
}

fn check_features(overlap: bool) {
    tch::set_num_threads(1);
    let cases: [(u64, Acc, f64); 4] = [
        (1, Acc::PassesPerStep, 1.0),
        (3, Acc::PassesPerStep, 1.0),
        (3, Acc::NoSync, 1.0),
        (2, Acc::PassesPerStep, 4.0),
    ];
    for (passes, acc, predivide) in cases {
        let want = feat_reference(passes);
        for n in [1, 2, 4] {
            let got = run_ranks_with(
                n,
                |c: &mut Config| c.torch_overlap = overlap,
                |c| feat_data_parallel(c, passes, acc, predivide),
            );
            let what = format!(
                "overlap {overlap}, N={n}, {passes} passes by {acc:?}, predivide {predivide}"
            );
            assert_equivalent(&what, &want, &got);
        }
    }
}

#[test]
fn unused_frozen_twice_used_accumulated_and_predivided_with_overlap() {
    check_features(true);
}

#[test]
fn unused_frozen_twice_used_accumulated_and_predivided_without_overlap() {
    check_features(false);
}

#[test]
fn a_second_backward_in_a_synchronised_pass_is_an_error_on_every_rank() {
    tch::set_num_threads(1);
    let got = run_ranks_with(
        2,
        |_| {},
        |comm| {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let f = feat_model(&mut vs);
            let opt = sgd().build(&vs, 0.1).unwrap();
            let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
            let (x, y) = batch(0);
            dopt.backward(&mse(feat_forward(&f, &x, 0, false), &y))
                .unwrap();
            // Outside the optimizer: autograd adds to gradients the engine may be reducing.
            mse(feat_forward(&f, &x, 0, false), &y).backward();
            let second = dopt.step();
            // The next step is clean again.
            dopt.backward_step(&mse(feat_forward(&f, &x, 1, false), &y))
                .unwrap();
            dopt.shutdown().unwrap();
            second
        },
    );
    for (r, res) in got.iter().enumerate() {
        let e = res
            .as_ref()
            .expect_err("a second accumulation was not reported");
        assert!(e.to_string().contains("accumulated again"), "rank {r}: {e}");
    }
}

/// A fresh timeline prefix in the temporary directory.
fn timeline_prefix(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kolo-torch-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("tl")
}

/// `(tensor name, NEGOTIATE start in µs)` of rank `rank`'s timeline, in time order: when
/// each tensor was submitted.
fn submissions(prefix: &Path, rank: usize) -> Vec<(String, u64)> {
    let path = format!("{}.{rank}.json", prefix.display());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let events = v["traceEvents"].as_array().expect("traceEvents");
    let lane = |tid: &serde_json::Value| {
        events
            .iter()
            .find(|e| e["name"] == "thread_name" && &e["tid"] == tid)
            .and_then(|e| e["args"]["name"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut out: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["name"] == "NEGOTIATE")
        .map(|e| (lane(&e["tid"]), e["ts"].as_u64().expect("ts")))
        .collect();
    out.sort_by_key(|s| s.1);
    out
}

/// Three layers whose first takes most of backward: its weight's gradient comes last.
fn wide_step(vs: &nn::VarStore, seed: i64) -> Tensor {
    let root = vs.root();
    let get = |name: &str, shape: &[i64]| {
        vs.variables()
            .get(name)
            .map(Tensor::shallow_clone)
            .unwrap_or_else(|| root.var(name, shape, nn::Init::Const(0.01)))
    };
    let (w1, w2, w3) = (
        get("w1", &[512, 512]),
        get("w2", &[512, 512]),
        get("w3", &[4, 512]),
    );
    tch::manual_seed(seed);
    let x = Tensor::randn([512, 512], (Kind::Float, Device::Cpu));
    let h = x.matmul(&w1.tr()).tanh().matmul(&w2.tr()).tanh();
    h.matmul(&w3.tr()).square().mean(Kind::Float)
}

/// Per rank and step: (earliest and latest gradient submission, end of backward), in µs
/// of the engine's timeline; the end of backward is when a marker tensor was submitted
/// right after `backward` returned.
fn overlap_run(overlap: bool) -> Vec<Vec<(u64, u64, u64)>> {
    let prefix = timeline_prefix(if overlap { "overlap-on" } else { "overlap-off" });
    let tweak = |c: &mut Config| {
        c.torch_overlap = overlap;
        c.timeline = Some(prefix.clone());
    };
    const STEPS: usize = 3;
    run_ranks_with(2, tweak, |comm| {
        let rank = comm.rank();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = wide_step(&vs, 0);
        let opt = nn::Sgd::default().build(&vs, 0.01).unwrap();
        let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
        for step in 0..STEPS {
            let loss = wide_step(dopt.var_store(), step as i64);
            dopt.backward(&loss).unwrap();
            let mut marker = Tensor::zeros([1], (Kind::Float, Device::Cpu));
            engine_allreduce_tensor(dopt.engine(), "marker", &mut marker, ReduceOp::Sum).unwrap();
            dopt.step().unwrap();
        }
        dopt.shutdown().unwrap();
        let subs = submissions(&prefix, rank);
        let marks: Vec<u64> = subs
            .iter()
            .filter(|s| s.0 == "marker")
            .map(|s| s.1)
            .collect();
        let grads: Vec<u64> = subs
            .iter()
            .filter(|s| ["w1", "w2", "w3"].contains(&s.0.as_str()))
            .map(|s| s.1)
            .collect();
        assert_eq!((marks.len(), grads.len()), (STEPS, 3 * STEPS), "{subs:?}");
        (0..STEPS)
            .map(|k| {
                let g = &grads[3 * k..3 * k + 3];
                (g[0], g[2], marks[k])
            })
            .collect()
    })
}

#[test]
fn first_gradient_is_submitted_before_backward_ends() {
    tch::set_num_threads(1);
    for (rank, steps) in overlap_run(true).iter().enumerate() {
        for (k, &(first, last, end)) in steps.iter().enumerate() {
            assert!(
                first < end && first < last,
                "overlap on, rank {rank} step {k}: first gradient at {first} µs, last at \
                 {last} µs, backward ended at {end} µs"
            );
        }
    }
    // The control: without overlap every submission comes after backward.
    for (rank, steps) in overlap_run(false).iter().enumerate() {
        for (k, &(first, _, end)) in steps.iter().enumerate() {
            assert!(
                first > end,
                "overlap off, rank {rank} step {k}: {first} <= {end}"
            );
        }
    }
}

#[test]
fn ranks_submit_gradients_in_backward_order_which_differs_between_ranks() {
    tch::set_num_threads(1);
    let prefix = timeline_prefix("order");
    let tweak = |c: &mut Config| c.timeline = Some(prefix.clone());
    let orders = run_ranks_with(2, tweak, |comm| {
        let rank = comm.rank();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let f = feat_model(&mut vs);
        let opt = sgd().build(&vs, 0.1).unwrap();
        let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
        let (x, y) = batch(0);
        dopt.backward_step(&mse(feat_forward(&f, &x, 1, rank == 1), &y))
            .unwrap();
        dopt.shutdown().unwrap();
        let names: Vec<String> = submissions(&prefix, rank)
            .into_iter()
            .map(|s| s.0)
            .filter(|n| !n.starts_with("kolo.torch/"))
            .collect();
        names
    });
    let pos = |o: &[String], n: &str| o.iter().position(|x| x == n).expect(n);
    for o in &orders {
        assert_eq!(o.len(), 5, "{o:?}"); // w1 b1 w2 b2 spare; never frozen
    }
    // Rank 0: w2's gradient before the first layer's; rank 1: after.
    assert!(pos(&orders[0], "w2") < pos(&orders[0], "w1"), "{orders:?}");
    assert!(pos(&orders[1], "w2") > pos(&orders[1], "w1"), "{orders:?}");
}

/// Bytes rank 0 sent in a job of `steps` training steps on a model of `vars` one-element
/// parameters.
fn bytes_sent(vars: usize, steps: usize) -> u64 {
    let got = run_ranks_with(
        2,
        |_| {},
        |comm| {
            let vs = nn::VarStore::new(Device::Cpu);
            let ps: Vec<Tensor> = (0..vars)
                .map(|i| {
                    vs.root()
                        .var(&format!("p{i:04}"), &[1], nn::Init::Const(1.0))
                })
                .collect();
            let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
            let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
            for _ in 0..steps {
                dopt.backward_step(&Tensor::cat(&ps, 0).square().sum(Kind::Float))
                    .unwrap();
            }
            let (comm, _, _) = dopt.shutdown().unwrap();
            comm.bytes_on_wire().0
        },
    );
    got[0]
}

#[test]
fn a_model_of_more_than_1024_tensors_keeps_the_cached_fast_path() {
    // KOLO_CACHE_CAPACITY is 1024 by default: without room for every gradient, each step
    // would describe the uncached ones to the other rank in full.
    tch::set_num_threads(1);
    let vars = 1500;
    let per_step = (bytes_sent(vars, 12) - bytes_sent(vars, 2)) / 10;
    let gradients = 4 * vars as u64;
    eprintln!("{per_step} bytes sent per step for {gradients} bytes of gradients");
    assert!(
        per_step < 3 * gradients,
        "a step sent {per_step} bytes for {gradients} bytes of gradients"
    );
}

#[test]
fn ranks_missing_different_parameters_do_not_wait_on_each_other() {
    // Rank 0 uses only `a`, rank 1 only `b`: each hook submits one during backward, and
    // the other must be submitted (as zeros) before either rank waits for anything.
    tch::set_num_threads(1);
    let tweak = |c: &mut Config| c.stall_shutdown = Some(std::time::Duration::from_secs(10));
    let got = run_ranks_with(2, tweak, |comm| {
        let rank = comm.rank();
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs.root().var("a", &[4], nn::Init::Const(1.0));
        let b = vs.root().var("b", &[4], nn::Init::Const(1.0));
        let opt = nn::Sgd::default().build(&vs, 1.0).unwrap();
        let mut dopt = DistributedOptimizer::new(comm, vs, opt).unwrap();
        let used = if rank == 0 { &a } else { &b };
        let r = dopt.backward_step(&used.sum(Kind::Float));
        dopt.shutdown().unwrap();
        r.map(|()| {
            (
                Vec::<f32>::try_from(&a).unwrap(),
                Vec::<f32>::try_from(&b).unwrap(),
            )
        })
    });
    for (r, res) in got.into_iter().enumerate() {
        // Each gradient is (1 + 0) / 2.
        let (a, b) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!((a, b), (vec![0.5; 4], vec![0.5; 4]), "rank {r}");
    }
}
