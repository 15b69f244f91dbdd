//! Shared test harness: ranks as threads over loopback TCP, deterministic
//! inputs, and an independent serial reference for every dtype and op.
#![allow(dead_code)]

use half::{bf16, f16};
use kolo::rendezvous::StoreServer;
use kolo::{Communicator, Config, Element, ReduceOp};
use std::time::Duration;

/// Config for rank `r` of `n` against an already-running store.
pub fn config(r: usize, n: usize, port: u16) -> Config {
    let mut c = Config::local(r, n, port);
    c.serve_store = false;
    c.timeout = Duration::from_secs(60);
    c.start_timeout = Duration::from_secs(30);
    c
}

/// One float32 sum of `count` elements with `algo`: exact against the
/// serial reference (a panic names `label`), then an inexact sum of
/// arbitrary floats, returned to compare bits across ranks and settings.
pub fn sum_exact_then_inexact(
    c: &Communicator,
    algo: kolo::algo::cost::Algo,
    count: usize,
    seed: u64,
    label: &str,
) -> Vec<f32> {
    let (r, n) = (c.rank(), c.size());
    let mut buf: Vec<f32> = (0..count)
        .map(|i| input(ReduceOp::Sum, seed, r, i))
        .collect();
    c.allreduce_with(&mut buf, ReduceOp::Sum, algo).unwrap();
    let want = reference::<f32>(ReduceOp::Sum, seed, n, count);
    if let Some(i) = first_diff(&buf, &want) {
        panic!(
            "{} n={n} count={count} rank={r} {label}: element {i}: got {}, want {}",
            algo.name(),
            buf[i],
            want[i]
        );
    }
    let mut x: Vec<f32> = (0..count)
        .map(|i| ((mix((r * 7919 + i) as u64 ^ seed) % 2001) as f32 - 1000.0) / 7.0)
        .collect();
    c.allreduce_with(&mut x, ReduceOp::Sum, algo).unwrap();
    x
}

/// Run `f` on `n` ranks (threads) and return each rank's result.
pub fn run_ranks<R: Send>(n: usize, f: impl Fn(Communicator) -> R + Sync) -> Vec<R> {
    run_ranks_with(n, |_| {}, f)
}

/// Like `run_ranks`, letting the test adjust each rank's config.
pub fn run_ranks_with<R: Send>(
    n: usize,
    tweak: impl Fn(&mut Config) + Sync,
    f: impl Fn(Communicator) -> R + Sync,
) -> Vec<R> {
    let store = StoreServer::bind("127.0.0.1:0").expect("store");
    let port = store.local_addr().port();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (f, tweak) = (&f, &tweak);
                s.spawn(move || {
                    let mut cfg = config(r, n, port);
                    tweak(&mut cfg);
                    let c =
                        Communicator::init(cfg).unwrap_or_else(|e| panic!("rank {r}: init: {e}"));
                    f(c)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// splitmix64: deterministic inputs without a rand dependency.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Element operations written independently of kolo's kernels.
pub trait TestElem: Element {
    fn from_i64(v: i64) -> Self;
    fn from_f64(v: f64) -> Self;
    fn bits(self) -> u64;
    fn combine(op: ReduceOp, a: Self, b: Self) -> Self;
    fn div(self, n: usize) -> Self;
    const SIGNED: bool;
    const FLOAT: bool;
}

macro_rules! int_elem {
    ($t:ty, $signed:expr) => {
        impl TestElem for $t {
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn bits(self) -> u64 {
                self as u64
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            fn div(self, n: usize) -> Self {
                self / (n as $t)
            }
            const SIGNED: bool = $signed;
            const FLOAT: bool = false;
        }
    };
}
int_elem!(u8, false);
int_elem!(i32, true);
int_elem!(i64, true);

macro_rules! float_elem {
    ($t:ty) => {
        impl TestElem for $t {
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn bits(self) -> u64 {
                self.to_bits() as u64
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + b,
                    ReduceOp::Prod => a * b,
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            fn div(self, n: usize) -> Self {
                self / n as $t
            }
            const SIGNED: bool = true;
            const FLOAT: bool = true;
        }
    };
}
float_elem!(f32);
float_elem!(f64);

macro_rules! half_elem {
    ($t:ty) => {
        impl TestElem for $t {
            fn from_i64(v: i64) -> Self {
                <$t>::from_f32(v as f32)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn bits(self) -> u64 {
                self.to_bits() as u64
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                let (x, y) = (a.to_f32(), b.to_f32());
                <$t>::from_f32(match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                })
            }
            fn div(self, n: usize) -> Self {
                <$t>::from_f32(self.to_f32() / n as f32)
            }
            const SIGNED: bool = true;
            const FLOAT: bool = true;
        }
    };
}
half_elem!(f16);
half_elem!(bf16);

/// Input element `i` of rank `rank` for a test case: small integers chosen so
/// that every op's exact result is representable in every dtype for up to 8
/// ranks (sums within ±24, products of ±1 and 2 within ±256), so any correct
/// reduction order gives the same bits as the serial reference.
pub fn input<T: TestElem>(op: ReduceOp, seed: u64, rank: usize, i: usize) -> T {
    let r = mix(seed ^ ((rank as u64) << 40) ^ i as u64);
    let v: i64 = match op {
        ReduceOp::Prod => [1, 2, if T::SIGNED { -1 } else { 1 }][(r % 3) as usize],
        ReduceOp::Min | ReduceOp::Max => (r % 101) as i64 - if T::SIGNED { 50 } else { 0 },
        _ => (r % 7) as i64 - if T::SIGNED { 3 } else { 0 },
    };
    T::from_i64(v)
}

/// Serial reference: fold the ranks' inputs in rank order, then divide for Avg.
pub fn reference<T: TestElem>(op: ReduceOp, seed: u64, n: usize, count: usize) -> Vec<T> {
    (0..count)
        .map(|i| {
            let mut acc: T = input(op, seed, 0, i);
            for r in 1..n {
                acc = T::combine(op, acc, input(op, seed, r, i));
            }
            if op == ReduceOp::Avg {
                acc = acc.div(n);
            }
            acc
        })
        .collect()
}

/// Index of the first element whose bits differ, if any.
pub fn first_diff<T: TestElem>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x.bits() != y.bits())
}

/// A cheap fingerprint of a buffer's bits, to compare ranks.
pub fn fingerprint<T: TestElem>(v: &[T]) -> u64 {
    v.iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, x| mix(h ^ x.bits()))
}

/// Write all of `bytes` to `peer` on connection 0 (a test's hand-made frame),
/// failing the test on an error or after 10 s.
pub fn send_all(t: &mut kolo::transport::Transport, peer: usize, bytes: &[u8]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut sent = 0;
    while sent < bytes.len() {
        match t.send(peer, &[std::io::IoSlice::new(&bytes[sent..])]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "send to {peer} stuck");
                std::thread::yield_now();
            }
            Err(e) => panic!("send to {peer}: {e}"),
        }
    }
}
