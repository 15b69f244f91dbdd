//! Bad input never hangs and never passes silently: mismatched arguments are
//! reported on every rank with the field that differs, a silent peer times out
//! naming it, and a rank that never arrives is named by the others.

mod common;

use common::*;
use kolo::algo::cost::Algo;
use kolo::{Communicator, Error, ReduceOp};
use std::time::{Duration, Instant};

/// Every rank must fail, and its message must mention each of `needles`.
fn assert_all_fail(results: &[kolo::Result<()>], needles: &[&str]) {
    let all: Vec<String> = results.iter().map(|r| format!("{r:?}")).collect();
    let all = all.join("\n");
    for (r, res) in results.iter().enumerate() {
        let e = res.as_ref().expect_err(&format!("rank {r} succeeded"));
        let text = e.to_string();
        for n in needles {
            assert!(
                text.contains(n),
                "rank {r}: {text:?} does not mention {n:?}; all ranks:\n{all}"
            );
        }
        assert!(
            text.starts_with(&format!("rank {r}")) || text.contains(&format!("rank {r}:")),
            "rank {r}: {text:?} does not name the rank"
        );
    }
}

fn quick(c: &mut kolo::Config) {
    c.timeout = Duration::from_secs(20);
}

#[test]
fn count_mismatch_is_reported_on_every_rank() {
    for (n, base) in [(2, 10), (3, 10), (4, 10), (4, 100_000), (5, 100_000)] {
        let res = run_ranks_with(n, quick, |c: Communicator| {
            let count = if c.rank() == 1 { base + 2 } else { base };
            let mut v = vec![1.0f32; count];
            let r = c.allreduce(&mut v, ReduceOp::Sum);
            // The communicator stays failed: the next call reports at once.
            let t = Instant::now();
            assert!(c.barrier().is_err());
            assert!(t.elapsed() < Duration::from_secs(1));
            r
        });
        assert_all_fail(&res, &["mismatch", "count"]);
        // Ranks that talk to rank 1 directly name it and both counts.
        let direct = res.iter().filter(|r| {
            let t = r.as_ref().unwrap_err().to_string();
            t.contains(&format!("{base}")) && t.contains(&format!("{}", base + 2))
        });
        assert!(direct.count() >= 1, "n={n}: {res:?}");
    }
}

#[test]
fn dtype_op_and_collective_mismatches_name_the_field() {
    let res = run_ranks_with(3, quick, |c: Communicator| {
        if c.rank() == 2 {
            c.allreduce(&mut [0.0f64; 64], ReduceOp::Sum)
        } else {
            c.allreduce(&mut [0.0f32; 64], ReduceOp::Sum)
        }
    });
    assert_all_fail(&res, &["mismatch", "dtype"]);
    assert!(res.iter().any(|r| {
        let t = r.as_ref().unwrap_err().to_string();
        t.contains("float") && t.contains("double")
    }));

    let res = run_ranks_with(4, quick, |c: Communicator| {
        let op = if c.rank() == 0 {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        };
        c.allreduce(&mut [1i32; 1 << 16], op)
    });
    assert_all_fail(&res, &["mismatch", "op"]);

    // A broadcast root only sends, so it can finish before the receiver
    // objects; the objection then fails the root's next call.
    let res = run_ranks_with(2, quick, |c: Communicator| {
        let r = if c.rank() == 0 {
            c.broadcast(&mut [0u8; 16], 0)
        } else {
            c.allreduce(&mut [0u8; 16], ReduceOp::Sum)
        };
        r.and_then(|_| c.barrier())
    });
    assert_all_fail(&res, &["mismatch", "collective"]);

    let res = run_ranks_with(3, quick, |c: Communicator| {
        let root = if c.rank() == 1 { 2 } else { 0 };
        c.broadcast(&mut [0u8; 16], root).and_then(|_| c.barrier())
    });
    assert_all_fail(&res, &["mismatch", "root"]);
}

#[test]
fn local_invalid_argument_fails_every_rank() {
    let res = run_ranks_with(4, quick, |c: Communicator| {
        let mut recv = vec![0.0f32; if c.rank() == 3 { 7 } else { 4 * 2 }];
        c.allgather(&[1.0f32, 2.0], &mut recv)
    });
    assert_all_fail(&res, &["allgather"]);
    assert!(
        matches!(res[3], Err(Error::InvalidArgument(_))),
        "{:?}",
        res[3]
    );
    for (r, res) in res.iter().enumerate().take(3) {
        let t = res.as_ref().unwrap_err().to_string();
        assert!(t.contains("rank 3"), "rank {r}: {t}");
    }
}

#[test]
fn silent_peer_times_out_naming_it() {
    let t = Instant::now();
    let res = run_ranks_with(
        2,
        |c| c.timeout = Duration::from_millis(1500),
        |c: Communicator| {
            if c.rank() == 1 {
                // Never joins the allreduce; stays alive past rank 0's deadline.
                std::thread::sleep(Duration::from_millis(2500));
                Ok(())
            } else {
                c.allreduce(&mut [1.0f32; 1000], ReduceOp::Sum)
            }
        },
    );
    let e = res[0].as_ref().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("rank 1") && text.contains("allreduce"),
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// A stopped rank in a ring: the ranks downstream wait on each other, and
/// the first to time out aborts the rest before their own deadlines. Each
/// aborted rank must still say whom it waits on, so that every survivor
/// follows the chain of waits to the stopped rank (rank 2), not to a rank
/// that was only waiting (the CI failure where rank 3 was blamed).
#[test]
fn aborted_ranks_extend_the_chain_of_waits_to_the_stopped_rank() {
    let t = Instant::now();
    let res = run_ranks_with(
        4,
        // Only rank 1 times out; ranks 0 and 3 hear of it first.
        |c| {
            c.timeout = if c.rank == 1 {
                Duration::from_millis(1500)
            } else {
                Duration::from_secs(30)
            }
        },
        |c: Communicator| {
            if c.rank() == 2 {
                // Stopped: never joins, stays alive past the others' errors.
                std::thread::sleep(Duration::from_secs(5));
                return Ok(());
            }
            c.allreduce_with(&mut [1.0f32; 4096], ReduceOp::Sum, Algo::Ring)
        },
    );
    for r in [0, 1, 3] {
        let text = res[r]
            .as_ref()
            .expect_err("a survivor succeeded")
            .to_string();
        assert!(
            text.contains("hung peer rank 2 (") && text.contains("allreduce"),
            "rank {r} does not name rank 2 as the hung peer: {text}"
        );
    }
    assert!(res[2].is_ok());
    assert!(t.elapsed() < Duration::from_secs(15));
}

#[test]
fn missing_rank_is_named_after_the_start_timeout() {
    let store = kolo::rendezvous::StoreServer::bind("127.0.0.1:0").unwrap();
    let port = store.local_addr().port();
    let t = Instant::now();
    let res: Vec<kolo::Result<Communicator>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let mut cfg = config(r, 3, port);
                    cfg.start_timeout = Duration::from_secs(2);
                    Communicator::init(cfg)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(t.elapsed() < Duration::from_secs(10));
    for (r, res) in res.iter().enumerate() {
        let text = res.as_ref().err().expect("init must fail").to_string();
        assert!(
            text.contains("rank 2") || text.contains("ranks 2"),
            "rank {r}: {text}"
        );
    }
}
