//! Every collective × dtype × op against a serial reference, for world sizes
//! 1, 2, 3, 4, 5 and 8 (ranks as threads over loopback TCP), element counts
//! 0, 1, N-1, N, N+1, a prime and 2^20; every rank's result must equal the
//! reference bit for bit, so all ranks are bitwise equal too.

mod common;

use common::*;
use half::{bf16, f16};
use kolo::{Communicator, ReduceOp};

fn counts(n: usize) -> Vec<usize> {
    let mut c = vec![0, 1, n.saturating_sub(1), n, n + 1, 1009, 1 << 20];
    c.dedup();
    c
}

fn check<T: TestElem>(what: &str, got: &[T], want: &[T]) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what} ({}): element {i} of {}: got {:?}, want {:?}",
            T::DTYPE,
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// Runs every collective for one dtype; returns fingerprints of the outputs.
fn all_collectives<T: TestElem>(c: &Communicator, seed: u64) -> Vec<u64> {
    let (r, n) = (c.rank(), c.size());
    let mut prints = Vec::new();
    for op in ReduceOp::ALL {
        for (k, &count) in counts(n).iter().enumerate() {
            // 2^20 elements: every dtype with sum, f32 with every op.
            if count == 1 << 20 && op != ReduceOp::Sum && T::DTYPE != kolo::DType::F32 {
                continue;
            }
            let s = seed ^ (k as u64) << 8 ^ (op.code() as u64) << 16;
            let mut buf: Vec<T> = (0..count).map(|i| input(op, s, r, i)).collect();
            c.allreduce(&mut buf, op).unwrap();
            check(
                &format!("allreduce {op} n={n} count={count} rank={r}"),
                &buf,
                &reference(op, s, n, count),
            );
            prints.push(fingerprint(&buf));

            if count <= 1009 {
                // reduce_scatter: rank i's input has n blocks of `count`.
                let send: Vec<T> = (0..n * count).map(|i| input(op, s, r, i)).collect();
                let mut recv = vec![T::from_i64(0); count];
                c.reduce_scatter(&send, &mut recv, op).unwrap();
                let full = reference::<T>(op, s, n, n * count);
                check(
                    &format!("reduce_scatter {op} n={n} count={count} rank={r}"),
                    &recv,
                    &full[r * count..(r + 1) * count],
                );
                prints.push(fingerprint(&full));
            }
        }
    }
    for (k, &count) in counts(n).iter().enumerate() {
        let s = seed ^ 0xb0 ^ (k as u64) << 8;
        let at = |rank: usize, i: usize| input::<T>(ReduceOp::Min, s, rank, i);
        // broadcast from the first and the last rank
        for root in [0, n - 1] {
            let mut buf: Vec<T> = (0..count).map(|i| at(r, i)).collect();
            c.broadcast(&mut buf, root).unwrap();
            let want: Vec<T> = (0..count).map(|i| at(root, i)).collect();
            check(
                &format!("broadcast root={root} n={n} count={count} rank={r}"),
                &buf,
                &want,
            );
        }
        if count > 1009 {
            continue;
        }
        // allgather
        let mine: Vec<T> = (0..count).map(|i| at(r, i)).collect();
        let mut all = vec![T::from_i64(0); n * count];
        c.allgather(&mine, &mut all).unwrap();
        let want: Vec<T> = (0..n)
            .flat_map(|q| (0..count).map(move |i| at(q, i)))
            .collect();
        check(
            &format!("allgather n={n} count={count} rank={r}"),
            &all,
            &want,
        );
        // allgatherv with a different count per rank (including zeros)
        let cs: Vec<usize> = (0..n).map(|q| (count + q * 3) % (count + 2)).collect();
        let mine: Vec<T> = (0..cs[r]).map(|i| at(r, i)).collect();
        let mut all = vec![T::from_i64(0); cs.iter().sum()];
        c.allgatherv(&mine, &mut all, &cs).unwrap();
        let want: Vec<T> = (0..n)
            .flat_map(|q| (0..cs[q]).map(move |i| at(q, i)))
            .collect();
        check(&format!("allgatherv counts={cs:?} rank={r}"), &all, &want);
        // alltoall: element i of rank q's block for rank j is at(q, j * count + i)
        let send: Vec<T> = (0..n * count).map(|i| at(r, i)).collect();
        let mut recv = vec![T::from_i64(0); n * count];
        c.alltoall(&send, &mut recv).unwrap();
        let want: Vec<T> = (0..n)
            .flat_map(|q| (0..count).map(move |i| at(q, r * count + i)))
            .collect();
        check(
            &format!("alltoall n={n} count={count} rank={r}"),
            &recv,
            &want,
        );
    }
    c.barrier().unwrap();
    prints
}

/// Sums of arbitrary floats round differently in different orders: ranks
/// must still agree bit for bit, and stay close to the exact sum.
fn inexact_sums<T: TestElem>(c: &Communicator, tol: f64) -> Vec<u64> {
    let (r, n) = (c.rank(), c.size());
    let mut prints = Vec::new();
    for count in [n + 1, 1009, 100_003] {
        let val = |q: usize, i: usize| {
            ((mix((q * 1_000_003 + i) as u64) % 2_000_001) as f64 / 1e6 - 1.0) * 1.7
        };
        let mut buf: Vec<T> = (0..count).map(|i| T::from_f64(val(r, i))).collect();
        let exact: Vec<f64> = (0..count)
            .map(|i| (0..n).map(|q| val(q, i)).sum())
            .collect();
        c.allreduce(&mut buf, ReduceOp::Sum).unwrap();
        for (i, (g, e)) in buf.iter().zip(&exact).enumerate() {
            let g = half_to_f64(*g);
            assert!(
                (g - e).abs() <= tol * n as f64,
                "{} rank {r} elem {i}: {g} vs {e}",
                T::DTYPE
            );
        }
        prints.push(fingerprint(&buf));
    }
    prints
}

fn half_to_f64<T: TestElem>(v: T) -> f64 {
    // Go through the bits so this does not depend on kolo.
    let b = v.bits();
    match T::DTYPE {
        kolo::DType::F16 => f16::from_bits(b as u16).to_f64(),
        kolo::DType::BF16 => bf16::from_bits(b as u16).to_f64(),
        kolo::DType::F32 => f32::from_bits(b as u32) as f64,
        _ => f64::from_bits(b),
    }
}

fn world(n: usize) {
    let prints = run_ranks(n, |c| {
        let mut p = Vec::new();
        p.extend(all_collectives::<f32>(&c, 1));
        p.extend(all_collectives::<f64>(&c, 2));
        p.extend(all_collectives::<f16>(&c, 3));
        p.extend(all_collectives::<bf16>(&c, 4));
        p.extend(all_collectives::<i32>(&c, 5));
        p.extend(all_collectives::<i64>(&c, 6));
        p.extend(all_collectives::<u8>(&c, 7));
        p.extend(inexact_sums::<f32>(&c, 1e-5));
        p.extend(inexact_sums::<f64>(&c, 1e-12));
        p.extend(inexact_sums::<f16>(&c, 2e-2));
        p.extend(inexact_sums::<bf16>(&c, 2e-1));
        p
    });
    for (r, p) in prints.iter().enumerate() {
        assert_eq!(p, &prints[0], "rank {r}'s results differ from rank 0's");
    }
}

#[test]
fn world_1() {
    world(1);
}
#[test]
fn world_2() {
    world(2);
}
#[test]
fn world_3() {
    world(3);
}
#[test]
fn world_4() {
    world(4);
}
#[test]
fn world_5() {
    world(5);
}
#[test]
fn world_8() {
    world(8);
}

/// One buffer of at least 64 MiB through the ring, segmented and pipelined.
#[test]
fn allreduce_64mib() {
    let count = (64 << 20) / 4 + 3;
    let prints = run_ranks(4, |c| {
        let r = c.rank();
        let mut buf: Vec<f32> = (0..count).map(|i| ((i + r) % 5) as f32).collect();
        c.allreduce(&mut buf, ReduceOp::Sum).unwrap();
        for (i, v) in buf.iter().enumerate() {
            let want: f32 = (0..4).map(|q| ((i + q) % 5) as f32).sum();
            assert_eq!(*v, want, "rank {r} element {i}");
        }
        fingerprint(&buf)
    });
    assert!(prints.iter().all(|p| *p == prints[0]));
}
