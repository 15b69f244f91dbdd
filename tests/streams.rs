//! Several TCP connections per peer (`KOLO_NSOCKS`): with tiny stripes so
//! that most messages are striped, every algorithm still equals the serial
//! reference bit for bit on every rank, with the same bits as one connection
//! (striping moves bytes, it never changes an order of operations); fp16
//! narrowing works stripe by stripe; and ranks that disagree on the number
//! fail at start with an error naming both numbers, instead of hanging.

mod common;

use common::*;
use kolo::algo::cost::Algo;
use kolo::compress::{CompressState, Compression};
use kolo::rendezvous::StoreServer;
use kolo::{Communicator, ReduceOp};
use std::time::Duration;

fn check(c: &Communicator, algo: Algo, count: usize, seed: u64) -> u64 {
    let (r, n) = (c.rank(), c.size());
    let mut buf: Vec<f32> = (0..count)
        .map(|i| input(ReduceOp::Sum, seed, r, i))
        .collect();
    c.allreduce_with(&mut buf, ReduceOp::Sum, algo).unwrap();
    let want = reference::<f32>(ReduceOp::Sum, seed, n, count);
    if let Some(i) = first_diff(&buf, &want) {
        panic!(
            "{} n={n} count={count} rank={r} nsocks={}: element {i}: got {}, want {}",
            algo.name(),
            c.config().nsocks,
            buf[i],
            want[i]
        );
    }
    // Arbitrary floats: the bits, to compare across ranks and stream counts.
    let mut x: Vec<f32> = (0..count)
        .map(|i| ((mix((r * 7919 + i) as u64) % 2001) as f32 - 1000.0) / 7.0)
        .collect();
    c.allreduce_with(&mut x, ReduceOp::Sum, algo).unwrap();
    let mut st = CompressState::new();
    let mut h: Vec<f32> = x.iter().map(|v| v / 3.0).collect();
    c.allreduce_compressed(&mut h, ReduceOp::Avg, &Compression::Fp16, &mut st)
        .unwrap();
    fingerprint(&x) ^ fingerprint(&h).rotate_left(1)
}

/// Fingerprints per (algorithm, count) on every rank, with `nsocks` streams.
fn run(n: usize, nsocks: usize) -> Vec<Vec<u64>> {
    let counts = [0, 1, n + 1, 1009, 100_003];
    run_ranks_with(
        n,
        |cfg| {
            cfg.nsocks = nsocks;
            cfg.min_stripe = 64;
            // The default cost model, not a measured one: the jobs compared
            // must pick the same algorithm for the compressed (auto) calls.
            cfg.calibrate = false;
            cfg.segment_bytes = 4096;
            cfg.timeout = Duration::from_secs(60);
        },
        |c: Communicator| {
            let mut prints = Vec::new();
            for algo in Algo::ALL {
                for (k, &count) in counts.iter().enumerate() {
                    prints.push(check(&c, algo, count, 11 + k as u64));
                }
            }
            prints.push(check(&c, Algo::Ring, 1 << 20, 99));
            // Other collectives ride the same executor.
            let mut all = vec![0i32; 3000 * n];
            c.allgather(&vec![c.rank() as i32; 3000], &mut all).unwrap();
            let want: Vec<i32> = (0..n).flat_map(|q| vec![q as i32; 3000]).collect();
            assert_eq!(all, want, "allgather nsocks={nsocks}");
            prints
        },
    )
}

#[test]
fn striped_results_are_exact_and_the_same_bits_as_one_stream() {
    for n in [1usize, 2, 3, 5, 6] {
        let one = run(n, 1);
        for nsocks in [2usize, 3] {
            let many = run(n, nsocks);
            for (r, p) in many.iter().enumerate() {
                assert_eq!(
                    p, &one[0],
                    "n={n} nsocks={nsocks}: rank {r} differs from one stream"
                );
            }
        }
    }
}

#[test]
fn ranks_that_disagree_on_nsocks_fail_at_start() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let port = store.local_addr().port();
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let mut cfg = config(r, 2, port);
                    cfg.nsocks = 1 + r;
                    cfg.start_timeout = Duration::from_secs(3);
                    Communicator::init(cfg).err().map(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().expect("a mismatched job formed"))
            .collect()
    });
    // Each rank's dial is refused before authentication, so the refusal
    // names the possible causes; the refusing rank logs which it was.
    for e in &errs {
        assert!(
            e.contains("rejected our hello") && e.contains("KOLO_NSOCKS"),
            "{e}"
        );
    }
}
