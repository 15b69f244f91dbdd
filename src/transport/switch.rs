//! Aborting a transport's owner from another thread: a flag the executor
//! reads at every point where it would sleep, and the waker that cuts the
//! sleep short, so a blocked collective returns within moments of the pull.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The switch of one transport ([`super::Transport::abort_switch`]); cheap
/// to clone and safe to pull from any thread, any number of times.
///
/// ```no_run
/// # let comm = kolo::Communicator::from_env()?;
/// // Another thread ends a collective this one is blocked in.
/// std::thread::scope(|s| {
///     s.spawn(|| comm.abort());
///     let mut v = vec![0f32; 1 << 20];
///     assert!(comm.allreduce(&mut v, kolo::ReduceOp::Sum).is_err());
/// });
/// # Ok::<(), kolo::Error>(())
/// ```
#[derive(Clone)]
pub struct AbortSwitch {
    pub(crate) flag: Arc<AtomicBool>,
    pub(crate) waker: Arc<mio::Waker>,
}

impl AbortSwitch {
    /// Ask the owner to abort, and wake it if it sleeps.
    pub fn pull(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Whether the switch was pulled.
    pub fn pulled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for AbortSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AbortSwitch(pulled: {})", self.pulled())
    }
}
