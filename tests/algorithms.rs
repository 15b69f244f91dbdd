//! Every allreduce algorithm over real loopback TCP, for world sizes 1..=17:
//! exact results equal the serial reference bit for bit on every rank; inexact
//! float sums are bitwise equal across ranks and repeatable; algorithms agree
//! with each other up to rounding.

mod common;

use common::*;
use half::f16;
use kolo::algo::cost::Algo;
use kolo::{Communicator, ReduceOp};
use std::time::Duration;

fn exact<T: TestElem>(c: &Communicator, algo: Algo, op: ReduceOp, counts: &[usize], seed: u64) {
    let (r, n) = (c.rank(), c.size());
    for (k, &count) in counts.iter().enumerate() {
        let s = seed ^ (k as u64) << 8;
        let mut buf: Vec<T> = (0..count).map(|i| input(op, s, r, i)).collect();
        c.allreduce_with(&mut buf, op, algo).unwrap();
        let want = reference::<T>(op, s, n, count);
        if let Some(i) = first_diff(&buf, &want) {
            panic!(
                "{} {op} {} n={n} count={count} rank={r}: element {i}: got {:?}, want {:?}",
                algo.name(),
                T::DTYPE,
                buf[i],
                want[i]
            );
        }
    }
}

/// Arbitrary floats: returns the fingerprint of each result (twice per count,
/// to check the algorithm repeats its bits) and checks closeness to the exact sum.
fn inexact(c: &Communicator, algo: Algo, counts: &[usize]) -> Vec<u64> {
    let (r, n) = (c.rank(), c.size());
    let mut prints = Vec::new();
    for &count in counts {
        let val = |q: usize, i: usize| {
            ((mix((q * 7919 + i) as u64) % 2_000_001) as f64 / 1e6 - 1.0) * 3.3
        };
        for _ in 0..2 {
            let mut buf: Vec<f32> = (0..count).map(|i| val(r, i) as f32).collect();
            c.allreduce_with(&mut buf, ReduceOp::Sum, algo).unwrap();
            for (i, v) in buf.iter().enumerate() {
                let e: f64 = (0..n).map(|q| val(q, i) as f32 as f64).sum();
                assert!(
                    (*v as f64 - e).abs() < 1e-4 * n as f64,
                    "{} n={n} elem {i}: {v} vs {e}",
                    algo.name()
                );
            }
            prints.push(fingerprint(&buf));
        }
        let p = &prints[prints.len() - 2..];
        assert_eq!(
            p[0],
            p[1],
            "{} n={n} count={count}: same inputs, different bits",
            algo.name()
        );
    }
    prints
}

fn world(n: usize) {
    let counts = [0, 1, n.saturating_sub(1), n + 1, 97, 1009, 100_003];
    let prints = run_ranks_with(
        n,
        |cfg| {
            // Small segments so the tree pipelines even at these sizes.
            cfg.segment_bytes = 4096;
            cfg.timeout = Duration::from_secs(60);
        },
        |c: Communicator| {
            let mut p = Vec::new();
            for algo in Algo::ALL {
                exact::<f32>(&c, algo, ReduceOp::Sum, &counts, 1);
                exact::<f32>(&c, algo, ReduceOp::Max, &counts[..6], 2);
                exact::<i64>(&c, algo, ReduceOp::Prod, &counts[..6], 3);
                exact::<f16>(&c, algo, ReduceOp::Avg, &counts[..6], 4);
                exact::<u8>(&c, algo, ReduceOp::Min, &counts[..6], 5);
                p.extend(inexact(&c, algo, &[n + 1, 1009, 100_003]));
            }
            // 2^20 elements through each algorithm once.
            for algo in Algo::ALL {
                exact::<f32>(&c, algo, ReduceOp::Sum, &[1 << 20], 6);
            }
            p
        },
    );
    for (r, p) in prints.iter().enumerate() {
        assert_eq!(p, &prints[0], "rank {r}'s bits differ from rank 0's");
    }
}

macro_rules! worlds {
    ($($name:ident = $n:expr),*) => {$(
        #[test]
        fn $name() {
            world($n);
        }
    )*};
}
worlds!(
    world_1 = 1,
    world_2 = 2,
    world_3 = 3,
    world_4 = 4,
    world_5 = 5,
    world_6 = 6,
    world_7 = 7,
    world_8 = 8,
    world_9 = 9,
    world_11 = 11,
    world_13 = 13,
    world_16 = 16,
    world_17 = 17
);

/// The model measured at start is the same bits on every rank, so `auto`
/// picks the same algorithm everywhere; configured values are not measured.
#[test]
fn measured_cost_model_is_identical_on_every_rank() {
    for n in [2usize, 3, 5] {
        let seen = run_ranks(n, |c| {
            let m = c.cost_model();
            assert!(m.alpha_s > 0.0 && m.beta_s_per_byte > 0.0 && m.gamma_s_per_byte > 0.0);
            // Measured, not the built-in guess.
            assert_ne!(m, kolo::algo::cost::Model::DEFAULT);
            let picks: Vec<Algo> = (0..=30).map(|k| c.allreduce_algo(1 << k)).collect();
            // And auto runs what it says it picks: an 8-byte and a 1 MiB sum.
            for count in [2usize, 1 << 18] {
                let mut v = vec![1.0f32; count];
                c.allreduce(&mut v, ReduceOp::Sum).unwrap();
                assert!(v.iter().all(|&x| x == n as f32));
            }
            (
                [m.alpha_s, m.beta_s_per_byte, m.gamma_s_per_byte].map(f64::to_bits),
                picks,
            )
        });
        assert!(seen.iter().all(|s| *s == seen[0]), "n={n}: {seen:?}");
        // Latency-bound sizes never run the ring.
        assert_ne!(seen[0].1[3], Algo::Ring, "n={n}");
    }
    let configured = run_ranks_with(
        3,
        |cfg| {
            cfg.alpha_us = Some(1000.0);
            cfg.beta_gbps = Some(2.0);
            cfg.gamma_gbps = Some(4.0);
        },
        |c| c.cost_model(),
    );
    for m in configured {
        assert_eq!(m.alpha_s, 1e-3);
        assert_eq!(m.beta_s_per_byte, 1.0 / 2e9);
        assert_eq!(m.gamma_s_per_byte, 1.0 / 4e9);
    }
}
