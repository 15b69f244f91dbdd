//! Training throughput on synthetic data, after Horovod's `pytorch_synthetic_benchmark.py`:
//! every rank trains a model on one fixed random batch through `DistributedOptimizer`, and
//! rank 0 prints images per second per rank and in total.
//!
//!   cargo build --release --features torch --bins --example synthetic_benchmark
//!   target/release/kolorun -np 2 target/release/examples/synthetic_benchmark --model mlp
//!
//! `KOLO_TORCH_OVERLAP=0` turns off the reduction of gradients during backward, for a
//! comparison; `--baseline` (one rank's img/s) adds the scaling efficiency.

use kolo::compress::Compression;
use kolo::torch::tch::{self, nn, nn::ModuleT, nn::OptimizerConfig, Device, Kind, Tensor};
use kolo::torch::DistributedOptimizer;
use kolo::Communicator;
use std::time::Instant;

const USAGE: &str = "\
usage: synthetic_benchmark [options]     (under kolorun, e.g. kolorun -np 2 synthetic_benchmark)
  --model M                 resnet18, resnet50 or mlp (default resnet50)
  --batch-size N            images per rank and batch (default 32)
  --image-size N            height and width of the images (default 224; smaller for CPUs)
  --num-classes N           classes (default 1000)
  --hidden N                mlp: width of its two hidden layers (default 2048)
  --num-warmup-batches N    batches before timing (default 10)
  --num-batches-per-iter N  batches per timed iteration (default 10)
  --num-iters N             timed iterations (default 10)
  --device cpu|cuda         cuda: cuda:(local_rank % devices) (default cpu)
  --compression C           none, fp16, bf16, topk or topk:<density> (default none)
  --threads N               libtorch intra-op threads per rank (default 1)
  --baseline X              one rank's img/s, to print the scaling efficiency";

struct Args {
    model: String,
    batch: i64,
    image: i64,
    classes: i64,
    hidden: i64,
    warmup: usize,
    per_iter: usize,
    iters: usize,
    device: String,
    compression: Compression,
    threads: i32,
    baseline: Option<f64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "resnet50".into(),
        batch: 32,
        image: 224,
        classes: 1000,
        hidden: 2048,
        warmup: 10,
        per_iter: 10,
        iters: 10,
        device: "cpu".into(),
        compression: Compression::None,
        threads: 1,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{name}: bad value {v:?}"))
        }
        match flag.as_str() {
            "--model" => a.model = value()?,
            "--batch-size" => a.batch = num(&flag, value()?)?,
            "--image-size" => a.image = num(&flag, value()?)?,
            "--num-classes" => a.classes = num(&flag, value()?)?,
            "--hidden" => a.hidden = num(&flag, value()?)?,
            "--num-warmup-batches" => a.warmup = num(&flag, value()?)?,
            "--num-batches-per-iter" => a.per_iter = num(&flag, value()?)?,
            "--num-iters" => a.iters = num(&flag, value()?)?,
            "--device" => a.device = value()?,
            "--threads" => a.threads = num(&flag, value()?)?,
            "--baseline" => a.baseline = Some(num(&flag, value()?)?),
            "--compression" => {
                let v = value()?;
                a.compression = Compression::parse(&v).ok_or(format!("--compression: {v:?}"))?;
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if !["resnet18", "resnet50", "mlp"].contains(&a.model.as_str()) {
        return Err(format!(
            "--model: {:?} is not resnet18, resnet50 or mlp",
            a.model
        ));
    }
    if !["cpu", "cuda"].contains(&a.device.as_str()) {
        return Err(format!("--device: {:?} is not cpu or cuda", a.device));
    }
    if a.batch <= 0 || a.image <= 0 || a.classes <= 0 || a.hidden <= 0 || a.threads <= 0 {
        return Err("sizes and --threads must be positive".into());
    }
    if a.per_iter == 0 || a.iters == 0 {
        return Err("--num-batches-per-iter and --num-iters must be positive".into());
    }
    Ok(a)
}

fn model(a: &Args, p: &nn::Path) -> Box<dyn ModuleT> {
    match a.model.as_str() {
        "resnet18" => Box::new(tch::vision::resnet::resnet18(p, a.classes)),
        "resnet50" => Box::new(tch::vision::resnet::resnet50(p, a.classes)),
        _ => {
            let input = 3 * a.image * a.image;
            Box::new(
                nn::seq_t()
                    .add_fn(|x| x.flatten(1, -1))
                    .add(nn::linear(p / "fc1", input, a.hidden, Default::default()))
                    .add_fn(|x| x.relu())
                    .add(nn::linear(
                        p / "fc2",
                        a.hidden,
                        a.hidden,
                        Default::default(),
                    ))
                    .add_fn(|x| x.relu())
                    .add(nn::linear(
                        p / "fc3",
                        a.hidden,
                        a.classes,
                        Default::default(),
                    )),
            )
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(a: &Args) -> kolo::Result<()> {
    let comm = Communicator::from_env()?;
    let (rank, size) = (comm.rank(), comm.size());
    let overlap = comm.config().torch_overlap;
    tch::set_num_threads(a.threads);
    let device = match a.device.as_str() {
        "cuda" => kolo::torch::cuda_device(&comm)?,
        _ => Device::Cpu,
    };
    let vs = nn::VarStore::new(device);
    let net = model(a, &vs.root());
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(Tensor::numel)
        .sum::<usize>() as i64;
    let opt = nn::Sgd::default().build(&vs, 0.01).expect("sgd");
    let mut dopt = DistributedOptimizer::new(comm, vs, opt)?;
    dopt.set_compression(a.compression.clone());
    dopt.broadcast_parameters(0)?;
    tch::manual_seed(rank as i64);
    let x = Tensor::randn([a.batch, 3, a.image, a.image], (Kind::Float, device));
    let y = Tensor::randint(a.classes, [a.batch], (Kind::Int64, device));
    // One batch: forward + backward (gradients go to the engine as they are ready), then
    // the wait for the reduced gradients and the optimizer step; returns the time of the
    // latter, the communication backward did not hide.
    let batch = |dopt: &mut DistributedOptimizer| -> kolo::Result<f64> {
        let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
        dopt.backward(&loss)?;
        let t = Instant::now();
        dopt.step()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    if rank == 0 {
        println!(
            "model {} ({params} parameters), batch {} of {}x{} images, {size} rank(s), \
             device {}, overlap {}",
            a.model, a.batch, a.image, a.image, a.device, overlap as u8
        );
    }
    for _ in 0..a.warmup {
        batch(&mut dopt)?;
    }
    let mut rates = Vec::with_capacity(a.iters);
    let mut step_ms = Vec::with_capacity(a.iters);
    let mut exposed_ms = Vec::with_capacity(a.iters * a.per_iter);
    for i in 0..a.iters {
        let t = Instant::now();
        for _ in 0..a.per_iter {
            exposed_ms.push(batch(&mut dopt)?);
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let secs = t.elapsed().as_secs_f64();
        rates.push((a.batch as usize * a.per_iter) as f64 / secs);
        step_ms.push(secs * 1e3 / a.per_iter as f64);
        if rank == 0 {
            println!("Iter #{i}: {:.1} img/sec per rank", rates[i]);
        }
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
    let ms = median(&mut step_ms);
    if rank == 0 {
        println!("Img/sec per rank: {mean:.1} +-{:.1}", 1.96 * var.sqrt());
        println!(
            "Total img/sec on {size} rank(s): {:.1} +-{:.1}",
            size as f64 * mean,
            size as f64 * 1.96 * var.sqrt()
        );
        println!(
            "median step: {ms:.2} ms, of which waiting for gradients and stepping: {:.2} ms",
            median(&mut exposed_ms)
        );
        if let Some(b) = a.baseline {
            println!("scaling efficiency: {:.3}", mean / b);
        }
    }
    dopt.shutdown()?;
    Ok(())
}

fn main() {
    let a = parse_args().unwrap_or_else(|e| {
        eprintln!("synthetic_benchmark: {e}\n{USAGE}");
        std::process::exit(2)
    });
    if let Err(e) = run(&a) {
        eprintln!("synthetic_benchmark: {e}");
        std::process::exit(1);
    }
}
