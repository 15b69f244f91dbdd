//! Asynchronous named operations through the engine, as in Horovod: every
//! collective in an `_async` form, per-call compression, grouped submits and
//! join. Each export checks what only the C side can get wrong and calls the
//! engine method a Rust user calls ([`Engine::allreduce_async_raw_compressed`],
//! [`Engine::submit`], [`Engine::group`], [`Engine::join`]).
//!
//! In-place allreduces hand the caller's memory to the engine; the other
//! collectives give the engine a copy of the input (its `Vec` API) and copy
//! the result into the caller's output buffer when `kolo_wait` returns.

use super::*;
use kolo::compress::Compression;

pub(crate) const ALLREDUCE_ASYNC: &str = "kolo_allreduce_async";
const ALLREDUCE_COMPRESSED: &str = "kolo_allreduce_async_compressed";
const ALLGATHER_ASYNC: &str = "kolo_allgather_async";
const BROADCAST_ASYNC: &str = "kolo_broadcast_async";
const REDUCE_SCATTER_ASYNC: &str = "kolo_reduce_scatter_async";
const ALLTOALL_ASYNC: &str = "kolo_alltoall_async";
const GROUPED: &str = "kolo_grouped_allreduce_async";

/// What a `kolo_handle` waits for: the engine's handle, and for collectives
/// run on a copy, where the result goes.
trait Pending {
    /// True once the operation has finished; never blocks.
    fn poll(&mut self) -> bool;
    /// True once the operation has finished, waiting at most `limit`.
    fn ready_within(&mut self, limit: std::time::Duration) -> bool;
    /// Wait, and deliver the result to the caller's buffer.
    fn wait(self: Box<Self>) -> kolo::Result<()>;
}

/// An in-place allreduce of caller memory: the engine writes the result.
impl Pending for Handle<()> {
    fn poll(&mut self) -> bool {
        Handle::poll(self)
    }
    fn ready_within(&mut self, limit: std::time::Duration) -> bool {
        Handle::ready_within(self, limit)
    }
    fn wait(self: Box<Self>) -> kolo::Result<()> {
        Handle::wait(*self)
    }
}

/// A collective run on a copy of the input: the result is copied to `recv`.
struct CopyOut<T: Element> {
    handle: Handle<Vec<T>>,
    recv: Buf<T>,
    rank: usize,
}

impl<T: Element> Pending for CopyOut<T> {
    fn poll(&mut self) -> bool {
        self.handle.poll()
    }
    fn ready_within(&mut self, limit: std::time::Duration) -> bool {
        self.handle.ready_within(limit)
    }
    fn wait(self: Box<Self>) -> kolo::Result<()> {
        let name = self.handle.name().to_string();
        let out = self.handle.wait()?;
        if out.len() != self.recv.count {
            // The ranks' counts disagree with this rank's output buffer
            // (an uneven allgather whose total the caller got wrong).
            return Err(Error::InvalidArgument(format!(
                "rank {}: engine tensor {name:?}: the result has {} elements but the output buffer holds {}",
                self.rank,
                out.len(),
                self.recv.count
            )));
        }
        // SAFETY: `recv` was checked for `count` elements; by the export's
        // contract it stays valid and untouched until kolo_wait returns.
        unsafe { self.recv.slice_mut() }.copy_from_slice(&out);
        Ok(())
    }
}

/// `kolo_handle` in C (opaque): one asynchronous operation, from its
/// `kolo_*_async` call until `kolo_wait` frees it.
///
/// ```c
/// kolo_handle *h;
/// kolo_allreduce_async(comm, "grad", grad, n, KOLO_FLOAT32, KOLO_AVG, &h);
/// kolo_wait(h);
/// ```
pub struct kolo_handle {
    pending: Box<dyn Pending>,
}

/// A tensor name from C: non-NULL, UTF-8, and not in the library's `kolo.` namespace.
///
/// # Safety
/// `name` is NULL or NUL-terminated and outlives `'a`.
unsafe fn tensor_name<'a>(export: &str, what: &str, name: *const c_char) -> kolo::Result<&'a str> {
    if name.is_null() {
        return Err(invalid(export, format_args!("{what} is NULL")));
    }
    // SAFETY: non-NULL and, by the contract, NUL-terminated.
    let s = unsafe { CStr::from_ptr(name) }
        .to_str()
        .map_err(|_| invalid(export, format_args!("{what} is not UTF-8")))?;
    if s.starts_with(RESERVED) {
        return Err(invalid(
            export,
            format_args!("{what} {s:?}: names starting with {RESERVED:?} are reserved"),
        ));
    }
    Ok(s)
}

/// A compression from C: NULL is none; else what `Compression::parse` reads.
///
/// # Safety
/// `c` is NULL or NUL-terminated.
unsafe fn compression_of(export: &str, c: *const c_char) -> kolo::Result<Compression> {
    if c.is_null() {
        return Ok(Compression::None);
    }
    // SAFETY: non-NULL and, by the contract, NUL-terminated.
    let s = unsafe { CStr::from_ptr(c) }.to_string_lossy();
    Compression::parse(&s).ok_or_else(|| {
        invalid(
            export,
            format_args!("unknown compression {s:?} (none, fp16, bf16, topk, topk:DENSITY)"),
        )
    })
}

/// The body every async export shares: clear `*handle`, run `submit` (which
/// checks the rest and starts the operation) and store the new handle.
///
/// # Safety
/// `comm` live or NULL; `handle` NULL or writable.
unsafe fn start(
    export: &str,
    comm: *mut kolo_comm,
    handle: *mut *mut kolo_handle,
    submit: impl FnOnce(&kolo_comm) -> kolo::Result<Box<dyn Pending>>,
) -> c_int {
    guard(export, || {
        // SAFETY: the caller's contract.
        let slot = unsafe { out(export, "handle", handle) }?;
        *slot = std::ptr::null_mut();
        // SAFETY: the caller's contract.
        let k = unsafe { comm_ref(export, comm) }?;
        let pending = submit(k)?;
        *slot = Box::into_raw(Box::new(kolo_handle { pending }));
        Ok(())
    })
}

/// Submit `op` (on a copy of the input) and copy its result to `recv` at the wait.
///
/// # Safety
/// `send` readable for its count until this returns; `recv` writable until the wait.
unsafe fn copy_out<'n, T: Element + Default>(
    k: &kolo_comm,
    op: impl FnOnce(Vec<T>) -> Op<'n, T>,
    send: Buf<T>,
    recv: Buf<T>,
) -> kolo::Result<Box<dyn Pending>> {
    // SAFETY: the contract above.
    let input = unsafe { send.slice() }.to_vec();
    let handle = k.with_engine(|e| e.submit(op(input)))?;
    Ok(Box::new(CopyOut {
        handle,
        recv,
        rank: k.rank,
    }))
}

// ---------------------------------------------------------------------------
// Typed bodies (one copy per dtype). Safety: the export's contract.

unsafe fn raw_allreduce_t<T: Element>(
    k: &kolo_comm,
    export: &str,
    name: &str,
    buf: *mut c_void,
    count: usize,
    op: ReduceOp,
    c: &Compression,
) -> kolo::Result<Box<dyn Pending>> {
    let b = Buf::<T>::new(export, "buf", buf, count)?;
    // SAFETY: `b` is checked for `count` elements of T; the caller keeps the
    // memory valid and untouched until kolo_wait returns.
    let h = k.with_engine(|e| unsafe {
        e.allreduce_async_raw_compressed(name, b.ptr.cast(), count, T::DTYPE, op, c)
    })?;
    Ok(Box::new(h))
}

unsafe fn allgather_async_t<T: Element + Default>(
    k: &kolo_comm,
    name: &str,
    (send, sendcount): (*const c_void, usize),
    (recv, recvcount): (*mut c_void, usize),
) -> kolo::Result<Box<dyn Pending>> {
    let s = Buf::<T>::new(ALLGATHER_ASYNC, "sendbuf", send, sendcount)?;
    let r = Buf::<T>::new(ALLGATHER_ASYNC, "recvbuf", recv, recvcount)?;
    // SAFETY: the export's contract.
    unsafe { copy_out(k, |v| Op::allgather(name, v), s, r) }
}

unsafe fn broadcast_async_t<T: Element + Default>(
    k: &kolo_comm,
    name: &str,
    buf: *mut c_void,
    count: usize,
    root: usize,
) -> kolo::Result<Box<dyn Pending>> {
    let b = Buf::<T>::new(BROADCAST_ASYNC, "buf", buf, count)?;
    // SAFETY: the export's contract.
    unsafe { copy_out(k, |v| Op::broadcast(name, v, root), b, b) }
}

unsafe fn reduce_scatter_async_t<T: Element + Default>(
    k: &kolo_comm,
    name: &str,
    (send, recv): (*const c_void, *mut c_void),
    recvcount: usize,
    op: ReduceOp,
) -> kolo::Result<Box<dyn Pending>> {
    let what = "send count = recvcount * size:";
    let total = mul(REDUCE_SCATTER_ASYNC, what, recvcount, k.size)?;
    let s = Buf::<T>::new(REDUCE_SCATTER_ASYNC, "sendbuf", send, total)?;
    let r = Buf::<T>::new(REDUCE_SCATTER_ASYNC, "recvbuf", recv, recvcount)?;
    // SAFETY: the export's contract.
    unsafe { copy_out(k, |v| Op::reduce_scatter(name, v, op), s, r) }
}

unsafe fn alltoall_async_t<T: Element + Default>(
    k: &kolo_comm,
    name: &str,
    (send, recv): (*const c_void, *mut c_void),
    per_rank: usize,
) -> kolo::Result<Box<dyn Pending>> {
    let what = "count = count_per_rank * size:";
    let total = mul(ALLTOALL_ASYNC, what, per_rank, k.size)?;
    let s = Buf::<T>::new(ALLTOALL_ASYNC, "sendbuf", send, total)?;
    let r = Buf::<T>::new(ALLTOALL_ASYNC, "recvbuf", recv, total)?;
    // SAFETY: the export's contract.
    unsafe { copy_out(k, |v| Op::alltoall(name, v), s, r) }
}

/// Check one group member's buffer (before anything is added to the group).
fn check_member<T: Element>(buf: *mut c_void, count: usize) -> kolo::Result<()> {
    Buf::<T>::new(GROUPED, "bufs[i]", buf, count).map(drop)
}

/// Add a checked member to the group, on a copy; the handle copies the result back.
unsafe fn add_member<T: Element + Default>(
    g: &mut kolo::engine::Group<'_>,
    rank: usize,
    name: &str,
    (buf, count): (*mut c_void, usize),
    op: ReduceOp,
) -> kolo::Result<Box<dyn Pending>> {
    let b = Buf::<T>::new(GROUPED, "bufs[i]", buf, count)?;
    // SAFETY: checked for `count` elements; readable by the export's contract.
    let input = unsafe { b.slice() }.to_vec();
    let handle = g.add(Op::allreduce(name, input, op));
    Ok(Box::new(CopyOut {
        handle,
        recv: b,
        rank,
    }))
}

// ---------------------------------------------------------------------------
// Exports (documented in kolo.h). Each starts the engine on its first call.

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
    // SAFETY: the contract above.
    unsafe {
        allreduce_async_in(
            ALLREDUCE_ASYNC,
            comm,
            name,
            buf,
            count,
            dtype,
            op,
            None,
            handle,
        )
    }
}

/// `kolo_allreduce_async` with compression on the wire
/// (`Engine::allreduce_async_raw_compressed`): `compression` is NULL or
/// `"none"`, `"fp16"`, `"bf16"`, `"topk"` or `"topk:DENSITY"`; anything but
/// none needs `KOLO_FLOAT32`. Ranks must agree on it.
///
/// # Safety
/// As `kolo_allreduce_async`; `compression` NULL or NUL-terminated.
///
/// ```c
/// kolo_allreduce_async_compressed(comm, "g", grad, n, KOLO_FLOAT32, KOLO_AVG, "fp16", &h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_allreduce_async_compressed(
    comm: *mut kolo_comm,
    name: *const c_char,
    buf: *mut c_void,
    count: usize,
    dtype: kolo_dtype,
    op: kolo_op,
    compression: *const c_char,
    handle: *mut *mut kolo_handle,
) -> c_int {
    let (n, c) = (ALLREDUCE_COMPRESSED, compression);
    // SAFETY: the contract above.
    unsafe { allreduce_async_in(n, comm, name, buf, count, dtype, op, Some(c), handle) }
}

/// The body of both allreduce exports.
///
/// # Safety
/// As `kolo_allreduce_async_compressed`.
#[allow(clippy::too_many_arguments)]
unsafe fn allreduce_async_in(
    export: &'static str,
    comm: *mut kolo_comm,
    name: *const c_char,
    buf: *mut c_void,
    count: usize,
    dtype: kolo_dtype,
    op: kolo_op,
    compression: Option<*const c_char>,
    handle: *mut *mut kolo_handle,
) -> c_int {
    // SAFETY: the exports' contract.
    unsafe {
        start(export, comm, handle, |k| {
            let tensor = tensor_name(export, "name", name)?;
            let (d, op) = (dtype_of(export, dtype)?, op_of(export, op)?);
            let c = compression_of(export, compression.unwrap_or(std::ptr::null()))?;
            dispatch!(d, raw_allreduce_t(k, export, tensor, buf, count, op, &c))
        })
    }
}

/// Start an allgather under `name` (`Engine::allgather_async`): `recvbuf`
/// gets every rank's `sendbuf` in rank order. `sendcount` may differ between
/// ranks; `recvcount` must be their sum (else `kolo_wait` fails on this rank).
///
/// # Safety
/// `comm` live; `name` NUL-terminated; `sendbuf` readable for `sendcount`
/// elements during this call; `recvbuf` writable for `recvcount` elements
/// and untouched until `kolo_wait` returns; `handle` writable.
///
/// ```c
/// kolo_allgather_async(comm, "ids", mine, n, all, total, KOLO_INT64, &h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_allgather_async(
    comm: *mut kolo_comm,
    name: *const c_char,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcount: usize,
    dtype: kolo_dtype,
    handle: *mut *mut kolo_handle,
) -> c_int {
    const NAME: &str = ALLGATHER_ASYNC;
    // SAFETY: the contract above.
    unsafe {
        start(NAME, comm, handle, |k| {
            let tensor = tensor_name(NAME, "name", name)?;
            let d = dtype_of(NAME, dtype)?;
            let (s, r) = ((sendbuf, sendcount), (recvbuf, recvcount));
            dispatch!(d, allgather_async_t(k, tensor, s, r))
        })
    }
}

/// Start a broadcast of `root`'s `buf` under `name` (`Engine::broadcast_async`).
///
/// # Safety
/// `comm` live; `name` NUL-terminated; `buf` valid for `count` elements and
/// untouched until `kolo_wait` returns; `handle` writable.
///
/// ```c
/// kolo_broadcast_async(comm, "init", params, n, KOLO_FLOAT32, 0, &h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_broadcast_async(
    comm: *mut kolo_comm,
    name: *const c_char,
    buf: *mut c_void,
    count: usize,
    dtype: kolo_dtype,
    root: c_int,
    handle: *mut *mut kolo_handle,
) -> c_int {
    const NAME: &str = BROADCAST_ASYNC;
    // SAFETY: the contract above.
    unsafe {
        start(NAME, comm, handle, |k| {
            let tensor = tensor_name(NAME, "name", name)?;
            let d = dtype_of(NAME, dtype)?;
            let root = usize::try_from(root)
                .map_err(|_| invalid(NAME, format_args!("root {root} is negative")))?;
            dispatch!(d, broadcast_async_t(k, tensor, buf, count, root))
        })
    }
}

/// Start a reduce-scatter under `name` (`Engine::reduce_scatter_async`):
/// `sendbuf` holds `size * recvcount` elements; `recvbuf` gets block `rank`.
///
/// # Safety
/// `comm` live; `name` NUL-terminated; `sendbuf` readable during this call;
/// `recvbuf` writable for `recvcount` elements and untouched until
/// `kolo_wait` returns; `handle` writable.
///
/// ```c
/// kolo_reduce_scatter_async(comm, "rs", grads, shard, n, KOLO_FLOAT32, KOLO_SUM, &h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_reduce_scatter_async(
    comm: *mut kolo_comm,
    name: *const c_char,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    dtype: kolo_dtype,
    op: kolo_op,
    handle: *mut *mut kolo_handle,
) -> c_int {
    const NAME: &str = REDUCE_SCATTER_ASYNC;
    // SAFETY: the contract above.
    unsafe {
        start(NAME, comm, handle, |k| {
            let tensor = tensor_name(NAME, "name", name)?;
            let (d, op) = (dtype_of(NAME, dtype)?, op_of(NAME, op)?);
            let bufs = (sendbuf, recvbuf);
            dispatch!(d, reduce_scatter_async_t(k, tensor, bufs, recvcount, op))
        })
    }
}

/// Start an alltoall under `name` (`Engine::alltoall_async`): both buffers
/// hold `size` blocks of `count_per_rank` elements.
///
/// # Safety
/// `comm` live; `name` NUL-terminated; `sendbuf` readable during this call;
/// `recvbuf` writable and untouched until `kolo_wait` returns; `handle` writable.
///
/// ```c
/// kolo_alltoall_async(comm, "a2a", out, in, n, KOLO_INT32, &h);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_alltoall_async(
    comm: *mut kolo_comm,
    name: *const c_char,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count_per_rank: usize,
    dtype: kolo_dtype,
    handle: *mut *mut kolo_handle,
) -> c_int {
    const NAME: &str = ALLTOALL_ASYNC;
    // SAFETY: the contract above.
    unsafe {
        start(NAME, comm, handle, |k| {
            let tensor = tensor_name(NAME, "name", name)?;
            let d = dtype_of(NAME, dtype)?;
            let bufs = (sendbuf, recvbuf);
            dispatch!(d, alltoall_async_t(k, tensor, bufs, count_per_rank))
        })
    }
}

/// Submit `n` in-place allreduces as one group under `group`
/// (`Engine::group`): they reach the engine together and run only when every
/// member is ready on every rank. `handles[i]` gets member i's handle (all
/// NULL on failure, when nothing was submitted). Member i is `counts[i]`
/// elements of `dtypes[i]` at `bufs[i]`, named `names[i]`.
///
/// # Safety
/// `comm` live; `group` and each `names[i]` NUL-terminated; the arrays
/// readable for `n` entries (`handles` writable); each `bufs[i]` valid for
/// reads and writes of its elements and untouched until its `kolo_wait`.
///
/// ```c
/// kolo_grouped_allreduce_async(comm, "step", 2, names, bufs, counts, dtypes, KOLO_SUM, hs);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_grouped_allreduce_async(
    comm: *mut kolo_comm,
    group: *const c_char,
    n: usize,
    names: *const *const c_char,
    bufs: *const *mut c_void,
    counts: *const usize,
    dtypes: *const kolo_dtype,
    op: kolo_op,
    handles: *mut *mut kolo_handle,
) -> c_int {
    const NAME: &str = GROUPED;
    guard(NAME, || {
        // SAFETY: the contract above (each array checked non-NULL by `array`).
        let (names, bufs, counts, dtypes, outs) = unsafe {
            (
                array(NAME, "names", names, n)?,
                array(NAME, "bufs", bufs, n)?,
                array(NAME, "counts", counts, n)?,
                array(NAME, "dtypes", dtypes, n)?,
                array_mut(NAME, "handles", handles, n)?,
            )
        };
        outs.fill(std::ptr::null_mut());
        // SAFETY: the contract above.
        let k = unsafe { comm_ref(NAME, comm) }?;
        // SAFETY: the contract above.
        let group = unsafe { tensor_name(NAME, "group", group) }?;
        let op = op_of(NAME, op)?;
        // Check every member before adding any: a half-built group would
        // leave its names reserved.
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: the contract above.
            let name = unsafe { tensor_name(NAME, "names[i]", names[i]) }?;
            let d = dtype_of(NAME, dtypes[i])?;
            dispatch!(d, check_member(bufs[i], counts[i]))?;
            members.push((name, d));
        }
        let pending = k.with_engine(|e| {
            let mut g = e.group(group);
            let mut pending = Vec::with_capacity(n);
            for (i, &(name, d)) in members.iter().enumerate() {
                let b = (bufs[i], counts[i]);
                // SAFETY: checked above; the contract keeps the buffers valid.
                pending.push(unsafe { dispatch!(d, add_member(&mut g, k.rank, name, b, op)) }?);
            }
            g.submit().map(|()| pending)
        })?;
        for (o, p) in outs.iter_mut().zip(pending) {
            *o = Box::into_raw(Box::new(kolo_handle { pending: p }));
        }
        Ok(())
    })
}

/// A C array of `n` entries as a slice; NULL is invalid unless `n` is 0.
///
/// # Safety
/// `p` NULL or readable for `n` entries for `'a`.
unsafe fn array<'a, T>(export: &str, what: &str, p: *const T, n: usize) -> kolo::Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(export, format_args!("{what} is NULL but n is {n}")));
    }
    // SAFETY: the contract above.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// As `array`, writable.
///
/// # Safety
/// `p` NULL or writable for `n` entries for `'a`, and not aliased.
unsafe fn array_mut<'a, T>(
    export: &str,
    what: &str,
    p: *mut T,
    n: usize,
) -> kolo::Result<&'a mut [T]> {
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(invalid(export, format_args!("{what} is NULL but n is {n}")));
    }
    // SAFETY: the contract above.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// This rank has no more data (`Engine::join`): it takes part in the other
/// ranks' allreduces with the identity until every rank has joined; averages
/// divide by the ranks that contributed. `*last_rank` gets the last rank to
/// join. Every rank must call it; no operation may be submitted meanwhile.
///
/// # Safety
/// `comm` live; `last_rank` NULL or writable.
///
/// ```c
/// int last; kolo_join(comm, &last);
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_join(comm: *mut kolo_comm, last_rank: *mut c_int) -> c_int {
    const NAME: &str = "kolo_join";
    guard(NAME, || {
        // SAFETY: the contract above.
        let (k, o) = unsafe { (comm_ref(NAME, comm)?, out(NAME, "last_rank", last_rank)?) };
        let last = k.with_engine(|e| e.join())?;
        *o = to_int(NAME, "last_rank", last)?;
        Ok(())
    })
}

/// Block until the operation of `handle` has finished, return its status,
/// and free the handle (`Handle::wait`; collectives on a copy then copy
/// their result to the output buffer).
///
/// # Safety
/// `handle` NULL or from a `kolo_*_async` call, not yet waited for, and no
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
        h.pending.wait()
    })
}

/// Wait at most `seconds` for the operation of `handle`. If it finished,
/// set `*done` to 1, free the handle and return its status, as `kolo_wait`
/// does; if not, set `*done` to 0 and return `KOLO_OK`: the handle stays
/// valid for another wait.
///
/// # Safety
/// As for `kolo_wait`; `done` writable.
///
/// ```c
/// int done = 0, st;
/// while ((st = kolo_wait_timeout(h, 0.5, &done)) == KOLO_OK && !done)
///     fprintf(stderr, "still waiting\n");
/// ```
#[no_mangle]
pub unsafe extern "C" fn kolo_wait_timeout(
    handle: *mut kolo_handle,
    seconds: f64,
    done: *mut c_int,
) -> c_int {
    const NAME: &str = "kolo_wait_timeout";
    guard(NAME, || {
        if !(seconds.is_finite() && (0.0..=kolo::config::MAX_WAIT_S).contains(&seconds)) {
            return Err(invalid(
                NAME,
                format_args!("seconds = {seconds} is not in 0..=604800"),
            ));
        }
        // SAFETY: the contract above.
        let d = unsafe { out(NAME, "done", done)? };
        // SAFETY: the contract above.
        let Some(h) = (unsafe { handle.as_mut() }) else {
            return Err(invalid(NAME, format_args!("handle is NULL")));
        };
        if !h
            .pending
            .ready_within(std::time::Duration::from_secs_f64(seconds))
        {
            *d = 0;
            return Ok(());
        }
        *d = 1;
        // SAFETY: the pointer came from Box::into_raw; the caller gives it up.
        let h = unsafe { Box::from_raw(handle) };
        h.pending.wait()
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
        *d = c_int::from(h.pending.poll());
        Ok(())
    })
}
