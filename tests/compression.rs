//! Gradient compression (`Communicator::allreduce_compressed`) against
//! references written here: fp16/bf16 error bounds, overflow protection and
//! bitwise equality across ranks for every algorithm and N = 1..6; top-k
//! selection against a sort, sampled selection counts on three
//! distributions, error-feedback conservation, the compressed sum against a
//! serial one, and bytes at the socket against the cost model.

mod common;

use common::{fingerprint, mix, run_ranks, run_ranks_with};
use half::f16;
use kolo::algo::cost::Algo;
use kolo::compress::{
    dense_ring_bytes, topk, CompressState, Compression, Prescale, Selection, TopKConfig,
};
use kolo::ReduceOp;

/// Uniform in [-1, 1) from a seed.
fn unif(seed: u64) -> f64 {
    (mix(seed) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Rank `r`'s value at `i`: a gradient-like spread of magnitudes (1e-4..10).
fn grad(seed: u64, r: usize, i: usize) -> f32 {
    let u = unif(seed ^ (r as u64) << 40 ^ i as u64);
    let e = (mix(seed ^ 0x77 ^ (r as u64) << 40 ^ i as u64) % 6) as i32 - 4;
    (u * 10f64.powi(e)) as f32
}

// ---------------------------------------------------------------------------
// fp16 / bf16

/// Unit roundoff and smallest subnormal step of the wire format.
fn precision(c: &Compression) -> (f64, f64) {
    match c {
        Compression::Fp16 => (2f64.powi(-11), 2f64.powi(-24)),
        _ => (2f64.powi(-8), 2f64.powi(-133)),
    }
}

#[test]
fn half_results_are_within_precision_and_bitwise_equal_for_n_1_to_6() {
    for c in [Compression::Fp16, Compression::Bf16] {
        let (u, tiny) = precision(&c);
        for n in 1..=6usize {
            let counts = [0usize, 1, n + 1, 1009, 100_003];
            let prints = run_ranks(n, |comm| {
                let r = comm.rank();
                let mut prints = Vec::new();
                for op in [ReduceOp::Sum, ReduceOp::Avg] {
                    for (k, &count) in counts.iter().enumerate() {
                        let seed = (k as u64) << 8 ^ op as u64;
                        let mut buf: Vec<f32> = (0..count).map(|i| grad(seed, r, i)).collect();
                        let mut st = CompressState::new();
                        let s = comm
                            .allreduce_compressed(&mut buf, op, &c, &mut st)
                            .unwrap();
                        assert!(!s.non_finite);
                        for (i, &got) in buf.iter().enumerate() {
                            let vals: Vec<f64> = (0..n).map(|q| grad(seed, q, i) as f64).collect();
                            let mut exact: f64 = vals.iter().sum();
                            let mut mag: f64 = vals.iter().map(|v| v.abs()).sum();
                            if op == ReduceOp::Avg {
                                exact /= n as f64;
                                mag /= n as f64;
                            }
                            // One rounding per hop (at most n), each within u of a
                            // partial sum bounded by the sum of magnitudes.
                            let bound = n as f64 * (u * mag + tiny) * 1.0001;
                            assert!(
                                (got as f64 - exact).abs() <= bound,
                                "{c} {op} n={n} count={count} rank={r} i={i}: got {got}, \
                                 exact {exact}, bound {bound}"
                            );
                        }
                        prints.push(fingerprint(&buf));
                    }
                }
                prints
            });
            for (r, p) in prints.iter().enumerate() {
                assert_eq!(p, &prints[0], "{c} n={n}: rank {r} differs from rank 0");
            }
        }
    }
}

#[test]
fn half_results_are_bitwise_equal_for_every_algorithm() {
    for algo in Algo::ALL {
        for n in [2usize, 3, 5, 6] {
            for c in [Compression::Fp16, Compression::Bf16] {
                let prints = run_ranks_with(
                    n,
                    |cfg| {
                        cfg.algo = Some(algo);
                        cfg.segment_bytes = 4096; // several segments and pipeline steps
                    },
                    |comm| {
                        let r = comm.rank();
                        let mut out = Vec::new();
                        for op in ReduceOp::ALL {
                            let mut buf: Vec<f32> = (0..20_011).map(|i| grad(9, r, i)).collect();
                            let mut st = CompressState::new();
                            comm.allreduce_compressed(&mut buf, op, &c, &mut st)
                                .unwrap();
                            out.push(fingerprint(&buf));
                        }
                        out
                    },
                );
                for (r, p) in prints.iter().enumerate() {
                    assert_eq!(p, &prints[0], "{} {c} n={n}: rank {r} differs", algo.name());
                }
            }
        }
    }
}

#[test]
fn prescaling_prevents_fp16_overflow() {
    for n in 2..=6usize {
        let res = run_ranks(n, |comm| {
            let big = vec![60000f32; 4096];
            // Avg pre-scales by default: the sum of N×60000 never exceeds 65504.
            let mut a = big.clone();
            let sa = comm
                .allreduce_compressed(
                    &mut a,
                    ReduceOp::Avg,
                    &Compression::Fp16,
                    &mut CompressState::new(),
                )
                .unwrap();
            // Sum with pre-scaling on: divided first, multiplied back in f32.
            let mut st = CompressState::new();
            st.prescale = Prescale::On;
            let mut s = big.clone();
            let ss = comm
                .allreduce_compressed(&mut s, ReduceOp::Sum, &Compression::Fp16, &mut st)
                .unwrap();
            // Without it the wire format overflows, and the stats say so.
            let mut st = CompressState::new();
            st.prescale = Prescale::Off;
            let mut o = big.clone();
            let so = comm
                .allreduce_compressed(&mut o, ReduceOp::Avg, &Compression::Fp16, &mut st)
                .unwrap();
            (a, sa.non_finite, s, ss.non_finite, o, so.non_finite)
        });
        for (a, fa, s, fs, o, fo) in res {
            let want_avg = 60000.0;
            let want_sum = 60000.0 * n as f64;
            assert!(!fa && !fs, "n={n}: flagged non-finite with pre-scaling");
            assert!(a
                .iter()
                .all(|&x| ((x as f64 - want_avg) / want_avg).abs() < 2e-3));
            assert!(s
                .iter()
                .all(|&x| ((x as f64 - want_sum) / want_sum).abs() < 2e-3));
            assert!(
                fo && o.iter().all(|x| x.is_infinite()),
                "n={n}: no overflow without it"
            );
        }
    }
}

#[test]
fn non_finite_inputs_are_reported_on_every_rank() {
    for c in [
        Compression::None,
        Compression::Fp16,
        Compression::Bf16,
        Compression::TopK(TopKConfig::default()),
    ] {
        let flags = run_ranks(3, |comm| {
            let mut buf: Vec<f32> = (0..50_000).map(|i| grad(3, comm.rank(), i)).collect();
            if comm.rank() == 1 {
                buf[777] = f32::NAN;
            }
            let s = comm
                .allreduce_compressed(&mut buf, ReduceOp::Sum, &c, &mut CompressState::new())
                .unwrap();
            (s.non_finite, buf[777].is_nan())
        });
        assert!(flags.iter().all(|&(f, nan)| f && nan), "{c}: {flags:?}");
    }
}

// ---------------------------------------------------------------------------
// Top-k selection

/// Sort-based reference: indices of the k largest |c| (ties to the lower index).
fn reference_topk(c: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..c.len()).collect();
    idx.sort_by(|&a, &b| c[b].abs().total_cmp(&c[a].abs()).then(a.cmp(&b)));
    let mut out: Vec<u32> = idx[..k.min(c.len())].iter().map(|&i| i as u32).collect();
    out.sort_unstable();
    out
}

#[test]
fn exact_selection_matches_a_sort() {
    for case in 0..300u64 {
        let n = (mix(case) % 3000) as usize;
        // Few distinct values so ties are common; signs and zeros mixed in.
        let levels = 1 + mix(case ^ 1) % 50;
        let c: Vec<f32> = (0..n)
            .map(|i| {
                let h = mix(case << 32 ^ i as u64);
                let v = (h % levels) as f32 * 0.25;
                if h >> 63 == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        for k in [0, 1, n / 100, n / 3, n.saturating_sub(1), n, n + 5] {
            assert_eq!(
                topk::select_exact(&c, k),
                reference_topk(&c, k),
                "case {case} n={n} k={k}"
            );
        }
    }
}

/// Standard normal and Laplace samples by inverse transforms.
fn gaussian(seed: u64) -> f32 {
    let u1 = (unif(seed) + 1.0) / 2.0 + 1e-300;
    let u2 = unif(seed ^ 0xabcdef);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::PI * u2).cos()) as f32
}

fn laplace(seed: u64) -> f32 {
    let u = unif(seed) * 0.5;
    (-u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32
}

#[test]
fn sampled_selection_lands_in_range_on_three_distributions() {
    let n = 1_000_000;
    type Dist = fn(u64) -> f32;
    let dists: [(&str, Dist); 3] = [
        ("uniform", |s| unif(s) as f32),
        ("gaussian", gaussian),
        ("laplace", laplace),
    ];
    for (name, f) in dists {
        let c: Vec<f32> = (0..n as u64).map(|i| f(i * 0x9e37 + 17)).collect();
        for density in [0.001, 0.01, 0.1] {
            let k = (density * n as f64).ceil() as usize;
            for seed in 0..3 {
                let sel = topk::select_sampled(&c, k, seed);
                let got = sel.len() as f64;
                assert!(
                    got >= 0.8 * k as f64 && got <= 1.3 * k as f64,
                    "{name} density={density} seed={seed}: {got} of k={k}"
                );
                assert!(sel.windows(2).all(|w| w[0] < w[1]), "not ascending");
                // A top set: nothing left out is larger than anything selected.
                let mut chosen = vec![false; n];
                sel.iter().for_each(|&i| chosen[i as usize] = true);
                let min_in = sel
                    .iter()
                    .map(|&i| c[i as usize].abs())
                    .fold(f32::MAX, f32::min);
                let max_out = (0..n)
                    .filter(|&i| !chosen[i])
                    .map(|i| c[i].abs())
                    .fold(0f32, f32::max);
                assert!(
                    min_in >= max_out,
                    "{name} density={density}: not the largest"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Error feedback

#[test]
fn error_feedback_conserves_the_gradient_sum() {
    let n = 10_000;
    for cfg in [
        TopKConfig::default(),
        TopKConfig {
            half_values: true,
            ..TopKConfig::default()
        },
        TopKConfig {
            selection: Selection::Exact,
            density: 0.003,
            ..TopKConfig::default()
        },
    ] {
        let mut st = CompressState::new();
        let mut sent = vec![0f64; n];
        let mut total = vec![0f64; n];
        let mut mag = vec![0f64; n];
        for step in 0..300u64 {
            let g: Vec<f32> = (0..n).map(|i| grad(step, 0, i)).collect();
            for i in 0..n {
                total[i] += g[i] as f64;
                mag[i] += g[i].abs() as f64;
            }
            let k = cfg.k(n, st.step());
            let sp = topk::sparsify(&cfg, &mut st, &g, k).unwrap();
            assert!(sp.indices.len() >= k * 4 / 5 && sp.indices.len() <= k * 13 / 10);
            for (&i, &v) in sp.indices.iter().zip(&sp.values) {
                sent[i as usize] += v as f64;
            }
        }
        let res = st.residual();
        for i in 0..n {
            let lhs = sent[i] + res[i] as f64;
            // Each of 300 additions into the f32 residual rounds once.
            let tol = 300.0 * f32::EPSILON as f64 * mag[i] + 1e-30;
            assert!(
                (lhs - total[i]).abs() <= tol,
                "{cfg:?} i={i}: sent + residual = {lhs}, sum of gradients {}",
                total[i]
            );
        }
    }
}

#[test]
fn without_error_feedback_nothing_is_kept() {
    let cfg = TopKConfig {
        error_feedback: false,
        ..TopKConfig::default()
    };
    let mut st = CompressState::new();
    let g: Vec<f32> = (0..5000).map(|i| grad(1, 0, i)).collect();
    topk::sparsify(&cfg, &mut st, &g, 50).unwrap();
    assert!(st.residual().is_empty());
}

// ---------------------------------------------------------------------------
// Compressed allreduce against a serial reference

/// Reference error feedback and exact top-k for rank `r`, independent of kolo.
struct RefRank {
    residual: Vec<f32>,
}

impl RefRank {
    fn step(&mut self, g: &[f32], k: usize, half: bool) -> Vec<(usize, f32)> {
        for (r, &x) in self.residual.iter_mut().zip(g) {
            *r += x;
        }
        let sel = reference_topk(&self.residual, k);
        sel.iter()
            .map(|&i| {
                let i = i as usize;
                let x = self.residual[i];
                let v = if half { f16::from_f32(x).to_f32() } else { x };
                self.residual[i] = x - v;
                (i, v)
            })
            .collect()
    }
}

#[test]
fn topk_allreduce_equals_the_serial_sum_of_contributions() {
    let count = 30_000;
    for n in [2usize, 3, 4, 5] {
        for half in [false, true] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let cfg = TopKConfig {
                    selection: Selection::Exact,
                    half_values: half,
                    ..TopKConfig::default()
                };
                let k = cfg.k(count, 0);
                let outs = run_ranks(n, |comm| {
                    let r = comm.rank();
                    let mut st = CompressState::new();
                    let mut refs: Vec<RefRank> = (0..n)
                        .map(|_| RefRank {
                            residual: vec![0.0; count],
                        })
                        .collect();
                    for step in 0..5u64 {
                        let mut buf: Vec<f32> = (0..count).map(|i| grad(step, r, i)).collect();
                        let s = comm
                            .allreduce_compressed(&mut buf, op, &Compression::TopK(cfg), &mut st)
                            .unwrap();
                        assert!(!s.fell_back_to_dense);
                        assert_eq!((s.nnz, s.nnz_total), (k, k * n));
                        // Serial: every rank's contribution, summed in rank order.
                        let mut want = vec![0f32; count];
                        for (q, rr) in refs.iter_mut().enumerate() {
                            let g: Vec<f32> = (0..count).map(|i| grad(step, q, i)).collect();
                            for (i, v) in rr.step(&g, k, half) {
                                want[i] += v;
                            }
                        }
                        if op == ReduceOp::Avg {
                            want.iter_mut().for_each(|x| *x /= n as f32);
                        }
                        let bad = buf
                            .iter()
                            .zip(&want)
                            .position(|(a, b)| a.to_bits() != b.to_bits());
                        assert!(
                            bad.is_none(),
                            "n={n} half={half} {op} step {step} rank {r}: element {bad:?}"
                        );
                    }
                });
                assert_eq!(outs.len(), n);
            }
        }
    }
}

#[test]
fn sampled_topk_is_bitwise_equal_across_ranks_and_falls_back_when_small() {
    let prints = run_ranks(4, |comm| {
        let r = comm.rank();
        let mut st = CompressState::new();
        let mut small = CompressState::new();
        let c = Compression::TopK(TopKConfig::default());
        let mut out = Vec::new();
        for step in 0..4u64 {
            let mut buf: Vec<f32> = (0..200_000).map(|i| grad(step, r, i)).collect();
            let s = comm
                .allreduce_compressed(&mut buf, ReduceOp::Avg, &c, &mut st)
                .unwrap();
            assert!(!s.fell_back_to_dense);
            out.push(fingerprint(&buf));
            // Below min_numel: dense, and exactly the plain allreduce.
            let mut a: Vec<f32> = (0..1000).map(|i| grad(step, r, i)).collect();
            let mut b = a.clone();
            let s = comm
                .allreduce_compressed(&mut a, ReduceOp::Sum, &c, &mut small)
                .unwrap();
            assert!(s.fell_back_to_dense && s.nnz == 1000);
            comm.allreduce(&mut b, ReduceOp::Sum).unwrap();
            assert_eq!(fingerprint(&a), fingerprint(&b));
        }
        out
    });
    for (r, p) in prints.iter().enumerate() {
        assert_eq!(p, &prints[0], "rank {r} differs");
    }
}

#[test]
fn dense_fallback_sends_the_residual_and_clears_it() {
    // A sparse step leaves a residual; a step that goes dense (here a denser
    // config, as at the start of a warm-up) must carry it and clear it.
    let outs = run_ranks(2, |comm| {
        let r = comm.rank();
        let sparse = TopKConfig {
            selection: Selection::Exact,
            ..TopKConfig::default()
        };
        let dense_cfg = TopKConfig {
            density: 0.9,
            ..sparse
        };
        let mut st = CompressState::new();
        let g = |s: u64| -> Vec<f32> { (0..4096).map(|i| grad(s, r, i)).collect() };
        let mut a = g(0);
        comm.allreduce_compressed(&mut a, ReduceOp::Sum, &Compression::TopK(sparse), &mut st)
            .unwrap();
        let mut b = g(1);
        let s = comm
            .allreduce_compressed(
                &mut b,
                ReduceOp::Sum,
                &Compression::TopK(dense_cfg),
                &mut st,
            )
            .unwrap();
        assert!(s.fell_back_to_dense);
        assert!(st.residual().iter().all(|&x| x == 0.0));
        (a, b)
    });
    // Over the two steps everything was sent: a + b == sum of both gradients.
    for i in 0..4096 {
        let exact: f64 = (0..2)
            .map(|r| grad(0, r, i) as f64 + grad(1, r, i) as f64)
            .sum();
        let got = outs[0].0[i] as f64 + outs[0].1[i] as f64;
        assert!((got - exact).abs() < 1e-5 * (1.0 + exact.abs()), "i={i}");
    }
}

#[test]
fn bad_arguments_are_errors_on_every_rank() {
    let c = Compression::TopK(TopKConfig::default());
    // Top-k only sums.
    let res = run_ranks(3, |comm| {
        let mut buf = [1f32; 4];
        comm.allreduce_compressed(&mut buf, ReduceOp::Max, &c, &mut CompressState::new())
            .map_err(|e| e.to_string())
    });
    for e in res {
        assert!(e.unwrap_err().contains("sum or avg"));
    }
    // Rank 1 reuses a state for another tensor: it fails, and its peers are
    // told instead of waiting for it.
    let res = run_ranks(3, |comm| {
        let mut st = CompressState::new();
        let mut buf = vec![1f32; 10_000];
        comm.allreduce_compressed(&mut buf, ReduceOp::Sum, &c, &mut st)
            .unwrap();
        let mut other = vec![1f32; if comm.rank() == 1 { 20_000 } else { 10_000 }];
        comm.allreduce_compressed(&mut other, ReduceOp::Sum, &c, &mut st)
            .map_err(|e| e.to_string())
    });
    for (r, e) in res.into_iter().enumerate() {
        let e = e.expect_err("no error");
        if r == 1 {
            assert!(e.contains("one CompressState per tensor"), "{e}");
        }
    }
    // Ranks that disagree on the tensor length all fail the same way.
    let res = run_ranks(2, |comm| {
        let mut buf = vec![1f32; 10_000 + 5000 * comm.rank()];
        comm.allreduce_compressed(&mut buf, ReduceOp::Sum, &c, &mut CompressState::new())
            .map_err(|e| e.to_string())
    });
    for e in res {
        assert!(e.unwrap_err().contains("pairs for a tensor of"));
    }
}

// ---------------------------------------------------------------------------
// Bytes at the socket

const HEADER: u64 = 48;

#[test]
fn socket_bytes_match_the_cost_model() {
    for n in [2usize, 3, 4] {
        // Divisible by N: every rank sends the same chunks.
        let count = 720_720;
        let res = run_ranks_with(
            n,
            |cfg| {
                cfg.algo = Some(Algo::Ring);
                cfg.slice_bytes = 0; // one pass: 2(N-1) messages
            },
            |comm| {
                let r = comm.rank();
                let mk = || -> Vec<f32> { (0..count).map(|i| grad(5, r, i)).collect() };
                let mut st = CompressState::new();
                let none = comm
                    .allreduce_compressed(&mut mk(), ReduceOp::Sum, &Compression::None, &mut st)
                    .unwrap();
                let fp16 = comm
                    .allreduce_compressed(&mut mk(), ReduceOp::Sum, &Compression::Fp16, &mut st)
                    .unwrap();
                let cfg = TopKConfig {
                    selection: Selection::Exact,
                    ..TopKConfig::default()
                };
                let tk = comm
                    .allreduce_compressed(
                        &mut mk(),
                        ReduceOp::Sum,
                        &Compression::TopK(cfg),
                        &mut st,
                    )
                    .unwrap();
                (none, fp16, tk)
            },
        );
        let dense = dense_ring_bytes(count, n);
        let k = TopKConfig::default().k(count, 0) as u64;
        for (r, (none, fp16, tk)) in res.iter().enumerate() {
            // The ring: payload plus one header per message.
            let headers = 2 * (n as u64 - 1) * HEADER;
            assert_eq!(none.bytes_sent, dense + headers, "rank {r}");
            // fp16: exactly half the payload, the same messages.
            assert_eq!(fp16.bytes_sent, dense / 2 + headers, "rank {r}");
            assert_eq!(fp16.bytes_received, fp16.bytes_sent, "rank {r}");
            // Top-k: (N-1) blocks of k 8-byte pairs, plus the (count, length)
            // exchange of 16 bytes per rank, plus one header per message.
            let payload = (n as u64 - 1) * (k * 8 + 16);
            let msgs = 2 * (n as u64 - 1);
            assert_eq!(tk.bytes_sent, payload + msgs * HEADER, "rank {r}");
            assert!(
                dense as f64 / tk.bytes_sent as f64 >= 20.0,
                "rank {r}: ratio {}",
                dense as f64 / tk.bytes_sent as f64
            );
        }
    }
}
