//! Convergence with compression, in pure Rust: a one-hidden-layer MLP
//! (forward and backward written out here) trained data-parallel with plain
//! SGD on 4 ranks (threads over loopback TCP) on the 8×8 digits set, its
//! parameters one flat tensor (one bucket) allreduced with `Avg` every step.
//!
//! fp16 and top-k 1% with error feedback must reach a final training loss
//! within 1.5× of the uncompressed run and a test accuracy within 1.5 points;
//! the same top-k run without error feedback must not (so the test can tell).

mod common;

#[path = "../examples/data/digits.rs"]
mod digits;

use common::{mix, run_ranks};
use digits::{Split, CLASSES, FEATURES};
use kolo::compress::{CompressState, Compression, TopKConfig};
use kolo::ReduceOp;

const HIDDEN: usize = 32;
const RANKS: usize = 4;
/// Images per rank per step (global batch 4 × 16).
const BATCH: usize = 16;
const STEPS: usize = 1200;
const LR: f32 = 0.5;

// Offsets of the parameters in the flat vector.
const W1: usize = 0;
const B1: usize = W1 + FEATURES * HIDDEN;
const W2: usize = B1 + HIDDEN;
const B2: usize = W2 + HIDDEN * CLASSES;
const PARAMS: usize = B2 + CLASSES;

/// Deterministic uniform in [-1, 1).
fn unif(seed: u64) -> f32 {
    (mix(seed) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn init() -> Vec<f32> {
    let mut p = vec![0f32; PARAMS];
    let a1 = (6.0 / (FEATURES + HIDDEN) as f32).sqrt();
    let a2 = (6.0 / (HIDDEN + CLASSES) as f32).sqrt();
    for (i, w) in p[W1..B1].iter_mut().enumerate() {
        *w = a1 * unif(0x1000 + i as u64);
    }
    for (i, w) in p[W2..B2].iter_mut().enumerate() {
        *w = a2 * unif(0x2000_0000 + i as u64);
    }
    p
}

/// Hidden activations (tanh) and class probabilities of one image.
fn forward(p: &[f32], x: &[f32], h: &mut [f32; HIDDEN], prob: &mut [f32; CLASSES]) {
    for (j, hj) in h.iter_mut().enumerate() {
        let mut s = p[B1 + j];
        for (i, &xi) in x.iter().enumerate() {
            s += xi * p[W1 + i * HIDDEN + j];
        }
        *hj = s.tanh();
    }
    let mut max = f32::NEG_INFINITY;
    for (c, pc) in prob.iter_mut().enumerate() {
        let mut s = p[B2 + c];
        for (j, &hj) in h.iter().enumerate() {
            s += hj * p[W2 + j * CLASSES + c];
        }
        *pc = s;
        max = max.max(s);
    }
    let mut z = 0.0;
    for pc in prob.iter_mut() {
        *pc = (*pc - max).exp();
        z += *pc;
    }
    prob.iter_mut().for_each(|pc| *pc /= z);
}

/// Mean cross-entropy gradient over `batch` (indices into `d`) into `g`.
fn gradient(p: &[f32], d: &Split, batch: &[usize], g: &mut [f32]) {
    g.fill(0.0);
    let (mut h, mut prob) = ([0f32; HIDDEN], [0f32; CLASSES]);
    let scale = 1.0 / batch.len() as f32;
    for &n in batch {
        let x = d.image(n);
        forward(p, x, &mut h, &mut prob);
        // dL/dlogits = prob - onehot
        prob[d.labels[n] as usize] -= 1.0;
        let mut dh = [0f32; HIDDEN];
        for (c, &dz) in prob.iter().enumerate() {
            let dz = dz * scale;
            g[B2 + c] += dz;
            for j in 0..HIDDEN {
                g[W2 + j * CLASSES + c] += h[j] * dz;
                dh[j] += p[W2 + j * CLASSES + c] * dz;
            }
        }
        for j in 0..HIDDEN {
            let da = dh[j] * (1.0 - h[j] * h[j]);
            g[B1 + j] += da;
            for (i, &xi) in x.iter().enumerate() {
                g[W1 + i * HIDDEN + j] += xi * da;
            }
        }
    }
}

/// Mean loss and accuracy (%) over a whole split, in f64.
fn evaluate(p: &[f32], d: &Split) -> (f64, f64) {
    let (mut h, mut prob) = ([0f32; HIDDEN], [0f32; CLASSES]);
    let (mut loss, mut right) = (0f64, 0usize);
    for n in 0..d.len() {
        forward(p, d.image(n), &mut h, &mut prob);
        let y = d.labels[n] as usize;
        loss -= (prob[y].max(1e-30) as f64).ln();
        let best = (0..CLASSES)
            .max_by(|&a, &b| prob[a].total_cmp(&prob[b]))
            .unwrap();
        right += usize::from(best == y);
    }
    (loss / d.len() as f64, 100.0 * right as f64 / d.len() as f64)
}

struct Outcome {
    loss: f64,
    acc: f64,
}

/// Train on 4 ranks; each rank holds every 4th training image and draws its
/// batches from a per-epoch shuffle of its shard.
fn train(label: &str, c: &Compression) -> Outcome {
    let (train, test) = digits::train_test();
    let finals = run_ranks(RANKS, |comm| {
        let r = comm.rank();
        let shard: Vec<usize> = (r..train.len()).step_by(RANKS).collect();
        let mut order = shard.clone();
        let mut p = init();
        let mut g = vec![0f32; PARAMS];
        let mut state = CompressState::new();
        let mut pos = order.len();
        let mut epoch = 0u64;
        for _ in 0..STEPS {
            let mut batch = Vec::with_capacity(BATCH);
            while batch.len() < BATCH {
                if pos == order.len() {
                    // Fisher-Yates with a per-(rank, epoch) seed.
                    for i in (1..order.len()).rev() {
                        let j = (mix(epoch << 32 ^ (r as u64) << 48 ^ i as u64) % (i as u64 + 1))
                            as usize;
                        order.swap(i, j);
                    }
                    epoch += 1;
                    pos = 0;
                }
                batch.push(order[pos]);
                pos += 1;
            }
            gradient(&p, &train, &batch, &mut g);
            let stats = comm
                .allreduce_compressed(&mut g, ReduceOp::Avg, c, &mut state)
                .unwrap();
            assert!(!stats.non_finite, "rank {r}: non-finite gradient");
            for (w, &d) in p.iter_mut().zip(&g) {
                *w -= LR * d;
            }
        }
        p
    });
    for (r, p) in finals.iter().enumerate() {
        assert!(
            p.iter()
                .zip(&finals[0])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{c}: rank {r}'s parameters differ from rank 0's"
        );
    }
    let (loss, _) = evaluate(&finals[0], &train);
    let (_, acc) = evaluate(&finals[0], &test);
    eprintln!("{label:>24}: final training loss {loss:.4}, test accuracy {acc:.2}%");
    Outcome { loss, acc }
}

fn within(o: &Outcome, dense: &Outcome) -> bool {
    o.loss <= 1.5 * dense.loss && o.acc >= dense.acc - 1.5
}

#[test]
fn compressed_training_matches_dense_and_error_feedback_matters() {
    let topk = TopKConfig::default(); // density 0.01, sampled selection, error feedback
    let dense = train("dense", &Compression::None);
    let fp16 = train("fp16", &Compression::Fp16);
    let ef = train("top-k 1% + error feedback", &Compression::TopK(topk));
    let no_ef = train(
        "top-k 1%, no feedback",
        &Compression::TopK(TopKConfig {
            error_feedback: false,
            ..topk
        }),
    );
    assert!(dense.acc > 90.0, "the dense run itself did not learn");
    assert!(
        within(&fp16, &dense),
        "fp16: loss {:.4} acc {:.2} vs dense {:.4} {:.2}",
        fp16.loss,
        fp16.acc,
        dense.loss,
        dense.acc
    );
    assert!(
        within(&ef, &dense),
        "top-k 1% with error feedback: loss {:.4} acc {:.2} vs dense {:.4} {:.2}",
        ef.loss,
        ef.acc,
        dense.loss,
        dense.acc
    );
    assert!(
        !within(&no_ef, &dense),
        "top-k 1% without error feedback came within the bound (loss {:.4} acc {:.2} vs \
         dense {:.4} {:.2}): the test cannot tell",
        no_ef.loss,
        no_ef.acc,
        dense.loss,
        dense.acc
    );
}
