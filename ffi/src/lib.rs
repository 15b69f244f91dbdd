//! C ABI for kolo: `libkolo.so` / `libkolo.a` with the header `ffi/include/kolo.h`.
//!
//! Every export is a thin shim over the Rust API ([`kolo::Communicator`]): it
//! checks what only the C side can get wrong (NULL pointers, unknown enum
//! values, counts that overflow, misaligned buffers), turns the raw buffer into
//! a typed slice of the runtime dtype, calls the same method a Rust user calls,
//! and turns the `kolo::Error` into a status code plus a thread-local message
//! (`kolo_last_error`). No panic crosses the boundary: every export runs under
//! `catch_unwind` and reports a panic as `KOLO_ERR_INTERNAL`.
//!
//! Arguments rejected here (before any communication) leave the communicator
//! usable and are not announced to the other ranks; errors found by the Rust
//! API (wrong root, mismatched counts, lost peers) behave exactly as in Rust:
//! every rank is told, and the communicator stays failed.
//!
//! The asynchronous named allreduce (`kolo_allreduce_async`, `kolo_test`,
//! `kolo_wait`) runs on a [`kolo::engine::Engine`], started on the first such
//! call: the engine takes the communicator over, and from then on the blocking
//! collectives of that `kolo_comm` are engine operations too (submitted under
//! the automatic name `kolo.sync.<n>` and waited for), so blocking and
//! asynchronous calls mix. In that mode a disagreement between ranks fails
//! only the call concerned (the engine finds it before any data moves); a
//! failure inside a collective still stops everything.
//!
//! ```c
//! kolo_comm *comm;
//! if (kolo_init_from_env(&comm) != KOLO_OK) { fprintf(stderr, "%s\n", kolo_last_error()); exit(1); }
//! float grad[1024] = {0};
//! kolo_allreduce(comm, grad, grad, 1024, KOLO_FLOAT32, KOLO_AVG); /* in place */
//! kolo_comm_destroy(comm);
//! ```

#![allow(non_camel_case_types)]
#![warn(missing_docs)]

use half::{bf16, f16};
use kolo::engine::{Engine, Handle, Op};
use kolo::{Communicator, DType, Element, Error, ReduceOp};
use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

/// Version of the kolo crate this library was built from.
pub const VERSION: &str = kolo::VERSION;

// ---------------------------------------------------------------------------
// Status codes. Stable: never renumber (C programs compare against them).

/// Success.
pub const KOLO_OK: c_int = 0;
/// A NULL pointer, unknown dtype/op, overflowing count, misaligned buffer, or
/// arguments the Rust API rejects (`kolo::Error::InvalidArgument`).
pub const KOLO_ERR_INVALID_ARGUMENT: c_int = -1;
/// Ranks called the same collective with different arguments (`Error::Mismatch`).
pub const KOLO_ERR_MISMATCH: c_int = -2;
/// A peer closed or reset its connection (`Error::PeerLost`).
pub const KOLO_ERR_PEER_LOST: c_int = -3;
/// Nothing moved for `KOLO_TIMEOUT` seconds (`Error::Timeout`).
pub const KOLO_ERR_TIMEOUT: c_int = -4;
/// A bug in kolo: a panic caught at the boundary.
pub const KOLO_ERR_INTERNAL: c_int = -5;
/// Another rank failed this collective and said why (`Error::Aborted`).
pub const KOLO_ERR_ABORTED: c_int = -6;
/// A peer sent bytes that are not a kolo frame for this job (`Error::Protocol`).
pub const KOLO_ERR_PROTOCOL: c_int = -7;
/// The environment or launcher settings are missing or contradictory (`Error::Config`).
pub const KOLO_ERR_CONFIG: c_int = -8;
/// Rendezvous failed: store unreachable or ranks missing (`Error::Rendezvous`).
pub const KOLO_ERR_RENDEZVOUS: c_int = -9;
/// An OS-level I/O error outside a collective: bind, connect (`Error::Io`).
pub const KOLO_ERR_IO: c_int = -10;

/// Every status code with its name in `kolo.h` and its `kolo_status_string` text.
pub const STATUSES: [(c_int, &str, &CStr); 11] = [
    (KOLO_OK, "KOLO_OK", c"success"),
    (
        KOLO_ERR_INVALID_ARGUMENT,
        "KOLO_ERR_INVALID_ARGUMENT",
        c"invalid argument",
    ),
    (
        KOLO_ERR_MISMATCH,
        "KOLO_ERR_MISMATCH",
        c"mismatch across ranks",
    ),
    (KOLO_ERR_PEER_LOST, "KOLO_ERR_PEER_LOST", c"peer lost"),
    (KOLO_ERR_TIMEOUT, "KOLO_ERR_TIMEOUT", c"timeout"),
    (KOLO_ERR_INTERNAL, "KOLO_ERR_INTERNAL", c"internal error"),
    (
        KOLO_ERR_ABORTED,
        "KOLO_ERR_ABORTED",
        c"aborted by another rank",
    ),
    (KOLO_ERR_PROTOCOL, "KOLO_ERR_PROTOCOL", c"protocol error"),
    (KOLO_ERR_CONFIG, "KOLO_ERR_CONFIG", c"configuration error"),
    (
        KOLO_ERR_RENDEZVOUS,
        "KOLO_ERR_RENDEZVOUS",
        c"rendezvous failed",
    ),
    (KOLO_ERR_IO, "KOLO_ERR_IO", c"I/O error"),
];

/// The status code of a `kolo::Error`. Exhaustive on purpose: a new variant
/// must be given a code here before the library builds.
pub fn status_of(e: &Error) -> c_int {
    match e {
        Error::InvalidArgument(_) => KOLO_ERR_INVALID_ARGUMENT,
        Error::Mismatch { .. } => KOLO_ERR_MISMATCH,
        Error::PeerLost { .. } => KOLO_ERR_PEER_LOST,
        Error::Timeout { .. } => KOLO_ERR_TIMEOUT,
        Error::Aborted { .. } => KOLO_ERR_ABORTED,
        Error::Protocol { .. } => KOLO_ERR_PROTOCOL,
        Error::Config(_) => KOLO_ERR_CONFIG,
        Error::Rendezvous { .. } => KOLO_ERR_RENDEZVOUS,
        Error::Io(_) => KOLO_ERR_IO,
        // Only elastic Rust programs see it; for C it is a lost peer.
        Error::MembershipChanged { .. } => KOLO_ERR_PEER_LOST,
    }
}

// ---------------------------------------------------------------------------
// Types.

/// `kolo_dtype` in C: the element type of a buffer. Its values are
/// `kolo::DType::code()` (1..=7, stable wire codes); 0 and anything else is
/// rejected with `KOLO_ERR_INVALID_ARGUMENT`. A transparent `int` so that any
/// value a C caller passes is representable.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kolo_dtype(pub c_int);

/// `kolo_op` in C: the reduction operator. Its values are
/// `kolo::ReduceOp::code()` (1..=5); anything else is rejected.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kolo_op(pub c_int);

/// The `kolo_dtype` enumerators in `kolo.h`, in declaration order.
pub const DTYPES: [(&str, DType); 7] = [
    ("KOLO_UINT8", DType::U8),
    ("KOLO_INT32", DType::I32),
    ("KOLO_INT64", DType::I64),
    ("KOLO_FLOAT16", DType::F16),
    ("KOLO_BFLOAT16", DType::BF16),
    ("KOLO_FLOAT32", DType::F32),
    ("KOLO_FLOAT64", DType::F64),
];

/// The `kolo_op` enumerators in `kolo.h`, in declaration order.
pub const OPS: [(&str, ReduceOp); 5] = [
    ("KOLO_SUM", ReduceOp::Sum),
    ("KOLO_PROD", ReduceOp::Prod),
    ("KOLO_MIN", ReduceOp::Min),
    ("KOLO_MAX", ReduceOp::Max),
    ("KOLO_AVG", ReduceOp::Avg),
];

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
    rank: usize,
    size: usize,
    local_rank: usize,
    mode: RwLock<Mode>,
    /// Blocking calls run through the engine so far (their automatic names).
    sync_calls: AtomicU64,
}

/// Who owns the communicator.
enum Mode {
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
enum Via<'a> {
    /// On the communicator.
    Comm(&'a Communicator),
    /// As the engine operation of this (automatic) name, waited for at once.
    Engine(&'a Engine, String),
}

/// Prefix of the names the library gives blocking calls run through the
/// engine; names starting with [`RESERVED`] are refused to callers.
const SYNC_PREFIX: &str = "kolo.sync.";
/// Engine names reserved for the library.
const RESERVED: &str = "kolo.";

impl kolo_comm {
    fn new(comm: Communicator) -> kolo_comm {
        kolo_comm {
            rank: comm.rank(),
            size: comm.size(),
            local_rank: comm.local_rank(),
            mode: RwLock::new(Mode::Direct(Box::new(comm))),
            sync_calls: AtomicU64::new(0),
        }
    }

    fn mode(&self) -> RwLockReadGuard<'_, Mode> {
        self.mode.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run a blocking collective, after its arguments were checked: on the
    /// communicator, or through the engine under the next automatic name
    /// (the same on every rank, as blocking calls come in the same order).
    fn run<R>(&self, f: impl FnOnce(Via<'_>) -> kolo::Result<R>) -> kolo::Result<R> {
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
    fn with_engine<R>(&self, f: impl FnOnce(&Engine) -> kolo::Result<R>) -> kolo::Result<R> {
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

/// `kolo_handle` in C (opaque): one asynchronous operation, from
/// `kolo_allreduce_async` until `kolo_wait` frees it.
///
/// ```c
/// kolo_handle *h;
/// kolo_allreduce_async(comm, "grad", grad, n, KOLO_FLOAT32, KOLO_AVG, &h);
/// kolo_wait(h);
/// ```
pub struct kolo_handle {
    handle: Handle<()>,
}

// ---------------------------------------------------------------------------
// Errors and the boundary.

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    // NULs cannot be in a C string; kolo messages have none, but be total.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // try_with: during thread teardown the slot may be gone; drop the message then.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Run the body of export `name`: `Ok` is `KOLO_OK`; an error or a panic
/// becomes its status and the thread's last error message.
fn guard(name: &str, body: impl FnOnce() -> kolo::Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => KOLO_OK,
        Ok(Err(e)) => {
            let code = status_of(&e);
            set_last_error(e.to_string());
            code
        }
        Err(p) => {
            set_last_error(format!(
                "internal error: {name} panicked: {}",
                panic_text(&*p)
            ));
            KOLO_ERR_INTERNAL
        }
    }
}

fn invalid(name: &str, msg: std::fmt::Arguments) -> Error {
    Error::InvalidArgument(format!("{name}: {msg}"))
}

/// `&kolo_comm` from a C pointer; NULL is an invalid argument.
///
/// # Safety
/// `comm` is NULL or a pointer from `kolo_init_from_env` not yet destroyed.
unsafe fn comm_ref<'a>(name: &str, comm: *const kolo_comm) -> kolo::Result<&'a kolo_comm> {
    // SAFETY: by the caller's contract a non-NULL `comm` is a live kolo_comm.
    unsafe { comm.as_ref() }.ok_or_else(|| invalid(name, format_args!("comm is NULL")))
}

/// `&mut T` from a C out-pointer; NULL is an invalid argument.
///
/// # Safety
/// `p` is NULL or valid for writes of one `T`.
unsafe fn out<'a, T>(name: &str, what: &str, p: *mut T) -> kolo::Result<&'a mut T> {
    // SAFETY: by the caller's contract a non-NULL `p` is writable.
    unsafe { p.as_mut() }.ok_or_else(|| invalid(name, format_args!("{what} is NULL")))
}

fn dtype_of(name: &str, d: kolo_dtype) -> kolo::Result<DType> {
    u8::try_from(d.0)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| invalid(name, format_args!("unknown kolo_dtype {}", d.0)))
}

fn op_of(name: &str, o: kolo_op) -> kolo::Result<ReduceOp> {
    u8::try_from(o.0)
        .ok()
        .and_then(ReduceOp::from_code)
        .ok_or_else(|| invalid(name, format_args!("unknown kolo_op {}", o.0)))
}

fn to_int(name: &str, what: &str, v: usize) -> kolo::Result<c_int> {
    c_int::try_from(v).map_err(|_| invalid(name, format_args!("{what} {v} does not fit an int")))
}

/// `a * b` elements, or an invalid-argument error naming both.
fn mul(name: &str, what: &str, a: usize, b: usize) -> kolo::Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(name, format_args!("{what} {a} * {b} overflows size_t")))
}

/// A C buffer of `count` elements of `T`, checked: non-NULL unless empty,
/// aligned for `T`, at most `isize::MAX` bytes, not wrapping the address space.
/// Returns the pointer to use (dangling when empty) and its length in bytes.
#[derive(Clone, Copy)]
struct Buf<T> {
    ptr: *mut T,
    count: usize,
}

impl<T: Element> Buf<T> {
    fn new(name: &str, what: &str, p: *const c_void, count: usize) -> kolo::Result<Buf<T>> {
        let size = std::mem::size_of::<T>();
        let dt = T::DTYPE;
        let bytes = count
            .checked_mul(size)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                invalid(
                    name,
                    format_args!("{what}: {count} elements of {dt} overflow the address space"),
                )
            })?;
        if count == 0 {
            return Ok(Buf {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                count,
            });
        }
        if p.is_null() {
            return Err(invalid(
                name,
                format_args!("{what} is NULL but its count is {count}"),
            ));
        }
        let addr = p as usize;
        if !p.cast::<T>().is_aligned() {
            return Err(invalid(
                name,
                format_args!(
                    "{what} ({p:p}) is not aligned to {} bytes for {dt}",
                    std::mem::align_of::<T>()
                ),
            ));
        }
        if addr.checked_add(bytes).is_none() {
            return Err(invalid(
                name,
                format_args!("{what} ({p:p}) + {bytes} bytes wraps the address space"),
            ));
        }
        Ok(Buf {
            ptr: p as *mut T,
            count,
        })
    }

    fn range(&self) -> std::ops::Range<usize> {
        let a = self.ptr as usize;
        a..a + self.count * std::mem::size_of::<T>()
    }

    fn overlaps<U: Element>(&self, other: &Buf<U>) -> bool {
        let (a, b) = (self.range(), other.range());
        a.start < b.end && b.start < a.end
    }

    /// # Safety
    /// The C caller's buffer is valid for reads of `count` elements for `'a`,
    /// and nothing writes it meanwhile.
    unsafe fn slice<'a>(self) -> &'a [T] {
        // SAFETY: checked in `new` (non-NULL or dangling, aligned, size); validity per contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.count) }
    }

    /// # Safety
    /// As `slice`, for writes, and no other reference to it exists for `'a`.
    unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
        // SAFETY: as in `slice`; exclusivity per contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.count) }
    }
}

/// The input and output of an out-of-place collective. When the C caller's
/// buffers overlap (e.g. NCCL-style in-place allgather, where sendbuf is this
/// rank's block of recvbuf), the input is copied first so the Rust API gets
/// disjoint slices.
///
/// # Safety
/// Both buffers valid per `Buf::slice`/`Buf::slice_mut` for `'a`.
unsafe fn in_out<'a, T: Element>(send: Buf<T>, recv: Buf<T>) -> (Cow<'a, [T]>, &'a mut [T]) {
    // SAFETY: per this function's contract; the shared slice of `send` is
    // dropped (copied) before the exclusive slice of `recv` is made when they overlap.
    unsafe {
        if send.overlaps(&recv) {
            let copy = send.slice().to_vec();
            (Cow::Owned(copy), recv.slice_mut())
        } else {
            (Cow::Borrowed(send.slice()), recv.slice_mut())
        }
    }
}

/// Call `$f::<T>($args)` with `T` the Rust element type of runtime dtype `$d`.
macro_rules! dispatch {
    ($d:expr, $f:ident($($arg:expr),*)) => {
        match $d {
            DType::U8 => $f::<u8>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
        }
    };
}

// ---------------------------------------------------------------------------
// Typed bodies of the collectives (one monomorphized copy per dtype).

const ALLREDUCE: &str = "kolo_allreduce";
const BROADCAST: &str = "kolo_broadcast";
const ALLGATHER: &str = "kolo_allgather";
const REDUCE_SCATTER: &str = "kolo_reduce_scatter";
const ALLTOALL: &str = "kolo_alltoall";
const ALLREDUCE_ASYNC: &str = "kolo_allreduce_async";

/// Through the engine, for the collectives whose engine form takes a `Vec`:
/// submit a copy of `send`, wait, and copy the result to `recv`.
///
/// # Safety
/// `send` readable and `recv` writable per `Buf::slice`/`Buf::slice_mut`
/// (they may overlap: the input is copied before the output is written).
unsafe fn via_vec<T: Element>(
    send: Buf<T>,
    recv: Buf<T>,
    submit: impl FnOnce(Vec<T>) -> kolo::Result<Handle<Vec<T>>>,
) -> kolo::Result<()> {
    // SAFETY: the contract above; the shared slice ends with the copy.
    let input = unsafe { send.slice() }.to_vec();
    let out = submit(input)?.wait()?;
    if out.len() != recv.count {
        return Err(Error::InvalidArgument(format!(
            "the engine returned {} elements for a buffer of {}",
            out.len(),
            recv.count
        )));
    }
    // SAFETY: the contract above.
    unsafe { recv.slice_mut() }.copy_from_slice(&out);
    Ok(())
}

/// # Safety
/// The export's contract.
unsafe fn allreduce_t<T: Element>(
    k: &kolo_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    op: ReduceOp,
) -> kolo::Result<()> {
    let r = Buf::<T>::new(ALLREDUCE, "recvbuf", recv, count)?;
    if !std::ptr::eq(send, recv) {
        let s = Buf::<T>::new(ALLREDUCE, "sendbuf", send, count)?;
        // SAFETY: both checked for `count` elements; `copy` allows overlap.
        unsafe { std::ptr::copy(s.ptr, r.ptr, count) };
    }
    k.run(|via| match via {
        // SAFETY: the export's contract.
        Via::Comm(c) => c.allreduce(unsafe { r.slice_mut() }, op),
        // SAFETY: `r` is checked and, by the export's contract, valid and
        // untouched until the wait returns.
        Via::Engine(e, name) => unsafe {
            e.allreduce_async_raw(&name, r.ptr.cast(), count, T::DTYPE, op)?
                .wait()
        },
    })
}

/// # Safety
/// The export's contract.
unsafe fn broadcast_t<T: Element + Default>(
    k: &kolo_comm,
    buf: *mut c_void,
    count: usize,
    root: usize,
) -> kolo::Result<()> {
    let b = Buf::<T>::new(BROADCAST, "buf", buf, count)?;
    k.run(|via| match via {
        // SAFETY: the export's contract.
        Via::Comm(c) => c.broadcast(unsafe { b.slice_mut() }, root),
        // SAFETY: the export's contract.
        Via::Engine(e, name) => unsafe { via_vec(b, b, |v| e.broadcast_async(&name, v, root)) },
    })
}

/// # Safety
/// The export's contract.
unsafe fn allgather_t<T: Element + Default>(
    k: &kolo_comm,
    send: *const c_void,
    recv: *mut c_void,
    sendcount: usize,
) -> kolo::Result<()> {
    let total = mul(
        ALLGATHER,
        "recv count = sendcount * size:",
        sendcount,
        k.size,
    )?;
    let s = Buf::<T>::new(ALLGATHER, "sendbuf", send, sendcount)?;
    let r = Buf::<T>::new(ALLGATHER, "recvbuf", recv, total)?;
    k.run(|via| match via {
        Via::Comm(c) => {
            // SAFETY: the export's contract.
            let (s, r) = unsafe { in_out(s, r) };
            c.allgather(&s, r)
        }
        // The engine's allgather lets the first dimension differ between
        // ranks; one row of `sendcount` per rank makes it check the count.
        // SAFETY: the export's contract.
        Via::Engine(e, name) => unsafe {
            via_vec(s, r, |v| {
                e.submit(Op::allgather(&name, v).shape(&[1, sendcount]))
            })
        },
    })
}

/// # Safety
/// The export's contract.
unsafe fn reduce_scatter_t<T: Element + Default>(
    k: &kolo_comm,
    send: *const c_void,
    recv: *mut c_void,
    recvcount: usize,
    op: ReduceOp,
) -> kolo::Result<()> {
    let total = mul(
        REDUCE_SCATTER,
        "send count = recvcount * size:",
        recvcount,
        k.size,
    )?;
    let s = Buf::<T>::new(REDUCE_SCATTER, "sendbuf", send, total)?;
    let r = Buf::<T>::new(REDUCE_SCATTER, "recvbuf", recv, recvcount)?;
    k.run(|via| match via {
        Via::Comm(c) => {
            // SAFETY: the export's contract.
            let (s, r) = unsafe { in_out(s, r) };
            c.reduce_scatter(&s, r, op)
        }
        // SAFETY: the export's contract.
        Via::Engine(e, name) => unsafe { via_vec(s, r, |v| e.reduce_scatter_async(&name, v, op)) },
    })
}

/// # Safety
/// The export's contract.
unsafe fn alltoall_t<T: Element + Default>(
    k: &kolo_comm,
    send: *const c_void,
    recv: *mut c_void,
    per_rank: usize,
) -> kolo::Result<()> {
    let total = mul(ALLTOALL, "count = count_per_rank * size:", per_rank, k.size)?;
    let s = Buf::<T>::new(ALLTOALL, "sendbuf", send, total)?;
    let r = Buf::<T>::new(ALLTOALL, "recvbuf", recv, total)?;
    k.run(|via| match via {
        Via::Comm(c) => {
            // SAFETY: the export's contract.
            let (s, r) = unsafe { in_out(s, r) };
            c.alltoall(&s, r)
        }
        // SAFETY: the export's contract.
        Via::Engine(e, name) => unsafe { via_vec(s, r, |v| e.alltoall_async(&name, v)) },
    })
}

/// The checked pointer of an asynchronous operation's buffer.
fn async_buf<T: Element>(buf: *mut c_void, count: usize) -> kolo::Result<*mut u8> {
    Ok(Buf::<T>::new(ALLREDUCE_ASYNC, "buf", buf, count)?
        .ptr
        .cast())
}

// ---------------------------------------------------------------------------
// Exports. Each is documented in kolo.h; the contract common to all: pointers
// are NULL or valid for the access described, and a communicator is not
// destroyed while another thread uses it.

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
/// fail), close the connections and free the communicator. NULL is an
/// invalid argument.
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

/// Elementwise reduction of `count` elements across ranks into `recvbuf` on
/// every rank (`Communicator::allreduce`). `sendbuf == recvbuf` is in place;
/// otherwise `sendbuf` is copied to `recvbuf` first and reduced there.
///
/// # Safety
/// `comm` live; `sendbuf` readable and `recvbuf` writable for `count`
/// elements of `dtype` (or NULL when `count` is 0).
///
/// ```c
/// kolo_allreduce(comm, grad, grad, n, KOLO_FLOAT32, KOLO_SUM);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_allreduce(
    comm: *mut kolo_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: kolo_dtype,
    op: kolo_op,
) -> c_int {
    guard(ALLREDUCE, || {
        // SAFETY: the contract above.
        let c = unsafe { comm_ref(ALLREDUCE, comm) }?;
        let (d, op) = (dtype_of(ALLREDUCE, dtype)?, op_of(ALLREDUCE, op)?);
        // SAFETY: the contract above.
        unsafe { dispatch!(d, allreduce_t(c, sendbuf, recvbuf, count, op)) }
    })
}

/// Copy `count` elements of `root`'s `buf` into `buf` on every rank
/// (`Communicator::broadcast`).
///
/// # Safety
/// `comm` live; `buf` writable for `count` elements of `dtype`.
///
/// ```c
/// kolo_broadcast(comm, params, n, KOLO_FLOAT64, 0);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_broadcast(
    comm: *mut kolo_comm,
    buf: *mut c_void,
    count: usize,
    dtype: kolo_dtype,
    root: c_int,
) -> c_int {
    guard(BROADCAST, || {
        // SAFETY: the contract above.
        let c = unsafe { comm_ref(BROADCAST, comm) }?;
        let d = dtype_of(BROADCAST, dtype)?;
        let root = usize::try_from(root)
            .map_err(|_| invalid(BROADCAST, format_args!("root {root} is negative")))?;
        // SAFETY: the contract above.
        unsafe { dispatch!(d, broadcast_t(c, buf, count, root)) }
    })
}

/// Gather `sendcount` elements from every rank into `recvbuf`
/// (`size * sendcount` elements, in rank order; `Communicator::allgather`).
///
/// # Safety
/// `comm` live; buffers valid for those counts. They may overlap (in place:
/// `sendbuf == recvbuf + rank * sendcount`).
///
/// ```c
/// kolo_allgather(comm, mine, all, n, KOLO_INT32);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_allgather(
    comm: *mut kolo_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    dtype: kolo_dtype,
) -> c_int {
    guard(ALLGATHER, || {
        // SAFETY: the contract above.
        let c = unsafe { comm_ref(ALLGATHER, comm) }?;
        let d = dtype_of(ALLGATHER, dtype)?;
        // SAFETY: the contract above.
        unsafe { dispatch!(d, allgather_t(c, sendbuf, recvbuf, sendcount)) }
    })
}

/// Reduce `size * recvcount` elements of `sendbuf` across ranks and leave
/// block `rank` of the result in `recvbuf` (`Communicator::reduce_scatter`).
///
/// # Safety
/// `comm` live; buffers valid for those counts; they may overlap.
///
/// ```c
/// kolo_reduce_scatter(comm, grads, shard, n, KOLO_BFLOAT16, KOLO_SUM);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_reduce_scatter(
    comm: *mut kolo_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    dtype: kolo_dtype,
    op: kolo_op,
) -> c_int {
    guard(REDUCE_SCATTER, || {
        // SAFETY: the contract above.
        let c = unsafe { comm_ref(REDUCE_SCATTER, comm) }?;
        let (d, op) = (dtype_of(REDUCE_SCATTER, dtype)?, op_of(REDUCE_SCATTER, op)?);
        // SAFETY: the contract above.
        unsafe { dispatch!(d, reduce_scatter_t(c, sendbuf, recvbuf, recvcount, op)) }
    })
}

/// Send block `j` of `sendbuf` to rank `j` and receive block `i` of `recvbuf`
/// from rank `i`; both hold `size` blocks of `count_per_rank` elements
/// (`Communicator::alltoall`).
///
/// # Safety
/// `comm` live; buffers valid for `size * count_per_rank` elements; they may overlap.
///
/// ```c
/// kolo_alltoall(comm, out, in, n, KOLO_INT64);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_alltoall(
    comm: *mut kolo_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count_per_rank: usize,
    dtype: kolo_dtype,
) -> c_int {
    guard(ALLTOALL, || {
        // SAFETY: the contract above.
        let c = unsafe { comm_ref(ALLTOALL, comm) }?;
        let d = dtype_of(ALLTOALL, dtype)?;
        // SAFETY: the contract above.
        unsafe { dispatch!(d, alltoall_t(c, sendbuf, recvbuf, count_per_rank)) }
    })
}

/// Return once every rank has entered the barrier (`Communicator::barrier`).
///
/// # Safety
/// `comm` live.
///
/// ```c
/// kolo_barrier(comm);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_barrier(comm: *mut kolo_comm) -> c_int {
    const NAME: &str = "kolo_barrier";
    guard(NAME, || {
        // SAFETY: the contract above.
        unsafe { comm_ref(NAME, comm) }?.run(|via| match via {
            Via::Comm(c) => c.barrier(),
            // An engine barrier: a one-byte allreduce, which no rank
            // completes before every rank has submitted it.
            Via::Engine(e, name) => e
                .allreduce_async(&name, vec![0u8], ReduceOp::Sum)?
                .wait()
                .map(drop),
        })
    })
}

/// Start an in-place allreduce of `count` elements of `buf` under `name`
/// through the engine (`Engine::allreduce_async_raw`), starting the engine on
/// the first call (at the same point among the blocking calls on every rank),
/// and store its handle in `*handle` (NULL on failure). Names starting with
/// `kolo.` are refused: the library names blocking calls `kolo.sync.<n>`.
///
/// # Safety
/// `comm` live; `name` NULL or a NUL-terminated string; `buf` valid for
/// reads and writes of `count` elements of `dtype`, and neither read nor
/// written by the caller until `kolo_wait` returns; `handle` NULL or writable.
///
/// ```c
/// kolo_handle *h;
/// kolo_allreduce_async(comm, "layer1.grad", grad, n, KOLO_FLOAT32, KOLO_AVG, &h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_allreduce_async(
    comm: *mut kolo_comm,
    name: *const c_char,
    buf: *mut c_void,
    count: usize,
    dtype: kolo_dtype,
    op: kolo_op,
    handle: *mut *mut kolo_handle,
) -> c_int {
    const NAME: &str = ALLREDUCE_ASYNC;
    guard(NAME, || {
        // SAFETY: the contract above.
        let slot = unsafe { out(NAME, "handle", handle) }?;
        *slot = std::ptr::null_mut();
        // SAFETY: the contract above.
        let k = unsafe { comm_ref(NAME, comm) }?;
        if name.is_null() {
            return Err(invalid(NAME, format_args!("name is NULL")));
        }
        // SAFETY: non-NULL and, by the contract, NUL-terminated.
        let tensor = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| invalid(NAME, format_args!("name is not UTF-8")))?;
        if tensor.starts_with(RESERVED) {
            return Err(invalid(
                NAME,
                format_args!("name {tensor:?}: names starting with {RESERVED:?} are reserved"),
            ));
        }
        let (d, op) = (dtype_of(NAME, dtype)?, op_of(NAME, op)?);
        let ptr = dispatch!(d, async_buf(buf, count))?;
        // SAFETY: `ptr` is checked for `count` elements of `d`; the caller
        // keeps the memory valid and untouched until kolo_wait returns.
        let h = k.with_engine(|e| unsafe { e.allreduce_async_raw(tensor, ptr, count, d, op) })?;
        *slot = Box::into_raw(Box::new(kolo_handle { handle: h }));
        Ok(())
    })
}

/// Block until the operation of `handle` has finished, return its status,
/// and free the handle (`Handle::wait`).
///
/// # Safety
/// `handle` NULL or from `kolo_allreduce_async`, not yet waited for, and no
/// other thread is using it.
///
/// ```c
/// if (kolo_wait(h) != KOLO_OK) fprintf(stderr, "%s\n", kolo_last_error());
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_wait(handle: *mut kolo_handle) -> c_int {
    const NAME: &str = "kolo_wait";
    guard(NAME, || {
        if handle.is_null() {
            return Err(invalid(NAME, format_args!("handle is NULL")));
        }
        // SAFETY: the contract above: the pointer came from Box::into_raw.
        let h = unsafe { Box::from_raw(handle) };
        h.handle.wait()
    })
}

/// Set `*done` to 1 if the operation of `handle` has finished (successfully
/// or not), else 0, without blocking (`Handle::poll`). Frees nothing: the
/// handle is still to be passed to `kolo_wait`, which then returns at once
/// with the operation's status.
///
/// # Safety
/// `handle` NULL or a live handle no other thread is using; `done` NULL or writable.
///
/// ```c
/// int done = 0;
/// while (kolo_test(h, &done) == KOLO_OK && !done) { /* other work */ }
/// kolo_wait(h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_test(handle: *mut kolo_handle, done: *mut c_int) -> c_int {
    const NAME: &str = "kolo_test";
    guard(NAME, || {
        // SAFETY: the contract above.
        let h = unsafe { handle.as_mut() }
            .ok_or_else(|| invalid(NAME, format_args!("handle is NULL")))?;
        // SAFETY: the contract above.
        let d = unsafe { out(NAME, "done", done) }?;
        *d = c_int::from(h.handle.poll());
        Ok(())
    })
}

/// The full message of the last failed kolo call on this thread ("" if none).
/// Successful calls leave it alone. The pointer stays valid until the next
/// failing kolo call on this thread or the thread's exit; never NULL.
///
/// ```c
/// if (rc != KOLO_OK) fprintf(stderr, "kolo: %s\n", kolo_last_error());
/// ```
#[no_mangle]
pub extern "C" fn kolo_last_error() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|e| e.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
    .unwrap_or(c"".as_ptr())
}

/// A static description of a status code ("unknown status" for others); never NULL.
///
/// ```c
/// printf("%s\n", kolo_status_string(KOLO_ERR_TIMEOUT)); /* "timeout" */
/// ```
#[no_mangle]
pub extern "C" fn kolo_status_string(status: c_int) -> *const c_char {
    STATUSES
        .iter()
        .find(|s| s.0 == status)
        .map_or(c"unknown status", |s| s.2)
        .as_ptr()
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

#[cfg(test)]
mod tests;
