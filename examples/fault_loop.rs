//! Fault-injection target: allreduces in a loop until something fails, then
//! one parseable line per failure. Used by `tests/netns.rs` (a rank is killed,
//! stopped or cut off from the network mid-loop) and handy by hand:
//!
//! ```text
//! kolorun -H h1:2,h2:2 target/release/examples/fault_loop
//! ```
//!
//! stdout: `rank R: ready pid=PID` once the loop runs (the pid lets a test
//! signal it on whatever host it runs). On the first error, stderr gets
//! `rank R: error: <the error>` and
//! `rank R: fault kind=<variant> peer=<rank or -> at_ms=<unix ms> op_ms=<ms in the failing call>`,
//! then the next call's outcome: `rank R: next: <the error>` (it must fail at
//! once with the same error). Exit status 1 after an error, 0 after
//! `KOLO_TEST_SECONDS` (default 300) without one. `KOLO_TEST_COUNT` sets the
//! f32 elements per allreduce (default 262144, 1 MiB).
use kolo::{Communicator, Error, ReduceOp};
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::PeerLost { .. } => "PeerLost",
        Error::Timeout { .. } => "Timeout",
        Error::Aborted { .. } => "Aborted",
        Error::Mismatch { .. } => "Mismatch",
        Error::Protocol { .. } => "Protocol",
        Error::Rendezvous { .. } => "Rendezvous",
        Error::Config(_) => "Config",
        Error::InvalidArgument(_) => "InvalidArgument",
        Error::Io(_) => "Io",
        Error::MembershipChanged { .. } => "MembershipChanged",
    }
}

fn main() {
    let comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fault_loop: {e}");
            std::process::exit(2);
        }
    };
    let (rank, n) = (comm.rank(), comm.size());
    let count: usize = env_or("KOLO_TEST_COUNT", 262_144);
    let seconds: f64 = env_or("KOLO_TEST_SECONDS", 300.0);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut buf = vec![0f32; count];
    // Sum over ranks of (r + 1) * (i % 7 + 1): exact in f32 for these sizes.
    let want = |i: usize| (n * (n + 1) / 2) as f32 * (i % 7 + 1) as f32;
    let mut iter = 0u64;
    while Instant::now() < end {
        for (i, x) in buf.iter_mut().enumerate() {
            *x = (rank + 1) as f32 * (i % 7 + 1) as f32;
        }
        let t = Instant::now();
        if let Err(e) = comm.allreduce(&mut buf, ReduceOp::Sum) {
            let op_ms = t.elapsed().as_millis();
            let at = unix_ms();
            let peer = e.peer().map_or("-".to_string(), |p| p.to_string());
            // One write per line, so the launcher never interleaves them.
            err_line(format!("rank {rank}: error: {e}"));
            err_line(format!(
                "rank {rank}: fault kind={} peer={peer} at_ms={at} op_ms={op_ms}",
                kind(&e)
            ));
            let t = Instant::now();
            match comm.allreduce(&mut buf, ReduceOp::Sum) {
                Err(e2) => err_line(format!(
                    "rank {rank}: next: {} in {} ms: {e2}",
                    if e2 == e { "same" } else { "different" },
                    t.elapsed().as_millis()
                )),
                Ok(()) => err_line(format!("rank {rank}: next: succeeded")),
            }
            let _ = std::io::stderr().flush();
            std::process::exit(1);
        }
        if let Some(i) = (0..count).find(|&i| buf[i] != want(i)) {
            err_line(format!(
                "rank {rank}: error: wrong result at iteration {iter}, element {i}: {} != {}",
                buf[i],
                want(i)
            ));
            std::process::exit(3);
        }
        iter += 1;
        if iter == 3 {
            println!("rank {rank}: ready pid={}", std::process::id());
            let _ = std::io::stdout().flush();
        }
    }
    println!("rank {rank}: done after {iter} allreduces");
}

/// Write one whole line to stderr in a single write, so a launcher that reads
/// several ranks never splits or interleaves it.
fn err_line(mut s: String) {
    use std::io::Write;
    s.push('\n');
    let _ = std::io::stderr().write_all(s.as_bytes());
}
