//! Soak test: many collectives of random sizes, dtypes, reduction ops,
//! algorithms and kinds, every result checked exactly against a reference
//! that each rank computes locally, and bitwise agreement across ranks.
//! `scripts/soak.sh` runs it with 8 ranks over the network namespaces with
//! packet loss on one link; `tests/netns.rs` runs a short one.
//!
//! ```text
//! kolorun -np 4 target/release/examples/soak --ops 1000 --seed 7
//! ```
//!
//! Op `k` is a pure function of (seed, k): kind (allreduce 70% with a random
//! [`Algo`], allgather, broadcast, reduce_scatter 10% each), dtype, op, size
//! (log-uniform up to `--max-bytes`, 8 MiB by default, 5% empty), and a table
//! of 4093 random values; rank `r`'s element `i` is `table[(i + r*b) % 4093]`,
//! so the reference of every element is the reduction of `n` table entries and
//! is computed once per op for one period. Values are chosen so that every
//! reduction order gives the same bits (small integers in floats for sums,
//! powers of two for products, wrapping integers), so results must match the
//! reference exactly. Every 100 ops the ranks allgather a running hash of all
//! their results and compare. Some ops start with one rank sleeping up to 20 ms.
//! A warm-up first runs every kind and algorithm once at the largest size (so
//! buffers reach their high-water marks). At op `--rss-base` (default
//! min(1000, ops/4)) and at the end each rank reads
//! its VmRSS; growth above `--rss-slack` (10%) fails. `--rss-every K` also
//! prints VmRSS every K ops.
//!
//! Prints per rank `rank R: soak ok ops=.. bytes=.. rss_kb_base=.. (op ..) rss_kb_end=.. growth=..% hash=.. delays=.. delay_ms=..`
//! (delays: ops this rank started late, and their total sleep);
//! exit status 1 on a kolo error, 3 on a wrong result or hash disagreement, 4
//! on memory growth.
use half::{bf16, f16};
use kolo::algo::cost::Algo;
use kolo::element::{as_bytes, cast_mut};
use kolo::{Communicator, Element, ReduceOp};
use std::fmt::Debug;
use std::time::{Duration, Instant};

const PERIOD: usize = 4093;

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A value type with an independent reference reduction.
trait V: Element + Copy + PartialEq + Debug {
    /// A value from random bits for which every reduction order of `op` is exact.
    fn gen(x: u64, op: ReduceOp) -> Self;
    fn red(op: ReduceOp, a: Self, b: Self) -> Self;
    fn avg(sum: Self, n: usize) -> Self;
}

macro_rules! int_v {
    ($($t:ty),*) => {$(
        impl V for $t {
            fn gen(x: u64, _: ReduceOp) -> Self {
                x as $t
            }
            fn red(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            fn avg(sum: Self, n: usize) -> Self {
                sum / (n as $t)
            }
        }
    )*};
}
int_v!(u8, i32, i64);

macro_rules! float_v {
    ($($t:ty, $to:expr, $from:expr, $range:expr);*) => {$(
        impl V for $t {
            fn gen(x: u64, op: ReduceOp) -> Self {
                let v = match op {
                    ReduceOp::Prod => [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0][(x % 6) as usize],
                    // Integers small enough that any partial sum of 8 is exact.
                    _ => ((x % (2 * $range + 1)) as i64 - $range) as f64,
                };
                $from(v)
            }
            fn red(op: ReduceOp, a: Self, b: Self) -> Self {
                let (a, b): (f64, f64) = ($to(a), $to(b));
                $from(match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + b,
                    ReduceOp::Prod => a * b,
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                })
            }
            fn avg(sum: Self, n: usize) -> Self {
                // Rounding the f64 quotient again is the correctly rounded quotient
                // for formats of at most 24 bits of precision (53 >= 2*24 + 2).
                $from($to(sum) / n as f64)
            }
        }
    )*};
}
float_v!(
    f16, |v: f16| v.to_f64(), f16::from_f64, 255;
    bf16, |v: bf16| v.to_f64(), bf16::from_f64, 32;
    f32, |v: f32| v as f64, |v: f64| v as f32, 100_000;
    f64, |v: f64| v, |v: f64| v, 100_000
);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Allreduce(Algo),
    Allgather,
    Broadcast(usize),
    ReduceScatter,
}

struct Opts {
    ops: u64,
    seed: u64,
    max_bytes: usize,
    rss_base: u64,
    rss_slack: f64,
    rss_every: u64,
}

fn parse() -> Opts {
    let mut o = Opts {
        ops: 10_000,
        seed: 1,
        max_bytes: 8 << 20,
        rss_base: 0,
        rss_slack: 0.10,
        rss_every: 0,
    };
    let mut base = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| die(2, &format!("{a} needs a value")))
                .clone()
        };
        let bad = |v: &str| -> ! { die(2, &format!("{a}: bad value {v:?}")) };
        match a.as_str() {
            "--ops" => {
                let v = val();
                o.ops = v.parse().unwrap_or_else(|_| bad(&v))
            }
            "--seed" => {
                let v = val();
                o.seed = v.parse().unwrap_or_else(|_| bad(&v))
            }
            "--max-bytes" => {
                let v = val();
                o.max_bytes = v.parse().unwrap_or_else(|_| bad(&v))
            }
            "--rss-base" => {
                let v = val();
                base = Some(v.parse().unwrap_or_else(|_| bad(&v)))
            }
            "--rss-every" => {
                let v = val();
                o.rss_every = v.parse().unwrap_or_else(|_| bad(&v))
            }
            "--rss-slack" => {
                let v = val();
                o.rss_slack = v.parse().unwrap_or_else(|_| bad(&v))
            }
            _ => die(
                2,
                &format!("unknown argument {a}; see the doc comment of examples/soak.rs"),
            ),
        }
    }
    o.rss_base = base.unwrap_or((o.ops / 4).min(1000));
    o
}

fn die(code: i32, msg: &str) -> ! {
    err_line(format!("soak: {msg}"));
    std::process::exit(code)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// FNV-style hash over 8-byte words (and the tail).
fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        h = (h ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(0x0100_0000_01b3);
    }
    for &x in chunks.remainder() {
        h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

struct Op {
    k: u64,
    kind: Kind,
    op: ReduceOp,
    bytes: usize,
    b: usize,
    tab_seed: u64,
}

/// Run op `o` on dtype `T`; returns the hash of this rank's result (0 for
/// reduce_scatter, whose results differ by rank).
fn run<T: V>(comm: &Communicator, o: &Op, a: &mut [u64], b: &mut [u64]) -> Result<u64, String> {
    let (rank, n) = (comm.rank(), comm.size());
    let elem = std::mem::size_of::<T>();
    let tab: Vec<T> = (0..PERIOD)
        .map(|j| T::gen(mix(o.tab_seed ^ j as u64), o.op))
        .collect();
    let input = |r: usize, i: usize| tab[(i + r * o.b) % PERIOD];
    // Reference over one period: the reduction of every rank's value.
    let reduced = |apply_avg: bool| -> Vec<T> {
        (0..PERIOD)
            .map(|j| {
                let mut acc = input(0, j);
                for r in 1..n {
                    acc = T::red(o.op, acc, input(r, j));
                }
                if apply_avg && o.op == ReduceOp::Avg {
                    T::avg(acc, n)
                } else {
                    acc
                }
            })
            .collect()
    };
    let a: &mut [T] = cast_mut(&mut bytes_of(a)[..o.bytes / elem * elem]).expect("aligned");
    let count = a.len();
    let mismatch = |what: &str, i: usize, got: T, want: T| {
        Err(format!(
            "{what}: element {i} of {count}: got {got:?}, want {want:?}"
        ))
    };
    match o.kind {
        Kind::Allreduce(algo) => {
            for (i, x) in a.iter_mut().enumerate() {
                *x = input(rank, i);
            }
            comm.allreduce_with(a, o.op, algo)
                .map_err(|e| e.to_string())?;
            let want = reduced(true);
            for (i, x) in a.iter().enumerate() {
                if *x != want[i % PERIOD] {
                    return mismatch("allreduce", i, *x, want[i % PERIOD]);
                }
            }
            Ok(hash_bytes(as_bytes(a)))
        }
        Kind::Allgather | Kind::ReduceScatter => {
            let c = count / n;
            let (big, small) = (&mut a[..c * n], b);
            let small: &mut [T] = cast_mut(&mut bytes_of(small)[..c * elem]).expect("aligned");
            if let Kind::Allgather = o.kind {
                for (i, x) in small.iter_mut().enumerate() {
                    *x = input(rank, i);
                }
                comm.allgather(small, big).map_err(|e| e.to_string())?;
                for (i, x) in big.iter().enumerate() {
                    let want = input(i / c.max(1), i % c.max(1));
                    if *x != want {
                        return mismatch("allgather", i, *x, want);
                    }
                }
                Ok(hash_bytes(as_bytes(big)))
            } else {
                for (i, x) in big.iter_mut().enumerate() {
                    *x = input(rank, i);
                }
                comm.reduce_scatter(big, small, o.op)
                    .map_err(|e| e.to_string())?;
                let want = reduced(true);
                for (i, x) in small.iter().enumerate() {
                    let w = want[(rank * c + i) % PERIOD];
                    if *x != w {
                        return mismatch("reduce_scatter", i, *x, w);
                    }
                }
                // Each rank holds a different part: nothing to compare across ranks.
                Ok(0)
            }
        }
        Kind::Broadcast(root) => {
            for (i, x) in a.iter_mut().enumerate() {
                *x = input(rank, i);
            }
            comm.broadcast(a, root).map_err(|e| e.to_string())?;
            for (i, x) in a.iter().enumerate() {
                if *x != input(root, i) {
                    return mismatch("broadcast", i, *x, input(root, i));
                }
            }
            Ok(hash_bytes(as_bytes(a)))
        }
    }
}

fn bytes_of(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding; every byte pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
}

/// Run every kind (and every allreduce algorithm) once at the largest size, so
/// the library's and the allocator's buffers reach their high-water marks
/// before the memory baseline is taken.
fn warm_up(comm: &Communicator, a: &mut [u64], b: &mut [u64]) {
    let n = comm.size();
    let fail = |what: &str, e: String| -> ! {
        die(1, &format!("rank {}: warm-up {what}: {e}", comm.rank()))
    };
    let a: &mut [f32] = cast_mut(bytes_of(a)).expect("aligned");
    let b: &mut [f32] = cast_mut(bytes_of(b)).expect("aligned");
    let c = a.len() / n;
    for algo in ALGOS {
        a.fill(1.0);
        comm.allreduce_with(a, ReduceOp::Sum, algo)
            .unwrap_or_else(|e| fail("allreduce", e.to_string()));
        if a.iter().any(|&x| x != n as f32) {
            fail("allreduce", format!("{algo:?}: wrong sum"));
        }
    }
    b[..c].fill(1.0);
    comm.allgather(&b[..c], &mut a[..c * n])
        .unwrap_or_else(|e| fail("allgather", e.to_string()));
    comm.reduce_scatter(&a[..c * n], &mut b[..c], ReduceOp::Sum)
        .unwrap_or_else(|e| fail("reduce_scatter", e.to_string()));
    comm.broadcast(&mut a[..], 0)
        .unwrap_or_else(|e| fail("broadcast", e.to_string()));
    if b[..c].iter().any(|&x| x != n as f32) || a[..c * n].iter().any(|&x| x != 1.0) {
        fail("collectives", "wrong result".into());
    }
}

const ALGOS: [Algo; 5] = [Algo::Ring, Algo::Tree, Algo::Rhd, Algo::Rd, Algo::Binomial];
const OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];
const DTYPES: [&str; 7] = ["u8", "i32", "i64", "f16", "bf16", "f32", "f64"];

fn main() {
    let o = parse();
    let comm = Communicator::from_env().unwrap_or_else(|e| die(1, &e.to_string()));
    let (rank, n) = (comm.rank(), comm.size());
    let words = o.max_bytes / 8 + 1;
    // Allocated and touched once, so VmRSS holds them from the start.
    let mut a = vec![1u64; words];
    let mut b = vec![1u64; words];
    warm_up(&comm, &mut a, &mut b);
    let t0 = Instant::now();
    let mut acc = 0u64;
    let mut total = 0u64;
    // Injected delays of this rank: count and total sleep (ms).
    let (mut delays, mut delay_ms) = (0u64, 0u64);
    let mut rss_base = 0;
    let max_log = (o.max_bytes.max(2) as f64).log2();
    for k in 0..o.ops {
        let r = |salt: u64| mix(o.seed.wrapping_mul(0x1000_0000_01b3) ^ mix(k ^ (salt << 48)));
        let dtype = DTYPES[(r(1) % 7) as usize];
        let mut op = OPS[(r(2) % 5) as usize];
        let float = matches!(dtype, "f16" | "bf16" | "f32" | "f64");
        // A float average is exact against the reference only when dividing by n is.
        if op == ReduceOp::Avg && float && !n.is_power_of_two() {
            op = ReduceOp::Sum;
        }
        let kind = match r(3) % 10 {
            0 => Kind::Allgather,
            1 => Kind::Broadcast((r(4) % n as u64) as usize),
            2 => Kind::ReduceScatter,
            _ => Kind::Allreduce(ALGOS[(r(5) % 5) as usize]),
        };
        let bytes = if r(6) % 20 == 0 {
            0
        } else {
            let u = (r(7) >> 11) as f64 / (1u64 << 53) as f64;
            (2f64.powf(u * max_log) as usize).min(o.max_bytes)
        };
        let opd = Op {
            k,
            kind,
            op,
            bytes,
            b: 1 + (r(8) % (PERIOD as u64 - 1)) as usize,
            tab_seed: r(9),
        };
        if r(10) % 50 == 0 && (r(11) % n as u64) as usize == rank {
            let ms = r(12) % 20;
            std::thread::sleep(Duration::from_millis(ms));
            delays += 1;
            delay_ms += ms;
        }
        let res = match dtype {
            "u8" => run::<u8>(&comm, &opd, &mut a, &mut b),
            "i32" => run::<i32>(&comm, &opd, &mut a, &mut b),
            "i64" => run::<i64>(&comm, &opd, &mut a, &mut b),
            "f16" => run::<f16>(&comm, &opd, &mut a, &mut b),
            "bf16" => run::<bf16>(&comm, &opd, &mut a, &mut b),
            "f32" => run::<f32>(&comm, &opd, &mut a, &mut b),
            _ => run::<f64>(&comm, &opd, &mut a, &mut b),
        };
        let what = format!(
            "op {} ({:?} {dtype} {:?} {} bytes)",
            opd.k, opd.kind, opd.op, opd.bytes
        );
        match res {
            Ok(h) => acc = acc.rotate_left(5) ^ h,
            Err(e) if e.contains(": element ") => {
                die(3, &format!("rank {rank}: {what}: WRONG {e}"))
            }
            Err(e) => die(1, &format!("rank {rank}: {what}: error: {e}")),
        }
        total += bytes as u64;
        if (k + 1) % 100 == 0 || k + 1 == o.ops {
            let mut all = vec![0i64; n];
            comm.allgather(&[acc as i64], &mut all)
                .unwrap_or_else(|e| die(1, &format!("rank {rank}: hash allgather: {e}")));
            if all.iter().any(|&h| h as u64 != acc) {
                die(
                    3,
                    &format!("rank {rank}: after op {k}: ranks' result hashes differ: {all:x?}"),
                );
            }
        }
        if o.rss_every > 0 && (k + 1) % o.rss_every == 0 {
            println!("rank {rank}: rss_kb={} at op {}", rss_kb(), k + 1);
        }
        if k + 1 == o.rss_base {
            rss_base = rss_kb();
            println!("rank {rank}: rss_kb={rss_base} after op {}", k + 1);
        }
    }
    let rss_end = rss_kb();
    let growth = if rss_base > 0 {
        (rss_end as f64 / rss_base as f64 - 1.0) * 100.0
    } else {
        0.0
    };
    println!(
        "rank {rank}: soak ok ops={} bytes={total} secs={:.1} rss_kb_base={rss_base} (op {}) rss_kb_end={rss_end} growth={growth:.1}% hash={acc:016x} delays={delays} delay_ms={delay_ms}",
        o.ops,
        t0.elapsed().as_secs_f64(),
        o.rss_base
    );
    if growth > o.rss_slack * 100.0 {
        die(
            4,
            &format!(
                "rank {rank}: resident memory grew {growth:.1}% (from {rss_base} kB after op {} to {rss_end} kB)",
                o.rss_base
            ),
        );
    }
}

/// Write one whole line to stderr in a single write, so a launcher that reads
/// several ranks never splits or interleaves it.
fn err_line(mut s: String) {
    use std::io::Write;
    s.push('\n');
    let _ = std::io::stderr().write_all(s.as_bytes());
}
