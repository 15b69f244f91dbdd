//! `kolo-bench --fusion resnet50|small`: a training step's gradients, reduced
//! three ways: one blocking allreduce per tensor (in the same order on every
//! rank, as a naive data-parallel loop must), the engine (each rank submits
//! the tensors in its own random order; the engine negotiates and fuses), and
//! one allreduce of a single flat buffer of the same total size (the bound
//! fusion aims at). Averages of float32, as data-parallel SGD does.
//!
//! Modes run in interleaved blocks of steps (noise hits all three alike); a
//! block's time is the slowest rank's, and the step time is the median over
//! blocks of block time / steps. Each engine block starts a new engine whose
//! first step (negotiating every tensor from scratch) is not timed.

use kolo::engine::{Engine, Handle};
use kolo::{Communicator, ReduceOp};
use std::time::Instant;

/// A gradient set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    /// The 161 parameter tensors of ResNet-50 (25.6 M float32 values).
    Resnet50,
    /// 1000 tensors of 4 KiB: biases and norms, the latency-bound case.
    Small,
}

impl Set {
    pub fn parse(s: &str) -> Option<Set> {
        match s {
            "resnet50" => Some(Set::Resnet50),
            "small" => Some(Set::Small),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Set::Resnet50 => "resnet50",
            Set::Small => "small",
        }
    }

    /// (name, element count) of every tensor, in model order.
    pub fn tensors(self) -> Vec<(String, usize)> {
        match self {
            Set::Small => (0..1000).map(|i| (format!("small.{i}"), 1024)).collect(),
            Set::Resnet50 => resnet50(),
        }
    }
}

/// torchvision's ResNet-50: a 7×7 stem, bottleneck stages of [3, 4, 6, 3]
/// blocks at widths [64, 128, 256, 512] (expansion 4, a 1×1 downsample on
/// each stage's first block), batch norms with weight and bias, and a
/// 2048→1000 classifier.
fn resnet50() -> Vec<(String, usize)> {
    let mut t = vec![
        ("conv1.weight".to_string(), 64 * 3 * 7 * 7),
        ("bn1.weight".into(), 64),
        ("bn1.bias".into(), 64),
    ];
    let mut inplanes = 64;
    for (stage, (&blocks, &width)) in [3usize, 4, 6, 3]
        .iter()
        .zip(&[64usize, 128, 256, 512])
        .enumerate()
    {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", stage + 1);
            let out = width * 4;
            let bn = |t: &mut Vec<(String, usize)>, name: &str, c: usize| {
                t.push((format!("{p}.{name}.weight"), c));
                t.push((format!("{p}.{name}.bias"), c));
            };
            t.push((format!("{p}.conv1.weight"), width * inplanes));
            bn(&mut t, "bn1", width);
            t.push((format!("{p}.conv2.weight"), width * width * 9));
            bn(&mut t, "bn2", width);
            t.push((format!("{p}.conv3.weight"), out * width));
            bn(&mut t, "bn3", out);
            if b == 0 {
                t.push((format!("{p}.downsample.0.weight"), out * inplanes));
                t.push((format!("{p}.downsample.1.weight"), out));
                t.push((format!("{p}.downsample.1.bias"), out));
            }
            inplanes = out;
        }
    }
    t.push(("fc.weight".into(), 1000 * 2048));
    t.push(("fc.bias".into(), 1000));
    t
}

/// Result of one mode.
pub struct Mode {
    pub name: &'static str,
    pub step_ms: f64,
    pub busbw: f64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn shuffle(v: &mut [usize], seed: u64) {
    for i in (1..v.len()).rev() {
        let j = (splitmix(seed ^ i as u64) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Slowest rank's seconds for a block.
fn slowest(comm: &Communicator, secs: f64) -> kolo::Result<f64> {
    let mut v = [secs];
    comm.allreduce(&mut v, ReduceOp::Max)?;
    Ok(v[0])
}

/// Values a correct average leaves: every rank starts at rank + 1.
fn wrong(bufs: &[Vec<f32>], n: usize) -> usize {
    let want = (n + 1) as f32 / 2.0;
    bufs.iter()
        .map(|b| b.iter().filter(|&&x| x != want).count())
        .sum()
}

/// Run the benchmark; rank 0 prints. Returns the number of wrong values.
pub fn run(mut comm: Communicator, set: Set, steps: usize, json: bool) -> kolo::Result<usize> {
    let (rank, n) = (comm.rank(), comm.size());
    let tensors = set.tensors();
    let total: usize = tensors.iter().map(|t| t.1).sum();
    let bytes = (total * 4) as f64;
    let fill = |len| vec![(rank + 1) as f32; len];
    let mut grads: Vec<Vec<f32>> = tensors.iter().map(|t| fill(t.1)).collect();
    let mut flat = fill(total);
    let blocks = 4.min(steps).max(1);
    let per_block = steps.div_ceil(blocks).max(1);
    let mut times: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut bad = 0;
    if rank == 0 && !json {
        println!(
            "# kolo-bench --fusion {}: {} tensors, {} float32 values ({:.1} MB), {} ranks, \
             {} blocks of {} steps per mode, ReduceOp avg",
            set.name(),
            tensors.len(),
            total,
            bytes / 1e6,
            n,
            blocks,
            per_block
        );
    }
    // One warm-up block per mode (connections, caches, the engine's first
    // negotiation), then the timed blocks.
    for block in 0..=blocks {
        // Per tensor, blocking, the same order everywhere.
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..per_block {
            for g in grads.iter_mut() {
                comm.allreduce(g, ReduceOp::Avg)?;
            }
        }
        let s = slowest(&comm, t.elapsed().as_secs_f64())?;
        bad += wrong(&grads, n);
        if block > 0 {
            times[0].push(s / per_block as f64);
        }

        // One flat buffer.
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..per_block {
            comm.allreduce(&mut flat, ReduceOp::Avg)?;
        }
        let s = slowest(&comm, t.elapsed().as_secs_f64())?;
        bad += wrong(std::slice::from_ref(&flat), n);
        if block > 0 {
            times[2].push(s / per_block as f64);
        }

        // The engine, each rank in its own order.
        comm.barrier()?;
        let engine = Engine::start(comm)?;
        // A new engine negotiates every tensor once; training pays that on
        // its first step only, so it is not timed.
        let mut t = Instant::now();
        for step in 0..=per_block {
            if step == 1 {
                t = Instant::now();
            }
            let mut order: Vec<usize> = (0..tensors.len()).collect();
            shuffle(
                &mut order,
                (rank as u64) << 40 ^ (block * (per_block + 1) + step) as u64,
            );
            let mut handles: Vec<(usize, Handle<Vec<f32>>)> = Vec::with_capacity(order.len());
            for &i in &order {
                let buf = std::mem::take(&mut grads[i]);
                handles.push((
                    i,
                    engine.allreduce_async(&tensors[i].0, buf, ReduceOp::Avg)?,
                ));
            }
            for (i, h) in handles {
                grads[i] = h.wait()?;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        comm = engine.shutdown()?;
        let s = slowest(&comm, secs)?;
        bad += wrong(&grads, n);
        if block > 0 {
            times[1].push(s / per_block as f64);
        }
    }
    let bus = 2.0 * (n as f64 - 1.0) / n as f64;
    let modes: Vec<Mode> = ["per-tensor", "engine", "flat"]
        .iter()
        .zip(&times)
        .map(|(&name, t)| {
            let step = median(t);
            Mode {
                name,
                step_ms: step * 1e3,
                busbw: if step > 0.0 {
                    bytes / step * bus / 1e9
                } else {
                    0.0
                },
            }
        })
        .collect();
    if rank == 0 {
        for m in &modes {
            if json {
                println!(
                    "{{\"fusion\":\"{}\",\"mode\":\"{}\",\"nranks\":{n},\"tensors\":{},\"bytes\":{},\"step_ms\":{:.3},\"busbw_gbps\":{:.3}}}",
                    set.name(),
                    m.name,
                    tensors.len(),
                    total * 4,
                    m.step_ms,
                    m.busbw
                );
            } else {
                println!(
                    "mode={} step_ms={:.3} busbw={:.3}",
                    m.name, m.step_ms, m.busbw
                );
            }
        }
        if !json {
            println!(
                "# engine/flat step time: {:.2}x   per-tensor/engine: {:.2}x   #wrong: {bad}",
                modes[1].step_ms / modes[2].step_ms,
                modes[0].step_ms / modes[1].step_ms
            );
        }
    }
    Ok(bad)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        l if l % 2 == 1 => s[l / 2],
        l => (s[l / 2 - 1] + s[l / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_has_161_tensors_and_25_557_032_values() {
        let t = Set::Resnet50.tensors();
        assert_eq!(t.len(), 161);
        assert_eq!(t.iter().map(|t| t.1).sum::<usize>(), 25_557_032);
    }

    #[test]
    fn small_is_1000_tensors_of_4_kib() {
        let t = Set::Small.tensors();
        assert_eq!(t.len(), 1000);
        assert!(t.iter().all(|t| t.1 * 4 == 4096));
    }
}
