//! The engine against serial references: random named tensor sets submitted
//! in a different order on every rank, mismatches, duplicates, join, stalls
//! and the timeline. Ranks are threads over loopback TCP.

mod common;

use common::{fingerprint, first_diff, input, mix, reference, run_ranks, run_ranks_with, TestElem};
use half::{bf16, f16};
use kolo::engine::{Engine, Handle, Op};
use kolo::{DType, Error, ReduceOp};
use std::time::Duration;

#[derive(Debug, Clone)]
enum Kind {
    Allreduce(ReduceOp),
    Broadcast(usize),
    Allgather,
    ReduceScatter(ReduceOp),
    Alltoall,
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    dtype: DType,
    kind: Kind,
    /// Elements (per rank block for reduce-scatter/alltoall, base for allgather).
    count: usize,
    seed: u64,
}

/// The same list on every rank: mostly small tensors, some up to 4 MiB.
fn cases(seed: u64, n: usize, max: usize) -> Vec<Case> {
    let t = 1 + (mix(seed) % max as u64) as usize;
    (0..t)
        .map(|i| {
            let r = mix(seed ^ (i as u64) << 20);
            let dtype = DType::ALL[(r % 7) as usize];
            let op = ReduceOp::ALL[((r >> 8) % 5) as usize];
            let bytes_cap = match (r >> 16) % 20 {
                0 => 4 << 20,
                1..=4 => 64 << 10,
                _ => 1024,
            };
            let count = ((r >> 24) as usize % (bytes_cap / dtype.size() + 1)).max(if i % 17 == 0 {
                0
            } else {
                1
            });
            let count = if i % 17 == 0 { 0 } else { count };
            let kind = match (r >> 40) % 10 {
                0 => Kind::Broadcast((r >> 44) as usize % n),
                1 => Kind::Allgather,
                2 => Kind::ReduceScatter(op),
                3 => Kind::Alltoall,
                _ => Kind::Allreduce(op),
            };
            let count = match kind {
                Kind::ReduceScatter(_) | Kind::Alltoall | Kind::Allgather => count / n.max(1) / 4,
                _ => count,
            };
            Case {
                name: format!("t{i}.{}", dtype.name()),
                dtype,
                kind,
                count,
                seed: r,
            }
        })
        .collect()
}

type Check = Box<dyn FnOnce() -> Result<u64, String>>;

fn submit<T: TestElem + Default>(e: &Engine, c: &Case) -> Check {
    let (rank, n) = (e.rank(), e.size());
    let gen = |op: ReduceOp, r: usize, len: usize, off: usize| -> Vec<T> {
        (0..len)
            .map(|i| input::<T>(op, c.seed, r, off + i))
            .collect()
    };
    let (h, want): (kolo::Result<Handle<Vec<T>>>, Vec<T>) = match c.kind {
        Kind::Allreduce(op) => (
            e.allreduce_async(&c.name, gen(op, rank, c.count, 0), op),
            reference::<T>(op, c.seed, n, c.count),
        ),
        Kind::Broadcast(root) => (
            e.broadcast_async(&c.name, gen(ReduceOp::Sum, rank, c.count, 0), root),
            gen(ReduceOp::Sum, root, c.count, 0),
        ),
        Kind::Allgather => (
            // Rank r contributes count + r rows of 3.
            e.submit(
                Op::allgather(&c.name, gen(ReduceOp::Sum, rank, (c.count + rank) * 3, 0))
                    .shape(&[c.count + rank, 3]),
            ),
            (0..n)
                .flat_map(|r| gen(ReduceOp::Sum, r, (c.count + r) * 3, 0))
                .collect(),
        ),
        Kind::ReduceScatter(op) => (
            e.reduce_scatter_async(&c.name, gen(op, rank, c.count * n, 0), op),
            reference::<T>(op, c.seed, n, c.count * n)[rank * c.count..(rank + 1) * c.count]
                .to_vec(),
        ),
        Kind::Alltoall => (
            e.alltoall_async(&c.name, gen(ReduceOp::Sum, rank, c.count * n, 0)),
            (0..n)
                .flat_map(|r| gen(ReduceOp::Sum, r, c.count, rank * c.count))
                .collect(),
        ),
    };
    let name = c.name.clone();
    // Reduce-scatter and alltoall results differ per rank by design.
    let same_everywhere = !matches!(c.kind, Kind::ReduceScatter(_) | Kind::Alltoall);
    Box::new(move || {
        let got = h
            .map_err(|e| format!("{name}: submit: {e}"))?
            .wait()
            .map_err(|e| format!("{name}: {e}"))?;
        match first_diff(&got, &want) {
            None if same_everywhere => Ok(fingerprint(&got)),
            None => Ok(0),
            Some(i) => Err(format!(
                "rank {rank}: {name}: element {i} of {}: got {:?}, want {:?}",
                want.len(),
                got.get(i),
                want.get(i)
            )),
        }
    })
}

fn submit_any(e: &Engine, c: &Case) -> Check {
    match c.dtype {
        DType::U8 => submit::<u8>(e, c),
        DType::I32 => submit::<i32>(e, c),
        DType::I64 => submit::<i64>(e, c),
        DType::F16 => submit::<f16>(e, c),
        DType::BF16 => submit::<bf16>(e, c),
        DType::F32 => submit::<f32>(e, c),
        DType::F64 => submit::<f64>(e, c),
    }
}

/// A rank-specific permutation.
fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
    let mut v = v.to_vec();
    for i in (1..v.len()).rev() {
        let j = (mix(seed ^ i as u64) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn run_random(n: usize, seed: u64, max: usize, steps: usize, fusion: usize) {
    let list = cases(seed, n, max);
    let res = run_ranks_with(
        n,
        |c| c.fusion_threshold = fusion,
        |comm| {
            let rank = comm.rank();
            let engine = Engine::start(comm).expect("engine");
            let mut prints = Vec::new();
            for step in 0..steps {
                let order = shuffled(&list, seed ^ (rank as u64 + 1) << 32 ^ step as u64);
                let checks: Vec<(String, Check)> = order
                    .iter()
                    .map(|c| (c.name.clone(), submit_any(&engine, c)))
                    .collect();
                let mut got: Vec<(String, u64)> = checks
                    .into_iter()
                    .map(|(name, check)| {
                        (name, check().unwrap_or_else(|e| panic!("step {step}: {e}")))
                    })
                    .collect();
                got.sort();
                prints.push(got);
            }
            engine.shutdown().expect("shutdown");
            prints
        },
    );
    for r in 1..n {
        assert_eq!(res[r], res[0], "rank {r} differs from rank 0 bitwise");
    }
}

#[test]
fn random_sets_every_world_size() {
    for n in 1..=6 {
        // Two steps: the second runs from the response cache.
        let t = std::time::Instant::now();
        run_random(n, 0x5eed ^ n as u64, 300, 2, 64 << 20);
        eprintln!("n={n}: {:?}", t.elapsed());
    }
}

#[test]
fn random_sets_small_fusion_buffer() {
    // A threshold smaller than most tensors forces many batches and tensors alone.
    run_random(4, 77, 120, 2, 4096);
    run_random(3, 78, 60, 1, 0);
}

#[test]
fn mismatches_fail_on_every_rank_and_the_engine_goes_on() {
    let res = run_ranks(3, |comm| {
        let rank = comm.rank();
        let e = Engine::start(comm).unwrap();
        let mut msgs = Vec::new();
        // Shape: rank 1 differs.
        let len = if rank == 1 { 5 } else { 4 };
        msgs.push(
            e.allreduce_async("w", vec![1.0f32; len], ReduceOp::Sum)
                .unwrap()
                .wait(),
        );
        // Dtype: rank 2 sends f64.
        msgs.push(
            if rank == 2 {
                e.allreduce_async("d", vec![1.0f64; 4], ReduceOp::Sum)
                    .unwrap()
                    .wait()
                    .map(|_| ())
            } else {
                e.allreduce_async("d", vec![1.0f32; 4], ReduceOp::Sum)
                    .unwrap()
                    .wait()
                    .map(|_| ())
            }
            .map(|_| vec![]),
        );
        // Op: rank 0 asks for max.
        let op = if rank == 0 {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        };
        msgs.push(e.allreduce_async("o", vec![1.0f32; 4], op).unwrap().wait());
        // Root: rank 2 names another root.
        let root = if rank == 2 { 1 } else { 0 };
        msgs.push(
            e.broadcast_async("b", vec![1.0f32; 4], root)
                .unwrap()
                .wait(),
        );
        // Duplicate name while in flight: refused at once, the first still runs.
        let h = e
            .allreduce_async("dup", vec![rank as i32; 3], ReduceOp::Sum)
            .unwrap();
        let dup = e.allreduce_async("dup", vec![0i32; 3], ReduceOp::Sum).err();
        let first = h.wait();
        // And a correct op afterwards.
        let ok = e
            .allreduce_async("ok", vec![2i64; 3], ReduceOp::Sum)
            .unwrap()
            .wait();
        (msgs, dup, first, ok)
    });
    for (rank, (msgs, dup, first, ok)) in res.into_iter().enumerate() {
        let what = ["shape", "dtype", "op", "root"];
        for (m, w) in msgs.iter().zip(what) {
            let e = m.as_ref().expect_err("mismatch must fail");
            let s = e.to_string();
            assert!(matches!(e, Error::Mismatch { .. }), "rank {rank}: {s}");
            assert!(
                s.contains(w) && s.contains(&format!("rank {rank}")),
                "rank {rank}: {s}"
            );
            assert!(s.contains("tensor"), "names the tensor: {s}");
        }
        let d = dup.expect("duplicate refused").to_string();
        assert!(d.contains("\"dup\"") && d.contains("in flight"), "{d}");
        assert_eq!(first.unwrap(), vec![3; 3]);
        assert_eq!(ok.unwrap(), vec![6; 3]);
    }
}

#[test]
fn join_averages_over_ranks_with_data() {
    let n = 4;
    let res = run_ranks(n, |comm| {
        let rank = comm.rank();
        let e = Engine::start(comm).unwrap();
        let steps = 2 + rank; // rank 3 has the most data
        let mut out = Vec::new();
        for s in 0..steps {
            let v = (rank + 1) as f64;
            let a = e.allreduce_async("avg", vec![v; 5], ReduceOp::Avg).unwrap();
            let m = e
                .allreduce_async("max", vec![-v - s as f64; 2], ReduceOp::Max)
                .unwrap();
            let p = e
                .allreduce_async("prod", vec![2i32; 3], ReduceOp::Prod)
                .unwrap();
            out.push((
                s,
                a.wait().unwrap()[0],
                m.wait().unwrap()[0],
                p.wait().unwrap()[0],
            ));
        }
        let last = e.join().unwrap();
        // The engine is usable again afterwards, with every rank.
        let after = e
            .allreduce_async("after", vec![1u8; 2], ReduceOp::Sum)
            .unwrap()
            .wait()
            .unwrap();
        (out, last, after)
    });
    for (rank, (out, last, after)) in res.into_iter().enumerate() {
        assert_eq!(last, 3, "rank {rank}");
        assert_eq!(after, vec![n as u8; 2]);
        for (s, avg, max, prod) in out {
            let active: Vec<usize> = (0..n).filter(|r| 2 + r > s).collect();
            let want = active.iter().map(|&r| (r + 1) as f64).sum::<f64>() / active.len() as f64;
            assert_eq!(avg, want, "rank {rank} step {s}: divide by ranks with data");
            assert_eq!(
                max,
                -(active[0] as f64 + 1.0) - s as f64,
                "rank {rank} step {s}"
            );
            assert_eq!(prod, 1 << active.len(), "rank {rank} step {s}");
        }
    }
}

#[test]
fn stall_shutdown_names_the_missing_rank() {
    let res = run_ranks_with(
        3,
        |c| {
            c.stall_warning = Duration::from_millis(200);
            c.stall_shutdown = Some(Duration::from_secs(1));
        },
        |comm| {
            let rank = comm.rank();
            let e = Engine::start(comm).unwrap();
            let lonely = (rank != 2).then(|| {
                e.allreduce_async("lonely", vec![1.0f32; 8], ReduceOp::Sum)
                    .unwrap()
                    .wait()
            });
            if rank == 2 {
                // Submit "after" once the others are past "lonely", so that
                // it does not stall itself.
                std::thread::sleep(Duration::from_millis(1500));
            }
            let after = e
                .allreduce_async("after", vec![1i32; 1], ReduceOp::Sum)
                .unwrap()
                .wait();
            (lonely, after)
        },
    );
    for (rank, (lonely, after)) in res.into_iter().enumerate() {
        if let Some(r) = lonely {
            let e = r.expect_err("stalled tensor fails").to_string();
            assert!(
                e.contains("\"lonely\"") && e.contains("[2]") && e.contains("stalled"),
                "rank {rank}: {e}"
            );
        }
        assert_eq!(after.unwrap(), vec![3], "rank {rank}");
    }
}

/// Issue 23 item 8: ranks 0 and 2 give step N of "w" up after the stall
/// shutdown and resubmit "w" for step N+1 with other data. Rank 1's late
/// step N must fail on rank 1 rather than be summed with their step N+1;
/// their step N+1 runs with rank 1's, and a later step is exact everywhere.
#[test]
fn stall_cancel_never_mixes_steps() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Ranks 0 and 2 have resubmitted: rank 1 may send its late step N.
    let resubmitted = AtomicUsize::new(0);
    let res = run_ranks_with(
        3,
        |c| {
            c.stall_warning = Duration::from_millis(500);
            c.stall_shutdown = Some(Duration::from_secs(2));
        },
        |comm| {
            let rank = comm.rank();
            let e = Engine::start(comm).unwrap();
            let w = |v: f32| e.allreduce_async("w", vec![v; 16], ReduceOp::Sum);
            // A common step first, so that "w" is negotiated and cached.
            let warm = w(0.5).and_then(|h| h.wait());
            let (step_n, step_n1) = if rank == 1 {
                let t = std::time::Instant::now();
                while resubmitted.load(Ordering::SeqCst) < 2 {
                    assert!(
                        t.elapsed() < Duration::from_secs(30),
                        "ranks 0, 2 never resubmitted"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                let n = w(1.0).and_then(|h| h.wait());
                (n, w(1000.0).and_then(|h| h.wait()))
            } else {
                let n = w(1.0).and_then(|h| h.wait());
                let next = w(1000.0);
                resubmitted.fetch_add(1, Ordering::SeqCst);
                (n, next.and_then(|h| h.wait()))
            };
            let fresh = e
                .allreduce_async("fresh", vec![rank as f64 + 0.25; 5], ReduceOp::Sum)
                .and_then(|h| h.wait());
            (warm, step_n, step_n1, fresh)
        },
    );
    for (rank, (warm, step_n, step_n1, fresh)) in res.into_iter().enumerate() {
        assert_eq!(warm.unwrap(), vec![1.5; 16], "rank {rank}");
        // Only step N+1's sum, 3000, may come out: 2001 or 1002 mix steps.
        if let Ok(v) = &step_n {
            panic!("rank {rank}: step N of \"w\" ran, giving {:?}", v[0]);
        }
        let e = step_n.unwrap_err().to_string();
        let want: &[&str] = if rank == 1 {
            &["\"w\"", "rank 1", "[0, 2]", "KOLO_STALL_SHUTDOWN_S"]
        } else {
            &["\"w\"", "stalled", "[1]"]
        };
        assert!(want.iter().all(|w| e.contains(w)), "rank {rank}: {e}");
        assert_eq!(
            step_n1.unwrap(),
            vec![3000.0; 16],
            "rank {rank}: step N+1 mixed with step N"
        );
        assert_eq!(fresh.unwrap(), vec![3.75; 5], "rank {rank}");
    }
}

#[test]
fn groups_and_raw_buffers() {
    let res = run_ranks(3, |comm| {
        let rank = comm.rank();
        let e = Engine::start(comm).unwrap();
        let mut g = e.group("g");
        let a = g.add(Op::allreduce("ga", vec![rank as f32; 4], ReduceOp::Sum));
        let b = g.add(Op::broadcast("gb", vec![rank as i64; 2], 2));
        g.submit().unwrap();
        let mut raw = vec![1.5f64; 7];
        let h = unsafe {
            e.allreduce_async_raw(
                "raw",
                raw.as_mut_ptr().cast(),
                raw.len(),
                DType::F64,
                ReduceOp::Avg,
            )
            .unwrap()
        };
        h.wait().unwrap();
        (a.wait().unwrap(), b.wait().unwrap(), raw)
    });
    for (a, b, raw) in res {
        assert_eq!(a, vec![3.0; 4]);
        assert_eq!(b, vec![2; 2]);
        assert_eq!(raw, vec![1.5; 7]);
    }
}

#[test]
fn timeline_is_valid_json_with_every_phase() {
    let dir = std::env::temp_dir().join(format!("kolo-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("tl");
    run_ranks_with(
        2,
        |c| c.timeline = Some(prefix.clone()),
        |comm| {
            let e = Engine::start(comm).unwrap();
            let hs: Vec<_> = (0..5)
                .map(|i| {
                    e.allreduce_async(&format!("t{i}"), vec![1.0f32; 100], ReduceOp::Sum)
                        .unwrap()
                })
                .collect();
            for h in hs {
                h.wait().unwrap();
            }
            e.broadcast_async("bc", vec![1u8; 10], 0)
                .unwrap()
                .wait()
                .unwrap();
            e.shutdown().unwrap();
        },
    );
    for r in 0..2 {
        let path = dir.join(format!("tl.{r}.json"));
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let names: Vec<String> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str().map(String::from))
            .collect();
        for phase in [
            "NEGOTIATE",
            "QUEUE",
            "COPY_IN",
            "ALLREDUCE",
            "COPY_OUT",
            "BROADCAST",
        ] {
            assert!(
                names.iter().any(|n| n == phase),
                "rank {r}: no {phase} in {path:?}"
            );
        }
    }
    // scripts/merge-timeline puts both ranks into one file.
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/scripts/merge-timeline"))
        .arg(&prefix)
        .output()
        .expect("python3 runs scripts/merge-timeline");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tl.json")).unwrap()).unwrap();
    let pids: std::collections::BTreeSet<u64> = merged["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["pid"].as_u64())
        .collect();
    assert_eq!(pids.into_iter().collect::<Vec<_>>(), [0, 1]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_hands_back_a_working_communicator() {
    let res = run_ranks(3, |mut comm| {
        let rank = comm.rank();
        let mut sums = Vec::new();
        for round in 0..3 {
            let e = Engine::start(comm).unwrap();
            // Ranks finish their engine work at different times.
            std::thread::sleep(Duration::from_millis(20 * rank as u64));
            let h = e
                .allreduce_async(&format!("r{round}"), vec![rank as i32; 4], ReduceOp::Sum)
                .unwrap();
            sums.push(h.wait().unwrap()[0]);
            comm = e.shutdown().unwrap();
            let mut v = vec![1i64; 3];
            comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
            sums.push(v[0] as i32);
        }
        sums
    });
    for s in res {
        assert_eq!(s, [3, 3, 3, 3, 3, 3]);
    }
}

#[test]
fn compressed_tensors_per_name() {
    use kolo::compress::Compression;
    let n = 3;
    let res = run_ranks(n, |comm| {
        let rank = comm.rank();
        let e = Engine::start(comm).unwrap();
        let fp16 = Compression::Fp16;
        let topk = Compression::parse("topk:0.01").unwrap();
        // Small fp16 tensors fuse; values are small integers.
        let hs: Vec<_> = (0..5)
            .map(|i| {
                let v: Vec<f32> = (0..300).map(|j| ((rank + i + j) % 7) as f32).collect();
                e.submit(Op::allreduce(&format!("h{i}"), v, ReduceOp::Sum).compression(&fp16))
                    .unwrap()
            })
            .collect();
        // Top-k: each rank has 40 spikes (k = 1% of 4096 = 40) over tiny noise.
        let spikes: Vec<f32> = (0..4096)
            .map(|j| {
                if j % 100 == rank {
                    100.0 + rank as f32
                } else {
                    1e-3
                }
            })
            .collect();
        let t = e
            .submit(Op::allreduce("spiky", spikes, ReduceOp::Avg).compression(&topk))
            .unwrap();
        // Ranks disagreeing on compression fail on both sides.
        let c = if rank == 0 {
            Compression::None
        } else {
            fp16.clone()
        };
        let bad = e
            .submit(Op::allreduce("bad", vec![1.0f32; 8], ReduceOp::Sum).compression(&c))
            .unwrap()
            .wait();
        let refused = e
            .submit(Op::allreduce("ints", vec![1i32; 8], ReduceOp::Sum).compression(&fp16))
            .err();
        let h: Vec<Vec<f32>> = hs.into_iter().map(|h| h.wait().unwrap()).collect();
        (h, t.wait().unwrap(), bad, refused)
    });
    for (rank, (h, t, bad, refused)) in res.iter().enumerate() {
        for (i, v) in h.iter().enumerate() {
            for (j, x) in v.iter().enumerate() {
                let want: f32 = (0..n).map(|r| ((r + i + j) % 7) as f32).sum();
                assert!(
                    (x - want).abs() <= want * 2e-3,
                    "rank {rank} h{i}[{j}]: {x} vs {want}"
                );
            }
            assert_eq!(v, &res[0].0[i], "fp16 results bitwise equal");
        }
        for (j, x) in t.iter().enumerate() {
            let want = if j % 100 < n {
                (100.0 + (j % 100) as f32) / n as f32
            } else {
                0.0
            };
            assert_eq!(*x, want, "rank {rank} spiky[{j}]");
        }
        let e = bad.as_ref().expect_err("compression mismatch").to_string();
        assert!(e.contains("compression"), "{e}");
        assert!(refused.as_ref().unwrap().to_string().contains("float32"));
    }
}

/// A name resubmitted with another shape, dtype or op after it was cached is
/// negotiated afresh (not mistaken for the cached spec), step after step;
/// each change comes after a step with an unchanged spec, so it meets the
/// engine's remembered lookup.
#[test]
fn a_cached_name_with_a_new_spec_is_negotiated_again() {
    // (elements, float64, max) of "w" at each step.
    const PLAN: [(usize, bool, bool); 10] = [
        (4, false, false),
        (4, false, false),
        (4, false, false),
        (6, false, false),
        (6, false, false),
        (6, true, false),
        (6, true, false),
        (6, true, true),
        (6, true, true),
        (4, false, false),
    ];
    let res = run_ranks(3, |comm| {
        let rank = comm.rank();
        let e = Engine::start(comm).unwrap();
        let mut seen = Vec::new();
        for &(len, wide, max) in &PLAN {
            let v = (rank + 1) as f32;
            let op = if max { ReduceOp::Max } else { ReduceOp::Sum };
            // "b" never changes.
            let hb = e.allreduce_async("b", vec![v; 3], ReduceOp::Sum).unwrap();
            let w: Vec<f64> = if wide {
                let h = e.allreduce_async("w", vec![v as f64; len], op).unwrap();
                h.wait().unwrap()
            } else {
                let h = e.allreduce_async("w", vec![v; len], op).unwrap();
                h.wait().unwrap().into_iter().map(f64::from).collect()
            };
            seen.push((hb.wait().unwrap(), w));
        }
        e.shutdown().unwrap();
        seen
    });
    for seen in res {
        for (step, (b, w)) in seen.into_iter().enumerate() {
            let (len, _, max) = PLAN[step];
            assert_eq!(b, [6.0; 3], "step {step}");
            assert_eq!(w, vec![if max { 3.0 } else { 6.0 }; len], "step {step}");
        }
    }
}

#[test]
fn wait_timeout_returns_while_a_peer_is_late_and_then_the_result() {
    let got = run_ranks(2, |comm| {
        let r = comm.rank();
        let e = Engine::start(comm).unwrap();
        if r == 1 {
            // Late by far more than rank 0's first waits.
            std::thread::sleep(Duration::from_millis(600));
        }
        let mut h = e
            .allreduce_async("late", vec![(r + 1) as f64; 1000], ReduceOp::Sum)
            .unwrap();
        let t0 = std::time::Instant::now();
        let mut empty = 0;
        let v = loop {
            match h.wait_timeout(Duration::from_millis(100)).unwrap() {
                Some(v) => break v,
                None => empty += 1,
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "never completed");
        };
        let again = h.wait_timeout(Duration::from_millis(1));
        assert!(matches!(again, Err(Error::InvalidArgument(_))), "{again:?}");
        e.shutdown().unwrap();
        (r, empty, v)
    });
    for (r, empty, v) in got {
        assert!(v.iter().all(|&x| x == 3.0), "rank {r}");
        if r == 0 {
            assert!(
                empty >= 3,
                "rank 0 waited {empty} times in vain, expected several"
            );
        }
    }
}
