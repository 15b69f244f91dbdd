//! Data-parallel training of a small MLP on the 8×8 digits set (1438 training and 359 test
//! images, shipped in the repository) with kolo averaging the gradients: the main job.
//!
//!   cargo build --release --features torch --bins --example train_digits
//!   target/release/kolorun -np 4 target/release/examples/train_digits --epochs 20
//!
//! Every rank builds the model (each from its own seed), rank 0's parameters are broadcast,
//! and each global batch of `--batch-size` images is split across the ranks; each rank's loss
//! is its share of the global batch's mean loss, so the averaged gradient is exactly the one
//! a single process would compute on the whole batch. The gradients are averaged through
//! kolo's engine (`DistributedOptimizer` owns it), each under its variable's name, fused
//! into buffers of up to `--fusion-mb` (`KOLO_FUSION_THRESHOLD`). Rank 0 prints the loss, the test
//! accuracy, the time and the throughput per epoch, and ends with `final_accuracy=<fraction>`.

#[path = "data/digits.rs"]
mod digits;

use kolo::compress::Compression;
use kolo::torch::tch::{self, nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
use kolo::torch::{engine_allreduce_tensor, DistributedOptimizer};
use kolo::{Communicator, Config, ReduceOp};
use std::time::Instant;

const USAGE: &str = "\
usage: train_digits [options]     (run it under kolorun, e.g. kolorun -np 4 train_digits)
  --epochs N          passes over the training set (default 20)
  --batch-size N      global batch, split across the ranks (default 64)
  --lr X              peak learning rate of SGD with momentum 0.9, cosine decay (default 0.05)
  --model mlp|cnn     a small CNN or a 3-layer MLP (default cnn)
  --hidden N          width of the hidden layers (default 128)
  --seed N            seed of the data order and of the model (default 1)
  --device cpu|cuda   where each rank trains (cuda: cuda:(local_rank % devices)) (default cpu)
  --compression C     gradient compression: none, fp16, bf16, topk or topk:<density>
                      (top-k with error feedback; default none)
  --threads N         libtorch intra-op threads per rank (default 1)
  --fusion-mb N       the engine's fusion buffer size in MiB, for the gradients
                      (default: KOLO_FUSION_THRESHOLD, else 64)
  --elastic           elastic training (run under kolorun --min-np A --max-np B): the model,
                      epoch and batch are committed after every batch; ranks may be lost or
                      join, and training goes on from the last commit (CPU; gradients averaged
                      by blocking allreduces; momentum restarts after a membership change)";

struct Args {
    epochs: usize,
    batch: usize,
    lr: f64,
    hidden: i64,
    seed: u64,
    device: String,
    model: String,
    threads: Option<usize>,
    fusion_mb: Option<usize>,
    compression: Compression,
    elastic: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        epochs: 20,
        batch: 64,
        lr: 0.05,
        hidden: 128,
        seed: 1,
        device: "cpu".into(),
        model: "cnn".into(),
        threads: None,
        fusion_mb: None,
        compression: Compression::None,
        elastic: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or(format!("{name} needs a value"))
        };
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{name}: bad value {v:?}"))
        }
        match name.as_str() {
            "--epochs" => a.epochs = num(&name, value()?)?,
            "--batch-size" => a.batch = num(&name, value()?)?,
            "--lr" => a.lr = num(&name, value()?)?,
            "--hidden" => a.hidden = num(&name, value()?)?,
            "--seed" => a.seed = num(&name, value()?)?,
            "--threads" => a.threads = Some(num(&name, value()?)?),
            "--fusion-mb" => a.fusion_mb = Some(num(&name, value()?)?),
            "--device" => {
                a.device = value()?;
                if a.device != "cpu" && a.device != "cuda" {
                    return Err(format!("--device: {:?} is not cpu or cuda", a.device));
                }
            }
            "--model" => {
                a.model = value()?;
                if a.model != "mlp" && a.model != "cnn" {
                    return Err(format!("--model: {:?} is not mlp or cnn", a.model));
                }
            }
            "--elastic" => a.elastic = true,
            "--compression" => {
                let v = value()?;
                a.compression = Compression::parse(&v).ok_or_else(|| {
                    format!("--compression: {v:?} is not none, fp16, bf16, topk or topk:<density>")
                })?;
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.epochs == 0
        || a.batch == 0
        || a.hidden <= 0
        || a.fusion_mb == Some(0)
        || a.threads == Some(0)
    {
        return Err(
            "--epochs, --batch-size, --hidden, --fusion-mb and --threads must be positive".into(),
        );
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return Err("--lr must be a positive number".into());
    }
    Ok(a)
}

/// splitmix64, for a data order that is the same on every rank.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn shuffled(n: usize, seed: u64) -> Vec<i64> {
    let mut v: Vec<i64> = (0..n as i64).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = mix(s);
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

/// Rank `r`'s part of `0..len` split into `n` nearly equal contiguous parts.
fn part(len: usize, r: usize, n: usize) -> std::ops::Range<usize> {
    len * r / n..len * (r + 1) / n
}

fn mlp(p: nn::Path, hidden: i64) -> impl Module {
    let feats = digits::FEATURES as i64;
    nn::seq()
        .add(nn::linear(&p / "fc1", feats, hidden, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "fc2", hidden, hidden, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(
            &p / "fc3",
            hidden,
            digits::CLASSES as i64,
            Default::default(),
        ))
}

/// A small CNN on the 1×8×8 image: two 3×3 convolutions (padding 1), 2×2 max-pool,
/// then a hidden fully connected layer.
fn cnn(p: nn::Path, hidden: i64) -> impl Module {
    let conv = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    nn::seq()
        .add_fn(|x| x.view([-1, 1, 8, 8]))
        .add(nn::conv2d(&p / "conv1", 1, 32, 3, conv))
        .add_fn(|x| x.relu())
        .add(nn::conv2d(&p / "conv2", 32, 64, 3, conv))
        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(
            &p / "fc1",
            64 * 4 * 4,
            hidden,
            Default::default(),
        ))
        .add_fn(|x| x.relu())
        .add(nn::linear(
            &p / "fc2",
            hidden,
            digits::CLASSES as i64,
            Default::default(),
        ))
}

fn to_tensors(s: &digits::Split, device: Device) -> Result<(Tensor, Tensor), tch::TchError> {
    let x = Tensor::f_from_slice(&s.images)?
        .f_reshape([s.len() as i64, digits::FEATURES as i64])?
        .f_to_device(device)?;
    let labels: Vec<i64> = s.labels.iter().map(|&l| i64::from(l)).collect();
    let y = Tensor::f_from_slice(&labels)?.f_to_device(device)?;
    Ok((x, y))
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = Config::from_env()?;
    if let Some(mb) = args.fusion_mb {
        cfg.fusion_threshold = mb << 20;
    }
    let fusion_threshold = cfg.fusion_threshold;
    let comm = Communicator::init(cfg)?;
    let (rank, size) = (comm.rank(), comm.size());
    // One libtorch thread per rank unless asked: its default (every core in each rank)
    // oversubscribes the host when ranks share it, and its OpenMP threads slow down badly
    // when a core is busy with something else.
    let threads = args.threads.unwrap_or(1);
    tch::set_num_threads(threads as i32);
    let device = match args.device.as_str() {
        "cuda" => kolo::torch::cuda_device(&comm)?,
        _ => Device::Cpu,
    };

    let (train, test) = digits::train_test();
    let (xtr, ytr) = to_tensors(&train, device)?;
    let (xte, yte) = to_tensors(&test, device)?;

    // Each rank initialises differently; broadcast_parameters makes them equal.
    tch::manual_seed(args.seed as i64 + rank as i64);
    let vs = nn::VarStore::new(device);
    let net: Box<dyn Module> = match args.model.as_str() {
        "cnn" => Box::new(cnn(vs.root(), args.hidden)),
        _ => Box::new(mlp(vs.root(), args.hidden)),
    };
    let nparams: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, args.lr)?;
    // From here on the optimizer's engine owns the communicator: collectives go through it.
    let mut dopt = DistributedOptimizer::new(comm, vs, opt)?;
    dopt.set_compression(args.compression.clone());
    dopt.broadcast_parameters(0)?;

    if rank == 0 {
        println!(
            "train_digits: {size} rank(s), device {}, {} ({nparams} parameters), \
             {} train / {} test images, global batch {}, SGD lr {} (cosine decay) momentum 0.9, \
             {} epochs, compression {}, {threads} thread(s) per rank, gradients through the \
             engine (fusion buffers of {} KiB)",
            args.device,
            match args.model.as_str() {
                "cnn" => format!("CNN conv32-conv64-pool-fc{}", args.hidden),
                _ => format!("MLP 64-{h}-{h}-10", h = args.hidden),
            },
            train.len(),
            test.len(),
            args.batch,
            args.lr,
            args.epochs,
            args.compression,
            fusion_threshold >> 10,
        );
    }

    let test_part = part(test.len(), rank, size);
    let xte_mine = xte.f_narrow(0, test_part.start as i64, test_part.len() as i64)?;
    let yte_mine = yte.f_narrow(0, test_part.start as i64, test_part.len() as i64)?;
    let mut accuracy = 0.0;
    let mut times = Vec::new();
    for epoch in 0..args.epochs {
        // Cosine learning-rate decay over the run, so the last epochs settle.
        let lr = args.lr
            * 0.5
            * (1.0 + (std::f64::consts::PI * epoch as f64 / args.epochs as f64).cos());
        dopt.optimizer_mut().set_lr(lr);
        // Start the clock together (a one-element allreduce as a barrier).
        let mut sync = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        engine_allreduce_tensor(dopt.engine(), "epoch_start", &mut sync, ReduceOp::Sum)?;
        let t0 = Instant::now();
        let order = shuffled(train.len(), mix(args.seed ^ ((epoch as u64) << 32)));
        let mut loss_sum = 0.0f64;
        for batch in order.chunks(args.batch) {
            let mine = &batch[part(batch.len(), rank, size)];
            let idx = Tensor::f_from_slice(mine)?.f_to_device(device)?;
            let x = xtr.f_index_select(0, &idx)?;
            let y = ytr.f_index_select(0, &idx)?;
            // Sum over this rank's images / global batch size * ranks: the average over
            // ranks is the mean over the global batch.
            let sum = net.forward(&x).f_cross_entropy_loss::<Tensor>(
                &y,
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            )?;
            loss_sum += sum.f_double_value(&[])?;
            let loss = sum.f_mul_scalar(size as f64 / batch.len() as f64)?;
            dopt.backward_step(&loss)?;
        }
        let train_time = t0.elapsed().as_secs_f64();
        // Test accuracy on each rank's part of the test set, summed across ranks.
        let correct = tch::no_grad(|| {
            net.forward(&xte_mine)
                .f_argmax(-1, false)
                .and_then(|p| p.f_eq_tensor(&yte_mine))
                .and_then(|c| c.f_sum(Kind::Double))
                .and_then(|c| c.f_double_value(&[]))
        })?;
        let mut stats = Tensor::from_slice(&[loss_sum, correct]);
        engine_allreduce_tensor(dopt.engine(), "epoch_stats", &mut stats, ReduceOp::Sum)?;
        let loss = stats.f_double_value(&[0])? / train.len() as f64;
        accuracy = stats.f_double_value(&[1])? / test.len() as f64;
        times.push(train_time);
        if rank == 0 {
            println!(
                "epoch {:>3}/{}  loss {loss:.4}  test_acc {accuracy:.4}  time {:.3} s  {:.0} img/s",
                epoch + 1,
                args.epochs,
                train_time,
                train.len() as f64 / train_time
            );
        }
    }
    if !dopt.parameters_in_sync()? {
        return Err("parameters differ across ranks after training".into());
    }
    if rank == 0 {
        // The first epoch includes warm-up (allocations, connections), so leave it out when
        // there are others.
        let steady = if times.len() > 1 {
            &times[1..]
        } else {
            &times[..]
        };
        let mean = steady.iter().sum::<f64>() / steady.len() as f64;
        let mut sorted = steady.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        println!(
            "time per epoch: median {median:.3} s ({:.0} img/s), mean {mean:.3} s, over epochs {}..{}; \
             parameters in sync on all ranks",
            train.len() as f64 / median,
            times.len() - steady.len() + 1,
            times.len(),
        );
        println!("final_accuracy={accuracy:.4}");
    }
    // Every rank stops the engine together and gets the communicator back.
    let (_comm, _vs, _opt) = dopt.shutdown()?;
    Ok(())
}

/// `--elastic`: the same model, data order and loss under `kolo::elastic::run`. The state
/// (parameters, epoch, batch) is committed after every batch; after a membership change
/// every rank restores the last commit, new ranks receive it, and the batch is split over
/// the ranks of the new group.
fn run_elastic(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    use kolo::elastic::{self, State};
    tch::set_num_threads(args.threads.unwrap_or(1) as i32);
    let device = Device::Cpu;
    let (train, test) = digits::train_test();
    let (xtr, ytr) = to_tensors(&train, device)?;
    let (xte, yte) = to_tensors(&test, device)?;
    tch::manual_seed(args.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let net: Box<dyn Module> = match args.model.as_str() {
        "cnn" => Box::new(cnn(vs.root(), args.hidden)),
        _ => Box::new(mlp(vs.root(), args.hidden)),
    };
    let mut state = State::new();
    state.put_var_store("model", &vs)?;
    let opts = elastic::Options::from_env()?;
    let started = Instant::now();
    let accuracy = elastic::run_with(&opts, &mut state, |comm, st| {
        let (rank, size) = (comm.rank(), comm.size());
        st.load_var_store("model", &mut vs)?;
        let terr = |e: tch::TchError| kolo::Error::InvalidArgument(e.to_string());
        let mut opt = nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(&vs, args.lr)
        .map_err(terr)?;
        if rank == 0 {
            println!(
                "train_digits --elastic: epoch {} of membership (members {:?}), {size} rank(s), resuming at epoch {} batch {}, {:.1} s since start",
                comm.epoch(),
                comm.members().iter().map(|m| m.id).collect::<Vec<_>>(),
                st.counter("epoch") + 1,
                st.counter("batch"),
                started.elapsed().as_secs_f64()
            );
        }
        let evaluate = |comm: &elastic::Comm| -> kolo::Result<f64> {
            let p = part(test.len(), comm.rank(), comm.size());
            let correct = tch::no_grad(|| {
                net.forward(&xte.narrow(0, p.start as i64, p.len() as i64))
                    .f_argmax(-1, false)
                    .and_then(|y| y.f_eq_tensor(&yte.narrow(0, p.start as i64, p.len() as i64)))
                    .and_then(|c| c.f_sum(Kind::Double))
                    .and_then(|c| c.f_double_value(&[]))
            })
            .map_err(terr)?;
            let mut c = [correct];
            comm.allreduce(&mut c, ReduceOp::Sum)?;
            Ok(c[0] / test.len() as f64)
        };
        while (st.counter("epoch") as usize) < args.epochs {
            let epoch = st.counter("epoch") as usize;
            let lr = args.lr
                * 0.5
                * (1.0 + (std::f64::consts::PI * epoch as f64 / args.epochs as f64).cos());
            opt.set_lr(lr);
            let order = shuffled(train.len(), mix(args.seed ^ ((epoch as u64) << 32)));
            let batches: Vec<&[i64]> = order.chunks(args.batch).collect();
            let t0 = Instant::now();
            while (st.counter("batch") as usize) < batches.len() {
                let b = st.counter("batch") as usize;
                let batch = batches[b];
                let mine = &batch[part(batch.len(), rank, size)];
                let idx = Tensor::from_slice(mine);
                let (x, y) = (xtr.index_select(0, &idx), ytr.index_select(0, &idx));
                let loss = net
                    .forward(&x)
                    .f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Sum, -100, 0.0)
                    .and_then(|l| l.f_mul_scalar(size as f64 / batch.len() as f64))
                    .map_err(terr)?;
                opt.zero_grad();
                loss.backward();
                for v in vs.trainable_variables() {
                    let mut g = v.grad();
                    kolo::torch::allreduce_tensor(comm, &mut g, ReduceOp::Avg)?;
                }
                opt.step();
                st.set_counter("batch", b as i64 + 1);
                st.set_counter("step", st.counter("step") + 1);
                st.put_var_store("model", &vs)?;
                st.commit(comm)?;
            }
            let acc = evaluate(comm)?;
            if rank == 0 {
                println!(
                    "epoch {:>3}/{}  test_acc {acc:.4}  ranks {size}  time {:.3} s",
                    epoch + 1,
                    args.epochs,
                    t0.elapsed().as_secs_f64()
                );
            }
            st.set_counter("epoch", epoch as i64 + 1);
            st.set_counter("batch", 0);
            st.commit(comm)?;
        }
        let acc = evaluate(comm)?;
        Ok((acc, rank))
    })?;
    if accuracy.1 == 0 {
        println!("final_accuracy={:.4}", accuracy.0);
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("train_digits: {e} (--help lists the flags)");
            std::process::exit(2);
        }
    };
    let res = if args.elastic {
        run_elastic(args)
    } else {
        run(args)
    };
    if let Err(e) = res {
        eprintln!("train_digits: {e}");
        std::process::exit(1);
    }
}
