//! The α-β-γ model behind `KOLO_ALGO=auto`: configured, or measured between
//! neighbours when a communicator starts.
//!
//! Every rank measures, then the ranks take the maximum of each parameter
//! with an allreduce, so all of them hold the same bits and pick the same
//! algorithm for every size (a disagreement would be a mismatch or a hang).

use crate::algo::cost::Model;
use crate::algo::{Apply, Op, Region, Round, Schedule};
use crate::config::Config;
use crate::element::DType;
use crate::error::Result;
use crate::reduce::{self, ReduceOp};
use crate::Communicator;
use std::time::Instant;

/// Bytes of the bandwidth probe: large enough that latency is a small part,
/// small enough that 17 ranks on two cores start in milliseconds.
const PROBE_BYTES: usize = 256 << 10;

/// The model from `cfg`'s `alpha_us`, `beta_gbps` and `gamma_gbps`, with
/// [`Model::DEFAULT`] for what is unset.
///
/// ```
/// let mut cfg = kolo::Config::local(0, 1, 0);
/// cfg.beta_gbps = Some(10.0);
/// let m = kolo::calibrate::configured(&cfg);
/// assert_eq!(m.beta_s_per_byte, 1e-10);
/// assert_eq!(m.alpha_s, kolo::algo::cost::Model::DEFAULT.alpha_s);
/// ```
pub fn configured(cfg: &Config) -> Model {
    over(cfg, Model::DEFAULT)
}

/// Whether starting a communicator with `cfg` measures anything.
///
/// ```
/// let mut cfg = kolo::Config::local(0, 4, 0);
/// assert!(kolo::calibrate::measures(&cfg));
/// (cfg.alpha_us, cfg.beta_gbps, cfg.gamma_gbps) = (Some(20.0), Some(1.0), Some(5.0));
/// assert!(!kolo::calibrate::measures(&cfg));
/// ```
pub fn measures(cfg: &Config) -> bool {
    cfg.size > 1
        && cfg.calibrate
        && (cfg.alpha_us.is_none() || cfg.beta_gbps.is_none() || cfg.gamma_gbps.is_none())
}

fn over(cfg: &Config, base: Model) -> Model {
    Model {
        alpha_s: cfg.alpha_us.map_or(base.alpha_s, |us| us * 1e-6),
        beta_s_per_byte: cfg
            .beta_gbps
            .map_or(base.beta_s_per_byte, |g| 1.0 / (g * 1e9)),
        gamma_s_per_byte: cfg
            .gamma_gbps
            .map_or(base.gamma_s_per_byte, |g| 1.0 / (g * 1e9)),
    }
}

/// One step of the ring: send `bytes` to the right neighbour while
/// receiving as many from the left one.
fn exchange(rank: usize, size: usize, bytes: usize) -> Schedule {
    Schedule {
        rounds: vec![Round {
            ops: vec![
                Op::Send {
                    peer: (rank + 1) % size,
                    from: Region::out(0..bytes),
                },
                Op::Recv {
                    peer: (rank + size - 1) % size,
                    into: Region::out(bytes..2 * bytes),
                    apply: Apply::Copy,
                },
            ],
        }],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measure α (one neighbour exchange of 8 bytes), β (of [`PROBE_BYTES`],
/// less α) and γ (a local f32 sum), each the median of a few runs and then
/// the maximum over ranks; configured values win. A collective: every rank
/// calls it at the same point.
pub(crate) fn measure(comm: &Communicator) -> Result<Model> {
    let cfg = comm.config();
    let (rank, size) = (comm.rank(), comm.size());
    let mut buf = vec![0u8; 2 * PROBE_BYTES];
    let mut time = |bytes: usize, warm: usize, runs: usize| -> Result<f64> {
        let sched = exchange(rank, size, bytes);
        let mut t = Vec::with_capacity(runs);
        for i in 0..warm + runs {
            let start = Instant::now();
            comm.run_schedule("calibrate", &sched, &mut buf[..2 * bytes])?;
            if i >= warm {
                t.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(median(t))
    };
    let alpha = time(8, 3, 11)?;
    let big = time(PROBE_BYTES, 1, 5)?;
    let beta = (big - alpha).max(big * 0.1) / PROBE_BYTES as f64;
    let mut acc = vec![1.0f32; PROBE_BYTES / 4];
    let src = vec![2.0f32; PROBE_BYTES / 4];
    let mut t = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        reduce::reduce_bytes(
            DType::F32,
            ReduceOp::Sum,
            crate::element::as_bytes_mut(&mut acc),
            crate::element::as_bytes(&src),
            false,
        );
        t.push(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&acc);
    let gamma = median(t).max(1e-12) / PROBE_BYTES as f64;
    let mut v = [alpha, beta, gamma];
    comm.allreduce_with(&mut v, ReduceOp::Max, crate::algo::cost::Algo::Rd)?;
    Ok(over(
        cfg,
        Model {
            alpha_s: v[0],
            beta_s_per_byte: v[1],
            gamma_s_per_byte: v[2],
        },
    ))
}
