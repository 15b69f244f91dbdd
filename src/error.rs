//! Error values. Every failure names the rank that saw it, and where known the
//! peer and the operation, so a log line from any rank says what happened.

use std::fmt;
use std::time::Duration;

/// Result alias used across kolo.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong. Every variant carries enough context to be printed alone.
///
/// ```
/// let e = kolo::Error::InvalidArgument("count must be > 0".into());
/// assert!(e.to_string().contains("count must be > 0"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A caller passed arguments that can never work (wrong buffer length, bad root...).
    InvalidArgument(String),
    /// Configuration (environment, launcher flags) is missing or contradictory.
    Config(String),
    /// Ranks called the same collective with different arguments (count, dtype, op, root, kind).
    Mismatch {
        /// The rank reporting the error.
        rank: usize,
        /// The other rank involved.
        peer: usize,
        /// The operation, e.g. "allreduce #7".
        op: String,
        /// What happened, in words.
        detail: String,
    },
    /// A peer closed its connection, reset it, or aborted the collective.
    PeerLost {
        /// The rank reporting the error.
        rank: usize,
        /// The other rank involved.
        peer: usize,
        /// Address of the peer.
        host: String,
        /// The operation, e.g. "allreduce #7".
        op: String,
        /// What happened, in words.
        detail: String,
    },
    /// A wait ran past its deadline.
    Timeout {
        /// The rank reporting the error.
        rank: usize,
        /// The operation, e.g. "allreduce #7".
        op: String,
        /// How long it waited.
        waited: Duration,
        /// What happened, in words.
        detail: String,
        /// The rank this wait ended on, when known: the peer waited on, or
        /// the head of a chain of waits (a stopped, frozen or cut-off rank).
        hung: Option<usize>,
    },
    /// Rendezvous failed (store unreachable, ranks missing).
    Rendezvous {
        /// The rank reporting the error.
        rank: usize,
        /// What happened, in words.
        detail: String,
    },
    /// A peer sent bytes that are not a valid kolo frame for this job.
    Protocol {
        /// The rank reporting the error.
        rank: usize,
        /// The other rank involved.
        peer: usize,
        /// What happened, in words.
        detail: String,
    },
    /// Another rank failed this collective and told us why.
    Aborted {
        /// The rank reporting the error.
        rank: usize,
        /// The rank that gave up first.
        origin: usize,
        /// The operation, e.g. "allreduce #7".
        op: String,
        /// What happened, in words.
        detail: String,
        /// The rank the failure is traced to, when known (see
        /// [`Error::blamed`]): a lost or hung peer behind the abort.
        hung: Option<usize>,
    },
    /// An OS-level I/O error outside a collective (bind, connect, spawn).
    Io(String),
    /// Elastic mode: the set of ranks changed (a peer was lost or new members
    /// were announced), so the operation was abandoned; [`crate::elastic::run`]
    /// re-forms the group under a new epoch and retries from the last commit.
    MembershipChanged {
        /// The rank reporting the error (its rank in the old epoch).
        rank: usize,
        /// The epoch whose communicator was abandoned.
        epoch: u64,
        /// What happened, in words (the underlying failure or announcement).
        detail: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::Config(m) => write!(f, "configuration error: {m}"),
            Error::Mismatch {
                rank,
                peer,
                op,
                detail,
            } => write!(f, "rank {rank}: {op}: mismatch with rank {peer}: {detail}"),
            Error::PeerLost {
                rank,
                peer,
                host,
                op,
                detail,
            } => write!(
                f,
                "rank {rank}: {op}: lost peer rank {peer} ({host}): {detail}"
            ),
            Error::Timeout {
                rank,
                op,
                waited,
                detail,
                ..
            } => write!(
                f,
                "rank {rank}: {op}: timed out after {:.1}s: {detail}",
                waited.as_secs_f64()
            ),
            Error::Rendezvous { rank, detail } => write!(f, "rank {rank}: rendezvous: {detail}"),
            Error::Protocol { rank, peer, detail } => {
                write!(f, "rank {rank}: protocol error from rank {peer}: {detail}")
            }
            Error::Aborted {
                rank,
                origin,
                op,
                detail,
                ..
            } => write!(f, "rank {rank}: {op}: aborted by rank {origin}: {detail}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::MembershipChanged {
                rank,
                epoch,
                detail,
            } => write!(
                f,
                "rank {rank}: membership changed in epoch {epoch}: {detail}"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The rank this failure is traced to, as typed data: a lost peer, a
    /// peer that sent garbage, or the hung rank a wait ended on. The
    /// launcher blames it (kolorun reads it from its store, not from any
    /// output); `None` when no other rank is at fault (a mismatch, bad input).
    ///
    /// ```
    /// let e = kolo::Error::PeerLost {
    ///     rank: 0,
    ///     peer: 2,
    ///     host: "10.0.0.3".into(),
    ///     op: "allreduce #7".into(),
    ///     detail: "connection reset".into(),
    /// };
    /// assert_eq!(e.blamed(), Some(2));
    /// ```
    pub fn blamed(&self) -> Option<usize> {
        match self {
            Error::PeerLost { peer, .. } | Error::Protocol { peer, .. } => Some(*peer),
            Error::Timeout { hung, .. } | Error::Aborted { hung, .. } => *hung,
            _ => None,
        }
    }

    /// The peer rank this error is about, when it is about one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            Error::Mismatch { peer, .. }
            | Error::PeerLost { peer, .. }
            | Error::Protocol { peer, .. } => Some(*peer),
            Error::Aborted { origin, .. } => Some(*origin),
            _ => None,
        }
    }
}
