//! `Communicator::abort` and `Engine::abort` from a second thread: every rank
//! blocked in a collective returns `Aborted` within a second, whatever it
//! was waiting on, and later calls fail at once instead of hanging.

mod common;

use common::run_ranks_with;
use kolo::engine::Engine;
use kolo::{Error, ReduceOp};
use std::time::{Duration, Instant};

/// When the abort was pulled, for every rank to measure against.
fn since(t0: Instant) -> Duration {
    Instant::now().saturating_duration_since(t0)
}

#[test]
fn abort_from_a_second_thread_ends_every_blocked_rank_within_a_second() {
    // Ranks 0..4 block in an allreduce that rank 4 joins only much later;
    // a watchdog thread on rank 0 aborts after 500 ms.
    let t0 = Instant::now() + Duration::from_secs(3);
    let got = run_ranks_with(
        5,
        |cfg| cfg.timeout = Duration::from_secs(60),
        |c| {
            let r = c.rank();
            // Every rank is connected here: start together.
            std::thread::sleep(t0.saturating_duration_since(Instant::now()));
            if r == 4 {
                std::thread::sleep(Duration::from_secs(4));
            }
            let mut v = vec![1.0f32; 1 << 16];
            let (res, took) = std::thread::scope(|s| {
                if r == 0 {
                    s.spawn(|| {
                        std::thread::sleep(Duration::from_millis(500));
                        c.abort();
                    });
                }
                let res = c.allreduce(&mut v, ReduceOp::Sum);
                (res, since(t0 + Duration::from_millis(500)))
            });
            // Later calls fail at once.
            let t1 = Instant::now();
            let again = c.barrier();
            (r, res, took, again, t1.elapsed())
        },
    );
    for (r, res, took, again, again_took) in got {
        // Heard from rank 0 or passed on by a rank that heard it first.
        match &res {
            Err(e @ Error::Aborted { .. }) if e.to_string().contains("aborted by the caller") => {}
            Err(Error::PeerLost { .. } | Error::Aborted { .. }) if r == 4 => {}
            other => panic!("rank {r}: expected rank 0's abort, got {other:?}"),
        }
        if r < 4 {
            assert!(
                took < Duration::from_secs(1),
                "rank {r} returned {took:?} after the abort"
            );
        }
        assert!(again.is_err(), "rank {r}: a call after the abort succeeded");
        assert!(
            again_took < Duration::from_secs(1),
            "rank {r}: the next call took {again_took:?}"
        );
    }
}

#[test]
fn engine_abort_fails_pending_handles_on_every_rank() {
    let got = run_ranks_with(
        3,
        |cfg| cfg.timeout = Duration::from_secs(60),
        |c| {
            let r = c.rank();
            let e = Engine::start(c).unwrap();
            // Rank 2 never submits "w": the others' handles stay pending.
            let h = (r != 2).then(|| {
                e.allreduce_async("w", vec![1.0f64; 100], ReduceOp::Sum)
                    .unwrap()
            });
            std::thread::sleep(Duration::from_millis(300));
            let t0 = Instant::now();
            if r == 0 {
                e.abort();
            }
            let res = h.map(|h| h.wait());
            let took = t0.elapsed();
            let later = e
                .allreduce_async("x", vec![1.0f64; 4], ReduceOp::Sum)
                .and_then(|h| h.wait());
            (r, res.map(|x| x.map(|_| ())), took, later.is_err())
        },
    );
    for (r, res, took, later_failed) in got {
        if let Some(res) = res {
            assert!(
                res.is_err(),
                "rank {r}: a pending handle completed after the abort"
            );
            assert!(
                took < Duration::from_secs(2),
                "rank {r}: its handle took {took:?}"
            );
        }
        assert!(
            later_failed,
            "rank {r}: a submission after the abort succeeded"
        );
    }
}

/// A rank that is alive but late (computing, here sleeping) keeps beating,
/// so a peer waiting on it for several heartbeat timeouts does not blame
/// it; only `KOLO_TIMEOUT` governs lateness.
#[test]
fn a_late_but_live_rank_is_not_called_frozen() {
    let got = run_ranks_with(
        2,
        |cfg| {
            cfg.heartbeat_timeout = Some(Duration::from_secs(1));
            cfg.timeout = Duration::from_secs(30);
        },
        |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_secs(4));
            }
            let mut v = vec![c.rank() as f32 + 1.0; 1000];
            c.allreduce(&mut v, ReduceOp::Sum).map(|()| v[0])
        },
    );
    for (r, res) in got.into_iter().enumerate() {
        assert_eq!(res.unwrap_or_else(|e| panic!("rank {r}: {e}")), 3.0);
    }
}

/// `Engine::shutdown` (and so `kolo_comm_destroy`) waits for the other
/// ranks at most `KOLO_TIMEOUT`, then aborts: it never blocks for long when a
/// peer never shuts down.
#[test]
fn engine_shutdown_is_bounded_by_the_timeout() {
    let got = run_ranks_with(
        2,
        |cfg| cfg.timeout = Duration::from_secs(2),
        |c| {
            let r = c.rank();
            let e = Engine::start(c).unwrap();
            if r == 1 {
                // Still busy long after rank 0 gave up.
                std::thread::sleep(Duration::from_secs(6));
            }
            let t0 = Instant::now();
            let res = e.shutdown().map(|_| ());
            (r, res, t0.elapsed())
        },
    );
    let (_, res0, took0) = &got[0];
    assert!(res0.is_err(), "rank 0's shutdown cannot have agreed");
    assert!(
        *took0 < Duration::from_secs(4),
        "rank 0's shutdown took {took0:?}"
    );
    let (_, res1, took1) = &got[1];
    assert!(res1.is_err(), "rank 1 shut down alone");
    assert!(
        *took1 < Duration::from_secs(4),
        "rank 1's shutdown took {took1:?}"
    );
}
