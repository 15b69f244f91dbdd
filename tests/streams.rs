//! Several TCP connections per peer (`KOLO_NSOCKS`): with tiny stripes
//! (`min_stripe` = 64 bytes) so that all but the smallest messages are
//! striped, every algorithm equals the serial reference on every rank, and
//! arbitrary float sums have the same bits on every rank and with 1, 2 or 4
//! streams (striping moves bytes, it never changes an order of operations);
//! fp16 narrowing works stripe by stripe; ranks that disagree on the number
//! fail at start on every rank with an error naming the values, instead of
//! hanging.

mod common;

use common::*;
use kolo::algo::cost::Algo;
use kolo::compress::{CompressState, Compression};
use kolo::rendezvous::StoreServer;
use kolo::{Communicator, ReduceOp};
use std::time::{Duration, Instant};

/// One allreduce of `count` elements with `algo`: exact against the serial
/// reference, then the fingerprint of an inexact float sum (and, below 2^20,
/// of an fp16-compressed average), to compare across ranks and stream counts.
fn check(c: &Communicator, algo: Algo, count: usize, seed: u64) -> u64 {
    let label = format!("nsocks={}", c.config().nsocks);
    let x = sum_exact_then_inexact(c, algo, count, seed, &label);
    if count >= 1 << 20 {
        return fingerprint(&x);
    }
    let mut st = CompressState::new();
    let mut h: Vec<f32> = x.iter().map(|v| v / 3.0).collect();
    c.allreduce_compressed(&mut h, ReduceOp::Avg, &Compression::Fp16, &mut st)
        .unwrap();
    fingerprint(&x) ^ fingerprint(&h).rotate_left(1)
}

/// Fingerprints per (algorithm, count) on every rank of `n`, with `nsocks`
/// streams per peer.
fn run(n: usize, nsocks: usize) -> Vec<Vec<u64>> {
    // Empty, one element, fewer elements than stripes per rank, a prime, 2^20.
    let counts = [0, 1, n + 1, 1009, 1 << 20];
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
            // Other collectives ride the same executor.
            let mut all = vec![0i32; 3000 * n];
            c.allgather(&vec![c.rank() as i32; 3000], &mut all).unwrap();
            let want: Vec<i32> = (0..n).flat_map(|q| vec![q as i32; 3000]).collect();
            assert_eq!(all, want, "allgather nsocks={nsocks}");
            let mut b = vec![c.rank() as u8; 70_001];
            c.broadcast(&mut b, n - 1).unwrap();
            assert!(b.iter().all(|&v| v as usize == n - 1), "broadcast");
            prints
        },
    )
}

/// `n` ranks with one stream per peer, then 2 and 4: every rank of every
/// job has the bits of rank 0 with one stream.
fn world(n: usize) {
    let one = run(n, 1);
    for nsocks in [1usize, 2, 4] {
        let many = if nsocks == 1 {
            one.clone()
        } else {
            run(n, nsocks)
        };
        for (r, p) in many.iter().enumerate() {
            assert_eq!(
                p, &one[0],
                "n={n} nsocks={nsocks}: rank {r} differs from rank 0 with one stream"
            );
        }
    }
}

#[test]
fn striped_world_1() {
    world(1);
}
#[test]
fn striped_world_2() {
    world(2);
}
#[test]
fn striped_world_3() {
    world(3);
}
#[test]
fn striped_world_4() {
    world(4);
}
#[test]
fn striped_world_5() {
    world(5);
}
#[test]
fn striped_world_6() {
    world(6);
}
#[test]
fn striped_world_7() {
    world(7);
}
#[test]
fn striped_world_8() {
    world(8);
}

/// Three ranks, rank 1 with a different `KOLO_NSOCKS`: every rank fails at
/// rendezvous, well before the start timeout, naming both values.
#[test]
fn ranks_that_disagree_on_nsocks_fail_at_start_on_every_rank() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let port = store.local_addr().port();
    let t0 = Instant::now();
    let errs = init_errors(3, |r| {
        let mut cfg = config(r, 3, port);
        cfg.nsocks = if r == 1 { 4 } else { 2 };
        cfg
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    for (r, e) in errs.iter().enumerate() {
        assert_eq!(
            e,
            &format!(
                "configuration error: rank {r}: ranks disagree on KOLO_NSOCKS: 2 on ranks 0, 2; \
                 4 on rank 1 (every rank must use the same)"
            )
        );
    }
}

/// The same with rank 0 serving the store itself (`KOLO_STORE=rank0`): it
/// keeps the store up until the others have read the values.
#[test]
fn nsocks_disagreement_with_rank_0_serving_the_store() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let errs = init_errors(2, |r| {
        let mut cfg = kolo::Config::local(r, 2, port);
        cfg.nsocks = 1 + r;
        cfg
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(
            e.ends_with(&format!(
                "rank {r}: ranks disagree on KOLO_NSOCKS: 1 on rank 0; 2 on rank 1 \
                 (every rank must use the same)"
            )),
            "{e}"
        );
    }
}

/// Start `n` ranks with `cfg(rank)` (and a 20 s start timeout), each of
/// which must fail to form the job; their errors.
fn init_errors(n: usize, cfg: impl Fn(usize) -> kolo::Config + Sync) -> Vec<String> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let cfg = &cfg;
                s.spawn(move || {
                    let mut c = cfg(r);
                    c.start_timeout = Duration::from_secs(20);
                    Communicator::init(c).err().map(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().expect("a mismatched job formed"))
            .collect()
    })
}
