//! The C-side types (`kolo_dtype`, `kolo_op`) and the checks of what only a C caller can
//! get wrong: NULL or misaligned buffers, overflowing counts, unknown enum values.

use super::*;

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

/// `&mut T` from a C out-pointer; NULL is an invalid argument.
///
/// # Safety
/// `p` is NULL or valid for writes of one `T`.
pub(crate) unsafe fn out<'a, T>(name: &str, what: &str, p: *mut T) -> kolo::Result<&'a mut T> {
    // SAFETY: by the caller's contract a non-NULL `p` is writable.
    unsafe { p.as_mut() }.ok_or_else(|| invalid(name, format_args!("{what} is NULL")))
}

pub(crate) fn dtype_of(name: &str, d: kolo_dtype) -> kolo::Result<DType> {
    u8::try_from(d.0)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| invalid(name, format_args!("unknown kolo_dtype {}", d.0)))
}

pub(crate) fn op_of(name: &str, o: kolo_op) -> kolo::Result<ReduceOp> {
    u8::try_from(o.0)
        .ok()
        .and_then(ReduceOp::from_code)
        .ok_or_else(|| invalid(name, format_args!("unknown kolo_op {}", o.0)))
}

pub(crate) fn to_int(name: &str, what: &str, v: usize) -> kolo::Result<c_int> {
    c_int::try_from(v).map_err(|_| invalid(name, format_args!("{what} {v} does not fit an int")))
}

/// `a * b` elements, or an invalid-argument error naming both.
pub(crate) fn mul(name: &str, what: &str, a: usize, b: usize) -> kolo::Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(name, format_args!("{what} {a} * {b} overflows size_t")))
}

/// A C buffer of `count` elements of `T`, checked: non-NULL unless empty,
/// aligned for `T`, at most `isize::MAX` bytes, not wrapping the address space.
/// Returns the pointer to use (dangling when empty) and its length in bytes.
#[derive(Clone, Copy)]
pub(crate) struct Buf<T> {
    pub(crate) ptr: *mut T,
    pub(crate) count: usize,
}

impl<T: Element> Buf<T> {
    pub(crate) fn new(
        name: &str,
        what: &str,
        p: *const c_void,
        count: usize,
    ) -> kolo::Result<Buf<T>> {
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

    pub(crate) fn range(&self) -> std::ops::Range<usize> {
        let a = self.ptr as usize;
        a..a + self.count * std::mem::size_of::<T>()
    }

    pub(crate) fn overlaps<U: Element>(&self, other: &Buf<U>) -> bool {
        let (a, b) = (self.range(), other.range());
        a.start < b.end && b.start < a.end
    }

    /// # Safety
    /// The C caller's buffer is valid for reads of `count` elements for `'a`,
    /// and nothing writes it meanwhile.
    pub(crate) unsafe fn slice<'a>(self) -> &'a [T] {
        // SAFETY: checked in `new` (non-NULL or dangling, aligned, size); validity per contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.count) }
    }

    /// # Safety
    /// As `slice`, for writes, and no other reference to it exists for `'a`.
    pub(crate) unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
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
pub(crate) unsafe fn in_out<'a, T: Element>(
    send: Buf<T>,
    recv: Buf<T>,
) -> (Cow<'a, [T]>, &'a mut [T]) {
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
