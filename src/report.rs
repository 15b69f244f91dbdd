//! A failed rank's diagnosis, for the launcher: typed data (the rank, what
//! kind of failure, the rank it is traced to) written to the rendezvous
//! store the launcher serves, under [`key`]. The launcher blames from these
//! records, never from what the program prints, so a program that logs its
//! errors anywhere, or not at all, still has the lost or hung rank named.

use crate::config::Config;
use crate::error::Error;
use crate::rendezvous::StoreClient;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// One rank's first failure.
///
/// ```
/// use kolo::report::Diagnosis;
/// let d = Diagnosis { rank: 1, kind: "timeout".into(), op: Some("allreduce #3".into()), blamed: Some(2) };
/// let back: Diagnosis = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
/// assert_eq!(back, d);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// The rank that failed.
    pub rank: usize,
    /// The kind of failure: `peer_lost`, `timeout`, `aborted`, `mismatch`,
    /// `protocol`, `invalid_argument`, ...
    pub kind: String,
    /// The operation, e.g. `allreduce #7`, when the failure was in one.
    pub op: Option<String>,
    /// The rank the failure is traced to ([`Error::blamed`]).
    pub blamed: Option<usize>,
}

impl Diagnosis {
    /// The diagnosis of `e` on `rank`.
    pub fn of(rank: usize, e: &Error) -> Diagnosis {
        let (kind, op) = match e {
            Error::InvalidArgument(_) => ("invalid_argument", None),
            Error::Config(_) => ("config", None),
            Error::Mismatch { op, .. } => ("mismatch", Some(op)),
            Error::PeerLost { op, .. } => ("peer_lost", Some(op)),
            Error::Timeout { op, .. } => ("timeout", Some(op)),
            Error::Rendezvous { .. } => ("rendezvous", None),
            Error::Protocol { .. } => ("protocol", None),
            Error::Aborted { op, .. } => ("aborted", Some(op)),
            Error::Io(_) => ("io", None),
            Error::MembershipChanged { .. } => ("membership_changed", None),
        };
        Diagnosis {
            rank,
            kind: kind.into(),
            op: op.cloned(),
            blamed: e.blamed(),
        }
    }
}

/// Where rank `rank`'s diagnosis is kept in the store.
pub fn key(rank: usize) -> String {
    format!("kolo/diag/{rank}")
}

/// Write `e` as this rank's diagnosis to a launcher's store (a store rank 0
/// serves goes down with it, so nobody would read it there). Best effort,
/// at most about two seconds: the failure is reported to the caller anyway.
pub(crate) fn publish(cfg: &Config, e: &Error) {
    if cfg.serve_store || cfg.size < 2 {
        return;
    }
    let addr = format!("{}:{}", cfg.master_addr, cfg.master_port);
    let deadline = Instant::now() + Duration::from_secs(2);
    let Ok(mut c) = StoreClient::connect_with(&addr, cfg.rank, cfg.secret.as_ref(), deadline)
    else {
        return;
    };
    if let Ok(v) = serde_json::to_vec(&Diagnosis::of(cfg.rank, e)) {
        let _ = c.set(&key(cfg.rank), &v);
    }
}
