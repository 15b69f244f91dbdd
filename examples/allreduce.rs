//! Allreduce a rank-dependent vector and check it against the closed form.
//! Run under a launcher: `kolorun -np 4 target/release/examples/allreduce`.
use kolo::{Communicator, ReduceOp};
use std::process::ExitCode;

fn main() -> ExitCode {
    let comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("allreduce: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (rank, n) = (comm.rank(), comm.size());
    // Rank r gives (r + 1) * k with k = i % 8 + 1; the sum n(n+1)/2 * k is exact in f32.
    let k = |i: usize| (i % 8 + 1) as f32;
    let mut v: Vec<f32> = (0..1 << 16).map(|i| (rank + 1) as f32 * k(i)).collect();
    if let Err(e) = comm.allreduce(&mut v, ReduceOp::Sum) {
        eprintln!("allreduce: rank {rank}: {e}");
        return ExitCode::FAILURE;
    }
    let total = (n * (n + 1) / 2) as f32;
    let bad = (0..v.len()).filter(|&i| v[i] != total * k(i)).count();
    if bad > 0 {
        eprintln!("rank {rank} of {n}: allreduce WRONG in {bad} elements");
        return ExitCode::FAILURE;
    }
    println!("rank {rank} of {n}: allreduce ok");
    ExitCode::SUCCESS
}
