//! Throughput of the reduction kernels against a memcpy baseline.
//!
//! Throughput is the byte size of one buffer, so `memcpy` and `sum_f32` at the
//! same size move comparable data (reduce reads two buffers and writes one,
//! memcpy reads one and writes one). Sample counts are small on purpose: the
//! whole run should finish in about two minutes on a small shared machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use kolo::reduce::reduce;
use kolo::{Element, ReduceOp};

const SIZES: [(usize, &str); 2] = [(1 << 20, "1MiB"), (64 << 20, "64MiB")];

/// Benchmarks `reduce(op)` on two buffers of `bytes` bytes of `T`.
fn bench_op<T: Element>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    op: ReduceOp,
    bytes: usize,
    label: &str,
    one: T,
) {
    let n = bytes / std::mem::size_of::<T>();
    // Small, finite inputs: keeps float sums away from subnormals, whose
    // microcode assists would measure the CPU rather than the kernel.
    let mut acc = vec![one; n];
    let inc = vec![one; n];
    g.bench_function(BenchmarkId::new(name, label), |b| {
        b.iter(|| reduce(op, black_box(&mut acc), black_box(&inc), false))
    });
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (bytes, label) in SIZES {
        g.throughput(Throughput::Bytes(bytes as u64));
        {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            g.bench_function(BenchmarkId::new("memcpy", label), |b| {
                b.iter(|| black_box(&mut dst[..]).copy_from_slice(black_box(&src)))
            });
        }
        bench_op(&mut g, "sum_f32", ReduceOp::Sum, bytes, label, 1.0f32);
        bench_op(&mut g, "sum_f64", ReduceOp::Sum, bytes, label, 1.0f64);
        bench_op(&mut g, "sum_f16", ReduceOp::Sum, bytes, label, f16::ONE);
        bench_op(&mut g, "sum_bf16", ReduceOp::Sum, bytes, label, bf16::ONE);
        bench_op(&mut g, "sum_i32", ReduceOp::Sum, bytes, label, 1i32);
        bench_op(&mut g, "sum_u8", ReduceOp::Sum, bytes, label, 1u8);
        bench_op(&mut g, "max_f32", ReduceOp::Max, bytes, label, 1.0f32);
    }
    g.finish();
}

criterion_group!(reduce_benches, benches);
criterion_main!(reduce_benches);
