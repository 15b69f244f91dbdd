//! `kolo_comm`: who owns the communicator (the caller's blocking calls, or the engine after
//! the first asynchronous call), and the exports that create, query and free it.

use super::*;

/// `kolo_comm` in C (opaque): a communicator created by `kolo_init_from_env`
/// and freed by `kolo_comm_destroy`. Calls on one communicator from several
/// threads are serialised by the Rust `Communicator` (or, once it runs, the
/// engine).
///
/// ```c
/// kolo_comm *comm = NULL;
/// int rc = kolo_init_from_env(&comm);
/// ```
pub struct kolo_comm {
    pub(crate) rank: usize,
    pub(crate) size: usize,
    pub(crate) local_rank: usize,
    pub(crate) local_size: usize,
    pub(crate) mode: RwLock<Mode>,
    /// Blocking calls run through the engine so far (their automatic names).
    pub(crate) sync_calls: AtomicU64,
}

/// Who owns the communicator.
pub(crate) enum Mode {
    /// No asynchronous call yet: blocking calls use the communicator directly.
    Direct(Box<Communicator>),
    /// Since the first `kolo_allreduce_async`: the engine owns it, and every
    /// call goes through the engine.
    Engine(Engine),
    /// Starting the engine failed (it consumed the communicator); every later
    /// call reports this error.
    Failed(Error),
}

/// Where one blocking collective runs.
pub(crate) enum Via<'a> {
    /// On the communicator.
    Comm(&'a Communicator),
    /// As the engine operation of this (automatic) name, waited for at once.
    Engine(&'a Engine, String),
}

/// Prefix of the names the library gives blocking calls run through the
/// engine; names starting with [`RESERVED`] are refused to callers.
pub(crate) const SYNC_PREFIX: &str = "kolo.sync.";
/// Engine names reserved for the library.
pub(crate) const RESERVED: &str = "kolo.";

impl kolo_comm {
    pub(crate) fn new(comm: Communicator) -> kolo_comm {
        kolo_comm {
            rank: comm.rank(),
            size: comm.size(),
            local_rank: comm.local_rank(),
            local_size: comm.local_size(),
            mode: RwLock::new(Mode::Direct(Box::new(comm))),
            sync_calls: AtomicU64::new(0),
        }
    }

    pub(crate) fn mode(&self) -> RwLockReadGuard<'_, Mode> {
        self.mode.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run a blocking collective, after its arguments were checked: on the
    /// communicator, or through the engine under the next automatic name
    /// (the same on every rank, as blocking calls come in the same order).
    pub(crate) fn run<R>(&self, f: impl FnOnce(Via<'_>) -> kolo::Result<R>) -> kolo::Result<R> {
        match &*self.mode() {
            Mode::Direct(c) => f(Via::Comm(c)),
            Mode::Engine(e) => {
                let n = self.sync_calls.fetch_add(1, Ordering::Relaxed);
                f(Via::Engine(e, format!("{SYNC_PREFIX}{n}")))
            }
            Mode::Failed(e) => Err(e.clone()),
        }
    }

    /// Call `f` with the engine, starting it on the communicator first if
    /// this is the first asynchronous call. The switch is local: every rank
    /// must make it at the same point among its blocking calls (else a rank
    /// still calling the communicator directly meets its peers' engine
    /// negotiation, which it usually reports as a mismatch).
    pub(crate) fn with_engine<R>(
        &self,
        f: impl FnOnce(&Engine) -> kolo::Result<R>,
    ) -> kolo::Result<R> {
        loop {
            if let Mode::Engine(e) = &*self.mode() {
                return f(e);
            }
            let mut w = self.mode.write().unwrap_or_else(PoisonError::into_inner);
            let placeholder = Mode::Failed(Error::InvalidArgument(format!(
                "rank {}: starting the engine failed",
                self.rank
            )));
            *w = match std::mem::replace(&mut *w, placeholder) {
                Mode::Direct(c) => Engine::start(*c).map_or_else(Mode::Failed, Mode::Engine),
                other => other,
            };
            if let Mode::Failed(e) = &*w {
                return Err(e.clone());
            }
        }
    }
}

/// `&kolo_comm` from a C pointer; NULL is an invalid argument.
///
/// # Safety
/// `comm` is NULL or a pointer from `kolo_init_from_env` not yet destroyed.
pub(crate) unsafe fn comm_ref<'a>(
    name: &str,
    comm: *const kolo_comm,
) -> kolo::Result<&'a kolo_comm> {
    // SAFETY: by the caller's contract a non-NULL `comm` is a live kolo_comm.
    unsafe { comm.as_ref() }.ok_or_else(|| invalid(name, format_args!("comm is NULL")))
}

/// Join the job described by the environment (`kolorun`, `torchrun`, `mpirun`,
/// `srun`; see the README) and store the new communicator in `*comm`
/// (set to NULL on failure). Collective: every rank must call it.
///
/// # Safety
/// `comm` is NULL or valid for writing one pointer.
///
/// ```c
/// kolo_comm *comm;
/// if (kolo_init_from_env(&comm) != KOLO_OK) fprintf(stderr, "%s\n", kolo_last_error());
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_init_from_env(comm: *mut *mut kolo_comm) -> c_int {
    const NAME: &str = "kolo_init_from_env";
    guard(NAME, || {
        // SAFETY: the contract above.
        let slot = unsafe { out(NAME, "comm", comm) }?;
        *slot = std::ptr::null_mut();
        let c = Communicator::from_env()?;
        *slot = Box::into_raw(Box::new(kolo_comm::new(c)));
        Ok(())
    })
}

/// Stop the engine if one runs (`Engine::shutdown`; operations still pending
/// fail), close the connections and free the communicator, always; the
/// status is the error the engine stopped with, if any (after
/// `kolo_comm_abort`: `KOLO_ERR_ABORTED`). NULL is an invalid argument.
///
/// # Safety
/// `comm` is NULL or from `kolo_init_from_env`, not destroyed before, and no
/// other thread is using it.
///
/// ```c
/// kolo_comm_destroy(comm);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_comm_destroy(comm: *mut kolo_comm) -> c_int {
    const NAME: &str = "kolo_comm_destroy";
    guard(NAME, || {
        if comm.is_null() {
            return Err(invalid(NAME, format_args!("comm is NULL")));
        }
        // SAFETY: the contract above: the pointer came from Box::into_raw.
        let k = unsafe { Box::from_raw(comm) };
        match k.mode.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Mode::Engine(e) => e.shutdown().map(drop),
            Mode::Direct(_) | Mode::Failed(_) => Ok(()),
        }
    })
}

/// Abort the communicator, from any thread (`Communicator::abort`, or
/// `Engine::abort` once asynchronous calls started): a call blocked on it
/// returns `KOLO_ERR_ABORTED` at once, pending handles and later calls fail
/// the same way, and the peers are told. The communicator must still be
/// destroyed with `kolo_comm_destroy`.
///
/// # Safety
/// `comm` as in `kolo_comm_destroy` (not being destroyed); other threads may
/// be using it.
///
/// ```c
/// kolo_comm_abort(comm);   /* from a watchdog thread */
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_comm_abort(comm: *const kolo_comm) -> c_int {
    const NAME: &str = "kolo_comm_abort";
    guard(NAME, || {
        // SAFETY: the contract above.
        let k = unsafe { comm_ref(NAME, comm)? };
        match &*k.mode() {
            Mode::Direct(c) => c.abort(),
            Mode::Engine(e) => e.abort(),
            Mode::Failed(_) => {}
        }
        Ok(())
    })
}

/// This rank, in `0..size`.
///
/// # Safety
/// `comm` as in `kolo_comm_destroy` (not being destroyed); `rank` NULL or writable.
///
/// ```c
/// int rank; kolo_comm_rank(comm, &rank);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_comm_rank(comm: *const kolo_comm, rank: *mut c_int) -> c_int {
    const NAME: &str = "kolo_comm_rank";
    guard(NAME, || {
        // SAFETY: the contract above.
        let (c, o) = unsafe { (comm_ref(NAME, comm)?, out(NAME, "rank", rank)?) };
        *o = to_int(NAME, "rank", c.rank)?;
        Ok(())
    })
}

/// The number of ranks.
///
/// # Safety
/// As `kolo_comm_rank`.
///
/// ```c
/// int size; kolo_comm_size(comm, &size);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_comm_size(comm: *const kolo_comm, size: *mut c_int) -> c_int {
    const NAME: &str = "kolo_comm_size";
    guard(NAME, || {
        // SAFETY: the contract above.
        let (c, o) = unsafe { (comm_ref(NAME, comm)?, out(NAME, "size", size)?) };
        *o = to_int(NAME, "size", c.size)?;
        Ok(())
    })
}

/// This rank's index among the ranks on its host.
///
/// # Safety
/// As `kolo_comm_rank`.
///
/// ```c
/// int local; kolo_comm_local_rank(comm, &local);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_comm_local_rank(
    comm: *const kolo_comm,
    local_rank: *mut c_int,
) -> c_int {
    const NAME: &str = "kolo_comm_local_rank";
    guard(NAME, || {
        // SAFETY: the contract above.
        let (c, o) = unsafe { (comm_ref(NAME, comm)?, out(NAME, "local_rank", local_rank)?) };
        *o = to_int(NAME, "local_rank", c.local_rank)?;
        Ok(())
    })
}

/// The number of ranks on this rank's host.
///
/// # Safety
/// As `kolo_comm_rank`.
///
/// ```c
/// int local_size; kolo_comm_local_size(comm, &local_size);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_comm_local_size(
    comm: *const kolo_comm,
    local_size: *mut c_int,
) -> c_int {
    const NAME: &str = "kolo_comm_local_size";
    guard(NAME, || {
        // SAFETY: the contract above.
        let (c, o) = unsafe { (comm_ref(NAME, comm)?, out(NAME, "local_size", local_size)?) };
        *o = to_int(NAME, "local_size", c.local_size)?;
        Ok(())
    })
}

/// The library's version (`KOLO_VERSION_MAJOR` etc. in the header are the
/// version it was compiled against).
///
/// # Safety
/// Each pointer NULL (an invalid argument) or writable.
///
/// ```c
/// int major, minor, patch; kolo_version(&major, &minor, &patch);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_version(
    major: *mut c_int,
    minor: *mut c_int,
    patch: *mut c_int,
) -> c_int {
    const NAME: &str = "kolo_version";
    guard(NAME, || {
        // SAFETY: the contract above.
        let outs = unsafe {
            [
                out(NAME, "major", major)?,
                out(NAME, "minor", minor)?,
                out(NAME, "patch", patch)?,
            ]
        };
        for (o, v) in outs.into_iter().zip(version()) {
            *o = v;
        }
        Ok(())
    })
}

/// `kolo::VERSION` as numbers (pre-release suffixes dropped).
pub fn version() -> [c_int; 3] {
    let mut v = [0; 3];
    for (slot, part) in v.iter_mut().zip(VERSION.split('.')) {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        *slot = digits.parse().unwrap_or(0);
    }
    v
}
