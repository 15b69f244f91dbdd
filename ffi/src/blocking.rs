//! The blocking collectives: typed bodies (one copy per dtype) and their exports. They run
//! on the communicator, or through the engine once it has started.

use super::*;

// ---------------------------------------------------------------------------
// Typed bodies of the collectives (one monomorphized copy per dtype).

pub(crate) const ALLREDUCE: &str = "kolo_allreduce";
pub(crate) const BROADCAST: &str = "kolo_broadcast";
pub(crate) const ALLGATHER: &str = "kolo_allgather";
pub(crate) const REDUCE_SCATTER: &str = "kolo_reduce_scatter";
pub(crate) const ALLTOALL: &str = "kolo_alltoall";

/// Through the engine, for the collectives whose engine form takes a `Vec`:
/// submit a copy of `send`, wait, and copy the result to `recv`.
///
/// # Safety
/// `send` readable and `recv` writable per `Buf::slice`/`Buf::slice_mut`
/// (they may overlap: the input is copied before the output is written).
pub(crate) unsafe fn via_vec<T: Element>(
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
pub(crate) unsafe fn allreduce_t<T: Element>(
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
pub(crate) unsafe fn broadcast_t<T: Element + Default>(
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
pub(crate) unsafe fn allgather_t<T: Element + Default>(
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
pub(crate) unsafe fn reduce_scatter_t<T: Element + Default>(
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
pub(crate) unsafe fn alltoall_t<T: Element + Default>(
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
