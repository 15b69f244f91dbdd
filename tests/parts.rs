//! `Communicator::allreduce_parts`: one allreduce over several buffers laid
//! end to end (what the engine runs over fused tensors' own memory). For world
//! sizes 1..=8, every algorithm, and splits that differ per rank (empty parts,
//! one-element parts, parts that cross the executor's segments and the
//! schedules' blocks), every rank's parts, put together, equal the serial
//! reference bit for bit, and the bits of a float sum equal those of a plain
//! allreduce of the concatenation.

mod common;

use common::*;
use half::f16;
use kolo::algo::cost::Algo;
use kolo::{Communicator, ReduceOp};
use std::time::Duration;

/// Part lengths summing to `count`, from `seed` (which differs per rank):
/// mostly short, some empty, some long.
fn split(count: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut left, mut k) = (count, 0u64);
    while left > 0 {
        let r = mix(seed ^ k);
        k += 1;
        let len = match r % 8 {
            0 => 0,
            1 => 1,
            2 => (r >> 8) as usize % 4000,
            _ => (r >> 8) as usize % 300,
        }
        .min(left);
        out.push(len);
        left -= len;
    }
    out.push(0);
    out
}

/// Run `allreduce_parts_with` over `buf` cut by `lens`.
fn reduce_parts<T: TestElem>(
    c: &Communicator,
    buf: &mut [T],
    lens: &[usize],
    op: ReduceOp,
    algo: Algo,
) {
    let mut parts: Vec<&mut [T]> = Vec::new();
    let mut rest = buf;
    for &l in lens {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(l);
        parts.push(head);
        rest = tail;
    }
    c.allreduce_parts_with(&mut parts, op, algo).unwrap();
}

fn exact<T: TestElem>(c: &Communicator, algo: Algo, op: ReduceOp, counts: &[usize], seed: u64) {
    let (r, n) = (c.rank(), c.size());
    for (k, &count) in counts.iter().enumerate() {
        let s = seed ^ (k as u64) << 8;
        let mut buf: Vec<T> = (0..count).map(|i| input(op, s, r, i)).collect();
        let lens = split(count, s ^ (r as u64) << 32);
        reduce_parts(c, &mut buf, &lens, op, algo);
        let want = reference::<T>(op, s, n, count);
        if let Some(i) = first_diff(&buf, &want) {
            panic!(
                "{} parts {op} {} n={n} count={count} rank={r} ({} parts): element {i}: got {:?}, want {:?}",
                algo.name(),
                T::DTYPE,
                lens.len(),
                buf[i],
                want[i]
            );
        }
    }
}

/// Float sums whose bits depend on the reduction order: the parts give the
/// same bits as a plain allreduce of the same values with the same algorithm.
fn same_as_plain(c: &Communicator, algo: Algo, counts: &[usize]) {
    let r = c.rank();
    for &count in counts {
        let vals: Vec<f32> = (0..count)
            .map(|i| (mix((r as u64) << 40 ^ i as u64) % 1_000_003) as f32 / 7.0)
            .collect();
        let mut plain = vals.clone();
        c.allreduce_with(&mut plain, ReduceOp::Sum, algo).unwrap();
        let mut parts = vals;
        reduce_parts(
            c,
            &mut parts,
            &split(count, 99 ^ r as u64),
            ReduceOp::Sum,
            algo,
        );
        assert_eq!(
            first_diff(&parts, &plain),
            None,
            "{} parts vs plain allreduce, count {count}, rank {r}",
            algo.name()
        );
    }
}

fn world(n: usize) {
    let counts = [0, 1, n + 1, 1009, 100_003];
    run_ranks_with(
        n,
        |cfg| {
            // Small segments, so that parts cross them.
            cfg.segment_bytes = 4096;
            cfg.timeout = Duration::from_secs(60);
        },
        |c: Communicator| {
            for algo in Algo::ALL {
                exact::<f32>(&c, algo, ReduceOp::Sum, &counts, 1);
                exact::<i64>(&c, algo, ReduceOp::Prod, &counts[..4], 2);
                exact::<f16>(&c, algo, ReduceOp::Avg, &counts[..4], 3);
                exact::<u8>(&c, algo, ReduceOp::Min, &counts[..4], 4);
                exact::<f64>(&c, algo, ReduceOp::Max, &counts[..4], 5);
                exact::<i32>(&c, algo, ReduceOp::Avg, &counts[..4], 6);
                same_as_plain(&c, algo, &[1009, 100_003]);
            }
        },
    );
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
    world_8 = 8
);

/// Ranks whose totals differ fail on every rank with a clear error, as a
/// plain allreduce of different counts does.
#[test]
fn different_totals_fail_on_every_rank() {
    let errs = run_ranks_with(
        3,
        |cfg| cfg.timeout = Duration::from_secs(5),
        |c: Communicator| {
            let extra = usize::from(c.rank() == 1);
            let mut a = vec![1.0f32; 10 + extra];
            let mut b = [1.0f32; 5];
            c.allreduce_parts(&mut [&mut a[..], &mut b[..]], ReduceOp::Sum)
                .unwrap_err()
                .to_string()
        },
    );
    for (r, e) in errs.iter().enumerate() {
        assert!(e.contains("allreduce"), "rank {r}: {e}");
    }
}
