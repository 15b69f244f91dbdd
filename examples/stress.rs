//! Loop large allreduces for the process-level failure tests (`tests/processes.rs`).
//!
//! Run under a launcher: `kolorun -np 4 target/release/examples/stress`. Every rank
//! prints `rank R: running` once connected, then `rank R: done N iterations` at the end;
//! on any error it prints `rank R: error: <error>` to stderr and exits 1.
//!
//! Test knobs (environment):
//! - `KOLO_TEST_SECONDS` (default 30): stop looping after this many seconds.
//! - `KOLO_TEST_COUNT` (default 2Mi): f32 elements per allreduce (8 MiB).
//! - `KOLO_TEST_ITERS` (default unlimited): stop after this many allreduces.
//! - `KOLO_TEST_DIE_RANK`: that rank SIGKILLs itself `KOLO_TEST_DIE_MS` (default 300)
//!   milliseconds after its first allreduce, from a timer thread, so mid-collective.
//! - `KOLO_TEST_MISMATCH_RANK`: that rank passes one element more to every allreduce.
//! - `KOLO_TEST_ERRORS_TO_STDOUT`: print errors to stdout instead.
use kolo::{Communicator, ReduceOp};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Print one whole line to stderr (stdout with `KOLO_TEST_ERRORS_TO_STDOUT=1`,
/// as many programs log) in a single write, so a rank stopped by its
/// launcher right after never leaves half a line.
fn report(line: String) {
    let line = format!("{line}\n");
    if std::env::var_os("KOLO_TEST_ERRORS_TO_STDOUT").is_some() {
        let _ = std::io::stdout().write_all(line.as_bytes());
    } else {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

fn var<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok().and_then(|v| v.trim().parse().ok())
}

fn main() -> ExitCode {
    let comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            report(format!("stress: init: error: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let (rank, n) = (comm.rank(), comm.size());
    let seconds: f64 = var("KOLO_TEST_SECONDS").unwrap_or(30.0);
    let iters: u64 = var("KOLO_TEST_ITERS").unwrap_or(u64::MAX);
    let mut count: usize = var("KOLO_TEST_COUNT").unwrap_or(2 << 20);
    if var::<usize>("KOLO_TEST_MISMATCH_RANK") == Some(rank) {
        count += 1;
    }
    let die = var::<usize>("KOLO_TEST_DIE_RANK") == Some(rank);
    let die_ms: u64 = var("KOLO_TEST_DIE_MS").unwrap_or(300);
    println!("rank {rank}: running");
    let _ = std::io::stdout().flush();

    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut v = vec![0f32; count];
    let mut done = 0u64;
    while done < iters && Instant::now() < deadline {
        // Rank r gives r + 1 + i % 4: sums stay exact in f32.
        for (i, x) in v.iter_mut().enumerate() {
            *x = (rank + 1 + i % 4) as f32;
        }
        if let Err(e) = comm.allreduce(&mut v, ReduceOp::Sum) {
            report(format!("rank {rank}: error: {e}"));
            return ExitCode::FAILURE;
        }
        let base = (n * (n + 1) / 2) as f32;
        if let Some(i) = (0..count).find(|&i| v[i] != base + (n * (i % 4)) as f32) {
            report(format!(
                "rank {rank}: error: iteration {done}: element {i} is {} after allreduce",
                v[i]
            ));
            return ExitCode::FAILURE;
        }
        done += 1;
        if die && done == 1 {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(die_ms));
                // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            });
        }
    }
    println!("rank {rank}: done {done} iterations");
    ExitCode::SUCCESS
}
