//! Reduction kernels: `acc = acc (op) incoming` over slices, per dtype.
//!
//! Dispatch on `(dtype, op, incoming_first)` happens once per call; each
//! combination runs its own monomorphized loop (a `zip` over the two slices
//! with the operator inlined as a closure), which LLVM auto-vectorizes.
//! `f16`/`bf16` are widened to `f32` in stack blocks, reduced there, and
//! rounded back, so 16-bit reductions round once per step (as NCCL does).

use crate::element::{as_bytes, as_bytes_mut, DType, Element};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Reduction operator. `Avg` reduces as `Sum`; the caller divides by the rank count.
///
/// ```
/// use kolo::ReduceOp;
/// assert_eq!(ReduceOp::parse("max"), Some(ReduceOp::Max));
/// assert_eq!(ReduceOp::Avg.to_string(), "avg");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Elementwise sum (wrapping for integers).
    Sum,
    /// Elementwise product (wrapping for integers).
    Prod,
    /// Elementwise minimum.
    Min,
    /// Elementwise maximum.
    Max,
    /// Sum, then divide by the number of ranks (see [`divide`]).
    Avg,
}

impl ReduceOp {
    /// Every operator, in wire-code order.
    ///
    /// ```
    /// use kolo::ReduceOp;
    /// assert_eq!(ReduceOp::ALL.len(), 5);
    /// assert_eq!(ReduceOp::ALL[0], ReduceOp::Sum);
    /// ```
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ];

    /// Code used on the wire (1..=5). Stable: peers of different builds must agree,
    /// so never renumber; 0 is left unused so a zeroed header is detectably invalid.
    ///
    /// ```
    /// use kolo::ReduceOp;
    /// assert_eq!(ReduceOp::Sum.code(), 1);
    /// assert_eq!(ReduceOp::Avg.code(), 5);
    /// ```
    pub fn code(self) -> u8 {
        match self {
            ReduceOp::Sum => 1,
            ReduceOp::Prod => 2,
            ReduceOp::Min => 3,
            ReduceOp::Max => 4,
            ReduceOp::Avg => 5,
        }
    }

    /// Inverse of [`ReduceOp::code`]; `None` for unknown codes.
    ///
    /// ```
    /// use kolo::ReduceOp;
    /// assert_eq!(ReduceOp::from_code(3), Some(ReduceOp::Min));
    /// assert_eq!(ReduceOp::from_code(0), None);
    /// ```
    pub fn from_code(c: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|op| op.code() == c)
    }

    /// Name as nccl-tests spells it (`sum`, `prod`, `min`, `max`, `avg`).
    ///
    /// ```
    /// use kolo::ReduceOp;
    /// assert_eq!(ReduceOp::Prod.name(), "prod");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// Inverse of [`ReduceOp::name`]; `None` for anything else.
    ///
    /// ```
    /// use kolo::ReduceOp;
    /// assert_eq!(ReduceOp::parse("avg"), Some(ReduceOp::Avg));
    /// assert_eq!(ReduceOp::parse("mean"), None);
    /// ```
    pub fn parse(s: &str) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|op| op.name() == s)
    }
}

/// Prints [`ReduceOp::name`].
///
/// ```
/// assert_eq!(format!("{}", kolo::ReduceOp::Min), "min");
/// ```
impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `acc[i] = acc[i] (op) inc[i]` when `incoming_first == false`,
/// `acc[i] = inc[i] (op) acc[i]` when `incoming_first == true` (operand order matters for
/// bitwise reproducibility of e.g. NaN payloads / signed zeros in min/max; callers
/// use it to make both partners of an exchange compute `op(lower_rank, higher_rank)`).
/// `Avg` reduces as `Sum` (the caller divides at the end).
///
/// Integers use wrapping add/mul; floats plain IEEE ops with `f32::min`/`max` semantics
/// (a NaN operand loses to a number); `f16`/`bf16` are computed in `f32` and rounded
/// back to nearest-even.
///
/// # Panics
/// If `acc.len() != inc.len()`.
///
/// ```
/// use kolo::reduce::reduce;
/// use kolo::ReduceOp;
/// let mut acc = [1.0f32, 5.0, -2.0];
/// reduce(ReduceOp::Max, &mut acc, &[3.0, 4.0, -1.0], false);
/// assert_eq!(acc, [3.0, 5.0, -1.0]);
/// ```
pub fn reduce<T: Element>(op: ReduceOp, acc: &mut [T], inc: &[T], incoming_first: bool) {
    assert_eq!(acc.len(), inc.len(), "reduce: slice lengths differ");
    // One implementation: the typed entry goes through the byte entry, whose
    // alignment/length checks trivially hold for typed slices.
    reduce_bytes(
        T::DTYPE,
        op,
        as_bytes_mut(acc),
        as_bytes(inc),
        incoming_first,
    );
}

/// Same as [`reduce`] on the raw bytes of `dtype` elements (native endianness).
///
/// # Panics
/// If the lengths differ, are not a multiple of `dtype.size()`, or either slice is not
/// aligned for the dtype (callers guarantee this; it is an internal bug otherwise).
///
/// ```
/// use kolo::element::{as_bytes, as_bytes_mut};
/// use kolo::reduce::reduce_bytes;
/// use kolo::{DType, ReduceOp};
/// let mut acc = [250u8, 3];
/// reduce_bytes(DType::U8, ReduceOp::Sum, &mut acc, &[10, 4], false);
/// assert_eq!(acc, [4, 7]); // wrapping
/// let mut a = [2i32, 3];
/// reduce_bytes(DType::I32, ReduceOp::Prod, as_bytes_mut(&mut a), as_bytes(&[5i32, -1]), true);
/// assert_eq!(a, [10, -3]);
/// ```
pub fn reduce_bytes(dtype: DType, op: ReduceOp, acc: &mut [u8], inc: &[u8], incoming_first: bool) {
    assert_eq!(acc.len(), inc.len(), "reduce_bytes: slice lengths differ");
    #[cfg(target_arch = "x86_64")]
    if x86::wide() {
        // SAFETY: the CPU supports the features this copy was compiled for.
        return unsafe { x86::reduce_bytes(dtype, op, acc, inc, incoming_first) };
    }
    reduce_portable(dtype, op, acc, inc, incoming_first)
}

/// The kernels compiled for the build's baseline target features.
#[inline(always)]
fn reduce_portable(dtype: DType, op: ReduceOp, acc: &mut [u8], inc: &[u8], first: bool) {
    match dtype {
        DType::U8 => u8::reduce_impl(op, cast_mut(acc), cast(inc), first),
        DType::I32 => i32::reduce_impl(op, cast_mut(acc), cast(inc), first),
        DType::I64 => i64::reduce_impl(op, cast_mut(acc), cast(inc), first),
        DType::F16 => f16::reduce_impl(op, cast_mut(acc), cast(inc), first),
        DType::BF16 => bf16::reduce_impl(op, cast_mut(acc), cast(inc), first),
        DType::F32 => f32::reduce_impl(op, cast_mut(acc), cast(inc), first),
        DType::F64 => f64::reduce_impl(op, cast_mut(acc), cast(inc), first),
    }
}

/// Finish an `Avg`: `buf[i] = buf[i] / n` (integers: truncating division;
/// `f16`/`bf16`: in `f32`, then rounded to nearest-even).
///
/// # Panics
/// If `n == 0`.
///
/// ```
/// use kolo::reduce::divide;
/// let mut v = [7i32, -7, 9];
/// divide(&mut v, 2);
/// assert_eq!(v, [3, -3, 4]);
/// let mut f = [1.0f64, 3.0];
/// divide(&mut f, 4);
/// assert_eq!(f, [0.25, 0.75]);
/// ```
pub fn divide<T: Element>(buf: &mut [T], n: usize) {
    divide_bytes(T::DTYPE, as_bytes_mut(buf), n);
}

/// Same as [`divide`] on the raw bytes of `dtype` elements.
///
/// # Panics
/// If `n == 0`, or `buf` is not a whole number of aligned `dtype` elements.
///
/// ```
/// use kolo::element::as_bytes_mut;
/// use kolo::reduce::divide_bytes;
/// use kolo::DType;
/// let mut v = [3.0f32, 6.0];
/// divide_bytes(DType::F32, as_bytes_mut(&mut v), 3);
/// assert_eq!(v, [1.0, 2.0]);
/// ```
pub fn divide_bytes(dtype: DType, buf: &mut [u8], n: usize) {
    assert!(n > 0, "divide: n must be positive");
    #[cfg(target_arch = "x86_64")]
    if x86::wide() {
        // SAFETY: the CPU supports the features this copy was compiled for.
        return unsafe { x86::divide_bytes(dtype, buf, n) };
    }
    divide_portable(dtype, buf, n)
}

/// Fill `buf` with the identity of `op` (what a rank with nothing to add
/// contributes): 0 for sums, 1 for products, the largest value for minimum
/// (+inf for floats) and the smallest for maximum.
///
/// ```
/// use kolo::{element::as_bytes_mut, reduce::fill_identity, DType, ReduceOp};
/// let mut v = [0i32; 2];
/// fill_identity(DType::I32, ReduceOp::Min, as_bytes_mut(&mut v));
/// assert_eq!(v, [i32::MAX; 2]);
/// ```
pub fn fill_identity(dtype: DType, op: ReduceOp, buf: &mut [u8]) {
    fn fill<T: Element>(b: &mut [u8], v: T) {
        cast_mut::<T>(b).fill(v);
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => buf.fill(0),
        ReduceOp::Prod => match dtype {
            DType::U8 => fill(buf, 1u8),
            DType::I32 => fill(buf, 1i32),
            DType::I64 => fill(buf, 1i64),
            DType::F16 => fill(buf, f16::ONE),
            DType::BF16 => fill(buf, bf16::ONE),
            DType::F32 => fill(buf, 1f32),
            DType::F64 => fill(buf, 1f64),
        },
        ReduceOp::Min => match dtype {
            DType::U8 => fill(buf, u8::MAX),
            DType::I32 => fill(buf, i32::MAX),
            DType::I64 => fill(buf, i64::MAX),
            DType::F16 => fill(buf, f16::INFINITY),
            DType::BF16 => fill(buf, bf16::INFINITY),
            DType::F32 => fill(buf, f32::INFINITY),
            DType::F64 => fill(buf, f64::INFINITY),
        },
        ReduceOp::Max => match dtype {
            DType::U8 => fill(buf, 0u8),
            DType::I32 => fill(buf, i32::MIN),
            DType::I64 => fill(buf, i64::MIN),
            DType::F16 => fill(buf, f16::NEG_INFINITY),
            DType::BF16 => fill(buf, bf16::NEG_INFINITY),
            DType::F32 => fill(buf, f32::NEG_INFINITY),
            DType::F64 => fill(buf, f64::NEG_INFINITY),
        },
    }
}

#[inline(always)]
fn divide_portable(dtype: DType, buf: &mut [u8], n: usize) {
    match dtype {
        DType::U8 => u8::divide_impl(cast_mut(buf), n),
        DType::I32 => i32::divide_impl(cast_mut(buf), n),
        DType::I64 => i64::divide_impl(cast_mut(buf), n),
        DType::F16 => f16::divide_impl(cast_mut(buf), n),
        DType::BF16 => bf16::divide_impl(cast_mut(buf), n),
        DType::F32 => f32::divide_impl(cast_mut(buf), n),
        DType::F64 => f64::divide_impl(cast_mut(buf), n),
    }
}

/// A second copy of every kernel compiled for AVX2 + F16C, picked at runtime.
/// Release builds target baseline x86-64 (SSE2), where the 16-bit kernels are
/// compute-bound: AVX2 doubles the vector width. `f16` reductions bypass the
/// block path here and convert with the F16C intrinsics directly, 8 lanes at a
/// time (half's slice conversions call an out-of-line helper per 8 elements).
/// IEEE add/mul/min/max/div give the same results at any vector width (Rust
/// never contracts into FMA), so both copies agree bitwise; the tests check the
/// portable copy as well.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use core::arch::x86_64::{
        __m128i, __m256, _mm256_add_ps, _mm256_blendv_ps, _mm256_castps_si256, _mm256_cmp_ps,
        _mm256_cmpeq_epi32, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_max_ps,
        _mm256_min_ps, _mm256_movemask_epi8, _mm256_mul_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _CMP_UNORD_Q, _MM_FROUND_TO_NEAREST_INT,
    };

    #[inline]
    pub(super) fn wide() -> bool {
        // Cached by std after the first call: one relaxed load per reduction.
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn reduce_bytes(
        dtype: DType,
        op: ReduceOp,
        acc: &mut [u8],
        inc: &[u8],
        first: bool,
    ) {
        if dtype == DType::F16 {
            // SAFETY: this function's own target features are the callee's.
            return unsafe { f16_reduce(op, cast_mut(acc), cast(inc), first) };
        }
        reduce_portable(dtype, op, acc, inc, first)
    }

    /// `f32::min` semantics on 8 lanes: a NaN operand loses to a number.
    /// `minps(b, a)` yields `a` when either lane is NaN; then a NaN `a` is
    /// replaced by `b`. Equal to `f32::min` except possibly for which of +0/-0
    /// (or which NaN payload) wins, which Rust leaves unspecified anyway.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn vmin(a: __m256, b: __m256) -> __m256 {
        let m = _mm256_min_ps(b, a);
        _mm256_blendv_ps(m, b, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
    }

    /// `f32::max` semantics on 8 lanes (see [`vmin`]).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn vmax(a: __m256, b: __m256) -> __m256 {
        let m = _mm256_max_ps(b, a);
        _mm256_blendv_ps(m, b, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
    }

    /// `acc[i] = f16::from_f32(op(x, y))` with `(x, y)` the widened `(acc[i], inc[i])`,
    /// swapped when `$first`: 8 lanes at a time through F16C (round to nearest-even,
    /// NaNs quieted, exactly as half's scalar conversions), the tail through half.
    macro_rules! f16_zip {
        ($acc:expr, $inc:expr, $first:expr, $vop:expr, $sop:expr) => {{
            let (acc, inc): (&mut [f16], &[f16]) = ($acc, $inc);
            let n = acc.len().min(inc.len());
            let (pa, pb) = (acc.as_mut_ptr().cast::<u16>(), inc.as_ptr().cast::<u16>());
            let mut i = 0;
            // 32 elements per trip (4 independent 8-lane chains), then 8 at a time.
            while i + 8 <= n {
                let m = if i + 32 <= n { 4 } else { 1 };
                for j in (i..i + 8 * m).step_by(8) {
                    // SAFETY: j + 8 <= i + 8 * m <= n, so all 8 lanes are in bounds
                    // of both slices; unaligned 128-bit loads/stores.
                    unsafe {
                        let x = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(j).cast::<__m128i>()));
                        let y = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(j).cast::<__m128i>()));
                        let r = if $first { $vop(y, x) } else { $vop(x, y) };
                        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r);
                        _mm_storeu_si128(pa.add(j).cast::<__m128i>(), h);
                    }
                }
                i += 8 * m;
            }
            for (a, b) in acc[i..n].iter_mut().zip(&inc[i..n]) {
                let (x, y) = (a.to_f32(), b.to_f32());
                let r = if $first { $sop(y, x) } else { $sop(x, y) };
                *a = f16::from_f32(r);
            }
        }};
    }

    /// F16C kernel for `f16`, bit-identical to the block path (`half_reduce`).
    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f16_reduce(op: ReduceOp, acc: &mut [f16], inc: &[f16], first: bool) {
        assert_eq!(acc.len(), inc.len(), "reduce: slice lengths differ");
        match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                f16_zip!(
                    acc,
                    inc,
                    first,
                    |a, b| _mm256_add_ps(a, b),
                    |a: f32, b: f32| a + b
                )
            }
            ReduceOp::Prod => {
                f16_zip!(
                    acc,
                    inc,
                    first,
                    |a, b| _mm256_mul_ps(a, b),
                    |a: f32, b: f32| a * b
                )
            }
            ReduceOp::Min => f16_zip!(acc, inc, first, |a, b| vmin(a, b), f32::min),
            ReduceOp::Max => f16_zip!(acc, inc, first, |a, b| vmax(a, b), f32::max),
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow_rounding(wire: DType, dst: &mut [u8], src: &mut [f32]) {
        if wire != DType::F16 {
            return narrow_rounding_portable(wire, dst, src);
        }
        let dst: &mut [f16] = cast_mut(dst);
        let n = src.len().min(dst.len());
        let (ps, pd) = (src.as_mut_ptr(), dst.as_mut_ptr().cast::<u16>());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, so all 8 lanes are in bounds of both slices.
            unsafe {
                let x = _mm256_loadu_ps(ps.add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm_storeu_si128(pd.add(i).cast::<__m128i>(), h);
                let back = _mm256_cvtph_ps(h);
                let same = _mm256_cmpeq_epi32(_mm256_castps_si256(x), _mm256_castps_si256(back));
                if _mm256_movemask_epi8(same) != -1 {
                    _mm256_storeu_ps(ps.add(i), back);
                }
            }
            i += 8;
        }
        for (d, s) in dst[i..n].iter_mut().zip(&mut src[i..n]) {
            *d = f16::from_f32(*s);
            *s = d.to_f32();
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f16_round(buf: &mut [f32]) {
        let n = buf.len();
        let p = buf.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, so all 8 lanes are in bounds.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p.add(i)));
                _mm256_storeu_ps(p.add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for x in &mut buf[i..] {
            *x = f16::from_f32(*x).to_f32();
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen(wire: DType, dst: &mut [f32], src: &[u8]) {
        if wire != DType::F16 {
            return widen_portable(wire, dst, src);
        }
        let src: &[f16] = cast(src);
        let n = src.len().min(dst.len());
        let (ps, pd) = (src.as_ptr().cast::<u16>(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, so all 8 lanes are in bounds of both slices.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(ps.add(i).cast::<__m128i>()));
                _mm256_storeu_ps(pd.add(i), x);
            }
            i += 8;
        }
        for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = s.to_f32();
        }
    }

    /// `acc[i] = round16(op(acc[i], widen(inc[i])))` (swapped when `$first`), 8 lanes
    /// at a time through F16C, the tail through half's scalar conversions.
    macro_rules! widened_zip {
        ($acc:expr, $inc:expr, $first:expr, $vop:expr, $sop:expr) => {{
            let (acc, inc): (&mut [f32], &[f16]) = ($acc, $inc);
            let n = acc.len().min(inc.len());
            let (pa, pb) = (acc.as_mut_ptr(), inc.as_ptr().cast::<u16>());
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: i + 8 <= n, so all 8 lanes are in bounds of both slices.
                unsafe {
                    let x = _mm256_loadu_ps(pa.add(i));
                    let y = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i).cast::<__m128i>()));
                    let r = if $first { $vop(y, x) } else { $vop(x, y) };
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r);
                    _mm256_storeu_ps(pa.add(i), _mm256_cvtph_ps(h));
                }
                i += 8;
            }
            for (a, b) in acc[i..n].iter_mut().zip(&inc[i..n]) {
                let (x, y) = (*a, b.to_f32());
                let r = if $first { $sop(y, x) } else { $sop(x, y) };
                *a = f16::from_f32(r).to_f32();
            }
        }};
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn reduce_widened(
        wire: DType,
        op: ReduceOp,
        acc: &mut [f32],
        inc: &[u8],
        first: bool,
    ) {
        if wire != DType::F16 {
            return reduce_widened_portable(wire, op, acc, inc, first);
        }
        let inc: &[f16] = cast(inc);
        match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                widened_zip!(
                    acc,
                    inc,
                    first,
                    |a, b| _mm256_add_ps(a, b),
                    |a: f32, b: f32| a + b
                )
            }
            ReduceOp::Prod => {
                widened_zip!(
                    acc,
                    inc,
                    first,
                    |a, b| _mm256_mul_ps(a, b),
                    |a: f32, b: f32| a * b
                )
            }
            ReduceOp::Min => widened_zip!(acc, inc, first, |a, b| vmin(a, b), f32::min),
            ReduceOp::Max => widened_zip!(acc, inc, first, |a, b| vmax(a, b), f32::max),
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C (see [`wide`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn divide_bytes(dtype: DType, buf: &mut [u8], n: usize) {
        divide_portable(dtype, buf, n)
    }
}

// ---------------------------------------------------------------------------
// Byte views -> typed slices (the only unsafe in this module).

#[inline(always)]
fn check_layout<T: Element>(b: &[u8]) -> usize {
    let size = std::mem::size_of::<T>();
    assert!(
        b.len() % size == 0,
        "reduce: byte length {} is not a multiple of {} ({:?})",
        b.len(),
        size,
        T::DTYPE
    );
    assert!(
        b.as_ptr().cast::<T>().is_aligned(),
        "reduce: buffer is not aligned for {:?}",
        T::DTYPE
    );
    b.len() / size
}

#[inline(always)]
fn cast<T: Element>(b: &[u8]) -> &[T] {
    let n = check_layout::<T>(b);
    // SAFETY: length and alignment checked above; Element types are POD with no
    // invalid bit patterns, and the borrow keeps the bytes alive and shared.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), n) }
}

#[inline(always)]
fn cast_mut<T: Element>(b: &mut [u8]) -> &mut [T] {
    let n = check_layout::<T>(b);
    // SAFETY: as in `cast`, and the exclusive borrow is moved into the result.
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast(), n) }
}

// ---------------------------------------------------------------------------
// Generic loops. `#[inline(always)]` so each (type, op, order) closure gets its
// own fully inlined, vectorizable loop instead of an indirect call per element.

#[inline(always)]
fn zip_with<T: Copy>(acc: &mut [T], inc: &[T], f: impl Fn(T, T) -> T) {
    // zip over both slices: no bounds checks, trip count known to LLVM.
    for (a, &b) in acc.iter_mut().zip(inc) {
        *a = f(*a, b);
    }
}

/// Applies `f` in the requested operand order; the order branch is taken once per call.
#[inline(always)]
fn ordered<T: Copy>(acc: &mut [T], inc: &[T], incoming_first: bool, f: impl Fn(T, T) -> T) {
    if incoming_first {
        zip_with(acc, inc, |a, b| f(b, a));
    } else {
        zip_with(acc, inc, f);
    }
}

/// Per-type kernels, private so `Element` stays the only public bound.
trait Kernel: Element {
    fn reduce_impl(op: ReduceOp, acc: &mut [Self], inc: &[Self], incoming_first: bool);
    fn divide_impl(buf: &mut [Self], n: usize);
}

macro_rules! int_kernel {
    ($($t:ty),*) => {$(
        impl Kernel for $t {
            #[inline(always)]
            fn reduce_impl(op: ReduceOp, acc: &mut [$t], inc: &[$t], first: bool) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => ordered(acc, inc, first, <$t>::wrapping_add),
                    ReduceOp::Prod => ordered(acc, inc, first, <$t>::wrapping_mul),
                    ReduceOp::Min => ordered(acc, inc, first, <$t>::min),
                    ReduceOp::Max => ordered(acc, inc, first, <$t>::max),
                }
            }

            #[inline(always)]
            fn divide_impl(buf: &mut [$t], n: usize) {
                match <$t>::try_from(n) {
                    Ok(d) => buf.iter_mut().for_each(|x| *x /= d),
                    // n exceeds the type's range, so |x| < n for every x except
                    // possibly MIN == -n; widen to i128 so that case is exact too.
                    Err(_) => buf
                        .iter_mut()
                        .for_each(|x| *x = (*x as i128 / n as i128) as $t),
                }
            }
        }
    )*};
}
int_kernel!(u8, i32, i64);

macro_rules! float_kernel {
    ($($t:ty),*) => {$(
        impl Kernel for $t {
            #[inline(always)]
            fn reduce_impl(op: ReduceOp, acc: &mut [$t], inc: &[$t], first: bool) {
                float_reduce(op, acc, inc, first);
            }

            #[inline(always)]
            fn divide_impl(buf: &mut [$t], n: usize) {
                // True division (not multiply-by-reciprocal) so the result is the
                // correctly rounded quotient, independent of how we vectorize.
                let d = n as $t;
                buf.iter_mut().for_each(|x| *x /= d);
            }
        }
    )*};
}
float_kernel!(f32, f64);

/// Shared by f32/f64 and by the f32 blocks of f16/bf16.
#[inline(always)]
fn float_reduce<T>(op: ReduceOp, acc: &mut [T], inc: &[T], first: bool)
where
    T: Copy + std::ops::Add<Output = T> + std::ops::Mul<Output = T> + FloatMinMax,
{
    match op {
        ReduceOp::Sum | ReduceOp::Avg => ordered(acc, inc, first, |a, b| a + b),
        ReduceOp::Prod => ordered(acc, inc, first, |a, b| a * b),
        ReduceOp::Min => ordered(acc, inc, first, T::fmin),
        ReduceOp::Max => ordered(acc, inc, first, T::fmax),
    }
}

trait FloatMinMax {
    fn fmin(self, other: Self) -> Self;
    fn fmax(self, other: Self) -> Self;
}

macro_rules! float_minmax {
    ($($t:ty),*) => {$(
        impl FloatMinMax for $t {
            #[inline(always)]
            fn fmin(self, other: $t) -> $t { self.min(other) }
            #[inline(always)]
            fn fmax(self, other: $t) -> $t { self.max(other) }
        }
    )*};
}
float_minmax!(f32, f64);

// ---------------------------------------------------------------------------
// 16-bit floats: widen a block to f32 on the stack, reduce, round back.

/// Elements per f32 block: 2 x 1 KiB of stack, large enough to amortize the
/// per-block conversion dispatch, small enough to stay in L1.
const BLOCK: usize = 256;

/// 16-bit float formats that convert to/from f32 slices exactly as their scalar
/// `to_f32`/`from_f32` do (so block and scalar results agree bitwise).
trait Half: Element {
    const ZERO: Self;
    fn widen(src: &[Self], dst: &mut [f32]);
    fn narrow(dst: &mut [Self], src: &[f32]);
}

impl Half for f16 {
    const ZERO: f16 = f16::ZERO;
    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        // half picks F16C at runtime where available.
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn narrow(dst: &mut [f16], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Half for bf16 {
    const ZERO: bf16 = bf16::ZERO;
    // half's bf16 slice conversions are per-element loops with branches and bounds
    // checks; these branch-free versions vectorize and are bit-identical to
    // `bf16::to_f32` / `bf16::from_f32` (checked exhaustively / by sweep in tests).
    #[inline(always)]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let h = s.to_bits() as u32;
            // half quiets NaNs (sets the top mantissa bit) when widening.
            let quiet = if h & 0x7FFF > 0x7F80 { 0x40 } else { 0 };
            *d = f32::from_bits((h | quiet) << 16);
        }
    }
    #[inline(always)]
    fn narrow(dst: &mut [bf16], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let x = s.to_bits();
            let hi = x >> 16;
            // Round to nearest, ties to even: round bit set and (sticky bits or lsb).
            let up = (x & 0x8000 != 0 && x & 0x1_7FFF != 0) as u32;
            let bits = if x & 0x7FFF_FFFF > 0x7F80_0000 {
                hi | 0x40 // NaN: keep payload, set quiet bit
            } else {
                hi + up
            };
            *d = bf16::from_bits(bits as u16);
        }
    }
}

#[inline(always)]
fn half_reduce<H: Half>(op: ReduceOp, acc: &mut [H], inc: &[H], first: bool) {
    let mut fa = [0f32; BLOCK];
    let mut fb = [0f32; BLOCK];
    for (ca, cb) in acc.chunks_mut(BLOCK).zip(inc.chunks(BLOCK)) {
        let (xa, xb) = (&mut fa[..ca.len()], &mut fb[..cb.len()]);
        H::widen(ca, xa);
        H::widen(cb, xb);
        // The op dispatch per block is negligible next to 256 elements of work.
        float_reduce(op, xa, xb, first);
        H::narrow(ca, xa);
    }
}

#[inline(always)]
fn half_divide<H: Half>(buf: &mut [H], n: usize) {
    let d = n as f32;
    let mut fa = [0f32; BLOCK];
    for c in buf.chunks_mut(BLOCK) {
        let x = &mut fa[..c.len()];
        H::widen(c, x);
        x.iter_mut().for_each(|v| *v /= d);
        H::narrow(c, x);
    }
}

macro_rules! half_kernel {
    ($($t:ty),*) => {$(
        impl Kernel for $t {
            #[inline(always)]
            fn reduce_impl(op: ReduceOp, acc: &mut [$t], inc: &[$t], first: bool) {
                half_reduce(op, acc, inc, first);
            }
            #[inline(always)]
            fn divide_impl(buf: &mut [$t], n: usize) {
                half_divide(buf, n);
            }
        }
    )*};
}
half_kernel!(f16, bf16);

// ---------------------------------------------------------------------------
// Mixed precision: f32 buffers whose values travel as f16/bf16 ("narrowing").
// The executor encodes what it sends, decodes what it receives, and rounds
// every reduction result to the wire format, so a rank always holds exactly
// the bits it would send (see `crate::exec`).

/// Whether f32 buffers can travel as `wire`: the 16-bit float formats.
///
/// ```
/// use kolo::DType;
/// assert!(kolo::reduce::is_wire16(DType::F16) && kolo::reduce::is_wire16(DType::BF16));
/// assert!(!kolo::reduce::is_wire16(DType::F32));
/// ```
pub fn is_wire16(wire: DType) -> bool {
    matches!(wire, DType::F16 | DType::BF16)
}

fn check_mixed(wire: DType, f32s: usize, wire_bytes: usize) {
    assert!(is_wire16(wire), "{wire:?} is not a 16-bit wire format");
    assert_eq!(
        f32s * 2,
        wire_bytes,
        "mixed precision: slice lengths differ"
    );
}

/// Encode `src` as `wire` (f16 or bf16, round to nearest-even) into `dst`, the
/// raw bytes of `src.len()` 16-bit values.
///
/// # Panics
/// If `wire` is not 16-bit, the lengths differ, or `dst` is not 2-aligned.
///
/// ```
/// use kolo::{element::as_bytes_mut, reduce::narrow, DType};
/// let mut h = [half::f16::ZERO; 2];
/// narrow(DType::F16, as_bytes_mut(&mut h), &[1.0, 1.0 + 1e-4]);
/// assert_eq!(h[1].to_f32(), 1.0); // below f16 resolution
/// ```
pub fn narrow(wire: DType, dst: &mut [u8], src: &[f32]) {
    check_mixed(wire, src.len(), dst.len());
    match wire {
        DType::F16 => f16::narrow(cast_mut(dst), src),
        _ => bf16::narrow(cast_mut(dst), src),
    }
}

/// [`narrow`], and round `src` in place to the values sent, so the sender keeps
/// exactly the bits its peer receives. Only blocks that change are written back.
///
/// # Panics
/// As [`narrow`].
///
/// ```
/// use kolo::{element::as_bytes_mut, reduce::narrow_rounding, DType};
/// let mut h = [half::bf16::ZERO; 1];
/// let mut v = [1.0f32 + 1e-3];
/// narrow_rounding(DType::BF16, as_bytes_mut(&mut h), &mut v);
/// assert_eq!(v[0], 1.0);
/// ```
pub fn narrow_rounding(wire: DType, dst: &mut [u8], src: &mut [f32]) {
    check_mixed(wire, src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if x86::wide() {
        // SAFETY: the CPU supports the features this copy was compiled for.
        return unsafe { x86::narrow_rounding(wire, dst, src) };
    }
    narrow_rounding_portable(wire, dst, src)
}

/// Decode `src`, the raw bytes of `dst.len()` values of `wire`, into `dst`.
///
/// # Panics
/// As [`narrow`].
///
/// ```
/// use kolo::{element::as_bytes, reduce::widen, DType};
/// let h = [half::f16::from_f32(0.5), half::f16::MAX];
/// let mut v = [0f32; 2];
/// widen(DType::F16, &mut v, as_bytes(&h));
/// assert_eq!(v, [0.5, 65504.0]);
/// ```
pub fn widen(wire: DType, dst: &mut [f32], src: &[u8]) {
    check_mixed(wire, dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if x86::wide() {
        // SAFETY: the CPU supports the features this copy was compiled for.
        return unsafe { x86::widen(wire, dst, src) };
    }
    widen_portable(wire, dst, src)
}

/// One hop of a mixed-precision reduction: decode the incoming `wire` values,
/// combine them with the local f32 values in f32 (`acc (op) inc`, or
/// `inc (op) acc` when `incoming_first`), and round the result to `wire`
/// precision in place: `acc = round(acc (op) widen(inc))`. The local operand is
/// used at full precision, so only the partial result is ever rounded.
///
/// # Panics
/// As [`narrow`].
///
/// ```
/// use kolo::{element::as_bytes, reduce::reduce_widened, DType, ReduceOp};
/// let inc = [half::f16::from_f32(1.0)];
/// // 2^-11 + 2^-20 rounded to f16 first would tie and round down to 1.0.
/// let mut acc = [2f32.powi(-11) + 2f32.powi(-20)];
/// reduce_widened(DType::F16, ReduceOp::Sum, &mut acc, as_bytes(&inc), false);
/// assert_eq!(acc[0], 1.0 + 2f32.powi(-10));
/// ```
pub fn reduce_widened(wire: DType, op: ReduceOp, acc: &mut [f32], inc: &[u8], first: bool) {
    check_mixed(wire, acc.len(), inc.len());
    #[cfg(target_arch = "x86_64")]
    if x86::wide() {
        // SAFETY: the CPU supports the features this copy was compiled for.
        return unsafe { x86::reduce_widened(wire, op, acc, inc, first) };
    }
    reduce_widened_portable(wire, op, acc, inc, first)
}

/// Round every value to the nearest `wire` value, in place (`widen(narrow(x))`).
///
/// # Panics
/// If `wire` is not 16-bit.
///
/// ```
/// let mut v = [70000.0f32, 0.1];
/// kolo::reduce::round_to(kolo::DType::F16, &mut v);
/// assert_eq!(v[0], f32::INFINITY);
/// assert_eq!(v[1], half::f16::from_f32(0.1).to_f32());
/// ```
pub fn round_to(wire: DType, buf: &mut [f32]) {
    check_mixed(wire, buf.len(), 2 * buf.len());
    #[cfg(target_arch = "x86_64")]
    if wire == DType::F16 && x86::wide() {
        // SAFETY: the CPU supports the features this copy was compiled for.
        return unsafe { x86::f16_round(buf) };
    }
    match wire {
        DType::F16 => round_impl::<f16>(buf),
        _ => round_impl::<bf16>(buf),
    }
}

#[inline(always)]
fn narrow_rounding_portable(wire: DType, dst: &mut [u8], src: &mut [f32]) {
    match wire {
        DType::F16 => narrow_rounding_impl::<f16>(cast_mut(dst), src),
        _ => narrow_rounding_impl::<bf16>(cast_mut(dst), src),
    }
}

#[inline(always)]
fn widen_portable(wire: DType, dst: &mut [f32], src: &[u8]) {
    match wire {
        DType::F16 => f16::widen(cast(src), dst),
        _ => bf16::widen(cast(src), dst),
    }
}

#[inline(always)]
fn reduce_widened_portable(wire: DType, op: ReduceOp, acc: &mut [f32], inc: &[u8], first: bool) {
    match wire {
        DType::F16 => reduce_widened_impl::<f16>(op, acc, cast(inc), first),
        _ => reduce_widened_impl::<bf16>(op, acc, cast(inc), first),
    }
}

#[inline(always)]
fn narrow_rounding_impl<H: Half>(dst: &mut [H], src: &mut [f32]) {
    let mut back = [0f32; BLOCK];
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks_mut(BLOCK)) {
        H::narrow(d, s);
        let b = &mut back[..s.len()];
        H::widen(d, b);
        let diff = s
            .iter()
            .zip(b.iter())
            .fold(0u32, |a, (x, y)| a | (x.to_bits() ^ y.to_bits()));
        if diff != 0 {
            s.copy_from_slice(b);
        }
    }
}

#[inline(always)]
fn reduce_widened_impl<H: Half>(op: ReduceOp, acc: &mut [f32], inc: &[H], first: bool) {
    let mut wide = [0f32; BLOCK];
    let mut h = [H::ZERO; BLOCK];
    for (a, i) in acc.chunks_mut(BLOCK).zip(inc.chunks(BLOCK)) {
        let w = &mut wide[..a.len()];
        H::widen(i, w);
        float_reduce(op, a, w, first);
        let h = &mut h[..a.len()];
        H::narrow(h, a);
        H::widen(h, a);
    }
}

#[inline(always)]
fn round_impl<H: Half>(buf: &mut [f32]) {
    let mut h = [H::ZERO; BLOCK];
    for a in buf.chunks_mut(BLOCK) {
        let h = &mut h[..a.len()];
        H::narrow(h, a);
        H::widen(h, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LENS: [usize; 7] = [0, 1, 7, 255, 256, 257, 1003];

    /// Deterministic xorshift64* so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// Test values and bitwise equality, written independently of the kernels.
    trait TestElem: Element {
        fn gen(r: &mut Rng) -> Self;
        fn bits(self) -> u64;
        fn is_nan_(self) -> bool;
        fn is_zero(self) -> bool;
        /// Scalar reference for `a (op) b`.
        fn reference(op: ReduceOp, a: Self, b: Self) -> Self;
        fn ref_div(a: Self, n: usize) -> Self;
    }

    macro_rules! int_test {
        ($($t:ty),*) => {$(
            impl TestElem for $t {
                fn gen(r: &mut Rng) -> $t {
                    let x = r.next();
                    // Mix small values (products stay meaningful) with full-range ones (wrapping).
                    if x & 3 == 0 { (x >> 8) as $t } else { (((x >> 8) % 21) as $t).wrapping_sub(10) }
                }
                fn bits(self) -> u64 { self as u64 }
                fn is_nan_(self) -> bool { false }
                fn is_zero(self) -> bool { self == 0 }
                fn reference(op: ReduceOp, a: $t, b: $t) -> $t {
                    match op {
                        ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                        ReduceOp::Prod => a.wrapping_mul(b),
                        ReduceOp::Min => if a <= b { a } else { b },
                        ReduceOp::Max => if a >= b { a } else { b },
                    }
                }
                fn ref_div(a: $t, n: usize) -> $t {
                    (a as i128 / n as i128) as $t
                }
            }
        )*};
    }
    int_test!(u8, i32, i64);

    /// Special f32 values: zeros, infinities, NaN with a payload, subnormals,
    /// f16/bf16 overflow and rounding-tie neighbourhoods.
    fn special_f32(r: &mut Rng) -> f32 {
        const S: [u32; 14] = [
            0x0000_0000,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_1234,
            0x0000_0001,
            0x8000_0003,
            0x477F_E000,
            0x477F_F000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x3380_0000,
            0x7F7F_FFFF,
        ];
        f32::from_bits(S[(r.next() % S.len() as u64) as usize])
    }

    fn gen_f32(r: &mut Rng) -> f32 {
        let x = r.next();
        match x % 8 {
            0 => special_f32(r),
            // Arbitrary bit patterns exercise rounding everywhere (NaNs included).
            1 => f32::from_bits((x >> 32) as u32),
            _ => ((x >> 16) % 20001) as f32 / 100.0 - 100.0,
        }
    }

    impl TestElem for f32 {
        fn gen(r: &mut Rng) -> f32 {
            gen_f32(r)
        }
        fn bits(self) -> u64 {
            self.to_bits() as u64
        }
        fn is_nan_(self) -> bool {
            self.is_nan()
        }
        fn is_zero(self) -> bool {
            self == 0.0
        }
        fn reference(op: ReduceOp, a: f32, b: f32) -> f32 {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => a + b,
                ReduceOp::Prod => a * b,
                ReduceOp::Min => {
                    if a.is_nan() {
                        b
                    } else if b.is_nan() || a < b {
                        a
                    } else {
                        b
                    }
                }
                ReduceOp::Max => {
                    if a.is_nan() {
                        b
                    } else if b.is_nan() || a > b {
                        a
                    } else {
                        b
                    }
                }
            }
        }
        fn ref_div(a: f32, n: usize) -> f32 {
            a / n as f32
        }
    }

    impl TestElem for f64 {
        fn gen(r: &mut Rng) -> f64 {
            let x = r.next();
            if x % 8 == 1 {
                f64::from_bits(r.next())
            } else {
                gen_f32(r) as f64 * 1.000_000_1
            }
        }
        fn bits(self) -> u64 {
            self.to_bits()
        }
        fn is_nan_(self) -> bool {
            self.is_nan()
        }
        fn is_zero(self) -> bool {
            self == 0.0
        }
        fn reference(op: ReduceOp, a: f64, b: f64) -> f64 {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => a + b,
                ReduceOp::Prod => a * b,
                ReduceOp::Min => {
                    if a.is_nan() {
                        b
                    } else if b.is_nan() || a < b {
                        a
                    } else {
                        b
                    }
                }
                ReduceOp::Max => {
                    if a.is_nan() {
                        b
                    } else if b.is_nan() || a > b {
                        a
                    } else {
                        b
                    }
                }
            }
        }
        fn ref_div(a: f64, n: usize) -> f64 {
            a / n as f64
        }
    }

    macro_rules! half_test {
        ($($t:ty),*) => {$(
            impl TestElem for $t {
                fn gen(r: &mut Rng) -> $t {
                    if r.next() % 4 == 0 {
                        <$t>::from_bits(r.next() as u16) // any pattern, NaNs included
                    } else {
                        <$t>::from_f32(gen_f32(r))
                    }
                }
                fn bits(self) -> u64 { self.to_bits() as u64 }
                fn is_nan_(self) -> bool { self.is_nan() }
                fn is_zero(self) -> bool { self.to_f32() == 0.0 }
                fn reference(op: ReduceOp, a: $t, b: $t) -> $t {
                    <$t>::from_f32(f32::reference(op, a.to_f32(), b.to_f32()))
                }
                fn ref_div(a: $t, n: usize) -> $t { <$t>::from_f32(a.to_f32() / n as f32) }
            }
        )*};
    }
    half_test!(f16, bf16);

    /// Generates a pair of inputs avoiding the cases whose bitwise result is not
    /// pinned down by Rust/LLVM semantics (so the test cannot flake): two NaNs
    /// (which payload wins may depend on instruction operand order chosen by the
    /// backend) and +0/-0 pairs in min/max (IEEE minNum may return either).
    fn gen_pair<T: TestElem>(r: &mut Rng, op: ReduceOp) -> (T, T) {
        loop {
            let (a, b) = (T::gen(r), T::gen(r));
            let nan2 = a.is_nan_() && b.is_nan_();
            let zeros = matches!(op, ReduceOp::Min | ReduceOp::Max)
                && a.is_zero()
                && b.is_zero()
                && a.bits() != b.bits();
            if !nan2 && !zeros {
                return (a, b);
            }
        }
    }

    fn check<T: TestElem>() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15 ^ T::DTYPE.code() as u64);
        for op in ReduceOp::ALL {
            for first in [false, true] {
                for len in LENS {
                    // Offset 1 misaligns the start relative to the vector width.
                    for off in [0, 1] {
                        let pairs: Vec<(T, T)> =
                            (0..len + off).map(|_| gen_pair(&mut r, op)).collect();
                        let acc0: Vec<T> = pairs.iter().map(|p| p.0).collect();
                        let inc: Vec<T> = pairs.iter().map(|p| p.1).collect();
                        let want: Vec<u64> = pairs[off..]
                            .iter()
                            .map(|&(a, b)| {
                                let v = if first {
                                    T::reference(op, b, a)
                                } else {
                                    T::reference(op, a, b)
                                };
                                v.bits()
                            })
                            .collect();

                        let mut acc = acc0.clone();
                        reduce(op, &mut acc[off..], &inc[off..], first);
                        let got: Vec<u64> = acc[off..].iter().map(|x| x.bits()).collect();
                        assert!(
                            acc[..off]
                                .iter()
                                .zip(&acc0)
                                .all(|(x, y)| x.bits() == y.bits()),
                            "wrote outside the slice"
                        );
                        for i in 0..len {
                            assert_eq!(
                                got[i],
                                want[i],
                                "{:?} {op} first={first} len={len} off={off} i={i}: {:?} (op) {:?}",
                                T::DTYPE,
                                acc0[off + i],
                                inc[off + i]
                            );
                        }

                        let mut acc = acc0.clone();
                        reduce_bytes(
                            T::DTYPE,
                            op,
                            as_bytes_mut(&mut acc[off..]),
                            as_bytes(&inc[off..]),
                            first,
                        );
                        let got_b: Vec<u64> = acc[off..].iter().map(|x| x.bits()).collect();
                        assert_eq!(got_b, want, "{:?} {op} bytes path len={len}", T::DTYPE);

                        // The baseline copy too (the public entry may pick the wide one).
                        let mut acc = acc0.clone();
                        reduce_portable(
                            T::DTYPE,
                            op,
                            as_bytes_mut(&mut acc[off..]),
                            as_bytes(&inc[off..]),
                            first,
                        );
                        let got_p: Vec<u64> = acc[off..].iter().map(|x| x.bits()).collect();
                        assert_eq!(got_p, want, "{:?} {op} portable len={len}", T::DTYPE);
                    }
                }
            }
        }
    }

    fn check_divide<T: TestElem>() {
        let mut r = Rng(0xD1B5_4A32_D192_ED03 ^ T::DTYPE.code() as u64);
        for n in [1usize, 2, 3, 7, 1000, 1 << 40] {
            for len in LENS {
                let v: Vec<T> = (0..len).map(|_| T::gen(&mut r)).collect();
                let want: Vec<u64> = v.iter().map(|&x| T::ref_div(x, n).bits()).collect();
                let mut got = v.clone();
                divide(&mut got, n);
                let got_bits: Vec<u64> = got.iter().map(|x| x.bits()).collect();
                assert_eq!(got_bits, want, "{:?} divide n={n} len={len}", T::DTYPE);
                let mut got = v.clone();
                divide_bytes(T::DTYPE, as_bytes_mut(&mut got), n);
                let got_bits: Vec<u64> = got.iter().map(|x| x.bits()).collect();
                assert_eq!(
                    got_bits,
                    want,
                    "{:?} divide_bytes n={n} len={len}",
                    T::DTYPE
                );
                let mut got = v.clone();
                divide_portable(T::DTYPE, as_bytes_mut(&mut got), n);
                let got_bits: Vec<u64> = got.iter().map(|x| x.bits()).collect();
                assert_eq!(
                    got_bits,
                    want,
                    "{:?} divide portable n={n} len={len}",
                    T::DTYPE
                );
            }
        }
    }

    #[test]
    fn reduce_u8() {
        check::<u8>()
    }
    #[test]
    fn reduce_i32() {
        check::<i32>()
    }
    #[test]
    fn reduce_i64() {
        check::<i64>()
    }
    #[test]
    fn reduce_f16() {
        check::<f16>()
    }
    #[test]
    fn reduce_bf16() {
        check::<bf16>()
    }
    #[test]
    fn reduce_f32() {
        check::<f32>()
    }
    #[test]
    fn reduce_f64() {
        check::<f64>()
    }

    #[test]
    fn divide_all_dtypes() {
        check_divide::<u8>();
        check_divide::<i32>();
        check_divide::<i64>();
        check_divide::<f16>();
        check_divide::<bf16>();
        check_divide::<f32>();
        check_divide::<f64>();
    }

    #[test]
    fn divide_integer_edges() {
        let mut v = [i64::MIN, i64::MAX, -1];
        divide(&mut v, 1usize << 63);
        assert_eq!(v, [-1, 0, 0]);
        let mut v = [255u8, 7];
        divide(&mut v, 256);
        assert_eq!(v, [0, 0]);
    }

    #[test]
    #[should_panic(expected = "n must be positive")]
    fn divide_by_zero_panics() {
        divide(&mut [1.0f32], 0);
    }

    #[test]
    fn bf16_widen_exhaustive() {
        let src: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut dst = vec![0f32; src.len()];
        bf16::widen(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(d.to_bits(), s.to_f32().to_bits(), "{:#06x}", s.to_bits());
        }
    }

    /// The F16C `f16` kernel against the scalar definition
    /// `f16::from_f32(op(a.to_f32(), b.to_f32()))`: every f16 bit pattern against
    /// 256 partners (±0, ±inf, quiet/signalling NaNs of both signs, subnormals,
    /// extremes, rounding neighbours, random patterns), every op, both operand orders
    /// and both slice roles, in calls of lengths cycling 1..=40 so the 8-lane body
    /// and the scalar tail both see every value. As in `gen_pair`, NaN-NaN pairs
    /// (which payload wins is unpinned) only have to give a NaN, and +0/-0 pairs in
    /// min/max only a zero.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16_f16c_kernel_matches_scalar() {
        if !x86::wide() {
            eprintln!("skipped: CPU lacks AVX2/F16C");
            return;
        }
        let mut partners: Vec<u16> = vec![
            0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7D55, 0x7FFF, 0xFFFF,
            0x0001, 0x8001, 0x0002, 0x03FF, 0x83FF, 0x0200, 0x0400, 0x8400, 0x7BFF, 0xFBFF, 0x7BFE,
            0x3C00, 0xBC00, 0x3C01, 0x3BFF, 0x3800, 0x4000, 0xC000, 0x5BFF, 0x1400, 0x0C00, 0x6800,
            0x7800, 0x2E66, 0xB555,
        ];
        let mut r = Rng(0x5851_F42D_4C95_7F2D);
        while partners.len() < 256 {
            partners.push(r.next() as u16);
        }
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let scalar = |op: ReduceOp, a: f16, b: f16| -> f16 {
            let (x, y) = (a.to_f32(), b.to_f32());
            f16::from_f32(match op {
                ReduceOp::Sum | ReduceOp::Avg => x + y,
                ReduceOp::Prod => x * y,
                ReduceOp::Min => x.min(y),
                ReduceOp::Max => x.max(y),
            })
        };
        for &p in &partners {
            let p = f16::from_bits(p);
            let other = vec![p; all.len()];
            for op in ReduceOp::ALL {
                for first in [false, true] {
                    for all_is_acc in [false, true] {
                        let (acc0, inc) = if all_is_acc {
                            (&all, &other)
                        } else {
                            (&other, &all)
                        };
                        let mut acc = acc0.clone();
                        let (mut i, mut len) = (0, 1);
                        while i < acc.len() {
                            let j = (i + len).min(acc.len());
                            // SAFETY: AVX2 and F16C checked above.
                            unsafe { x86::f16_reduce(op, &mut acc[i..j], &inc[i..j], first) };
                            i = j;
                            len = len % 40 + 1;
                        }
                        for k in 0..acc.len() {
                            let (a, b) = if first {
                                (inc[k], acc0[k])
                            } else {
                                (acc0[k], inc[k])
                            };
                            let (got, want) = (acc[k], scalar(op, a, b));
                            let ok = if a.is_nan() && b.is_nan() {
                                got.is_nan()
                            } else if matches!(op, ReduceOp::Min | ReduceOp::Max)
                                && a.to_f32() == 0.0
                                && b.to_f32() == 0.0
                            {
                                got.to_f32() == 0.0
                            } else {
                                got.to_bits() == want.to_bits()
                            };
                            assert!(
                                ok,
                                "{op} first={first} {:#06x} (op) {:#06x}: got {:#06x} want {:#06x}",
                                a.to_bits(),
                                b.to_bits(),
                                got.to_bits(),
                                want.to_bits()
                            );
                        }
                    }
                }
            }
        }
    }

    /// Scalar definitions of the mixed-precision kernels, through half's
    /// scalar conversions.
    fn to16(wire: DType, x: f32) -> u16 {
        match wire {
            DType::F16 => f16::from_f32(x).to_bits(),
            _ => bf16::from_f32(x).to_bits(),
        }
    }
    fn from16(wire: DType, h: u16) -> f32 {
        match wire {
            DType::F16 => f16::from_bits(h).to_f32(),
            _ => bf16::from_bits(h).to_f32(),
        }
    }

    #[test]
    fn mixed_precision_kernels_match_scalar() {
        let mut r = Rng(0x2545_F491_4F6C_DD1D);
        for wire in [DType::F16, DType::BF16] {
            for len in LENS {
                for off in [0, 1] {
                    let xs: Vec<f32> = (0..len + off).map(|_| gen_f32(&mut r)).collect();
                    let hs: Vec<u16> = (0..len + off).map(|_| r.next() as u16).collect();
                    let xs = &xs[off..];
                    let hs = &hs[off..];
                    // narrow / narrow_rounding
                    let want: Vec<u16> = xs.iter().map(|&x| to16(wire, x)).collect();
                    let mut got = vec![0u16; len];
                    narrow(wire, as_bytes_mut(cast_u16(&mut got)), xs);
                    assert_eq!(got, want, "{wire:?} narrow len={len}");
                    for portable in [false, true] {
                        let mut src = xs.to_vec();
                        let mut got = vec![0u16; len];
                        let dst = as_bytes_mut(cast_u16(&mut got));
                        if portable {
                            narrow_rounding_portable(wire, dst, &mut src);
                        } else {
                            narrow_rounding(wire, dst, &mut src);
                        }
                        assert_eq!(got, want, "{wire:?} narrow_rounding len={len}");
                        for (i, (&s, &w)) in src.iter().zip(&want).enumerate() {
                            assert_eq!(
                                s.to_bits(),
                                from16(wire, w).to_bits(),
                                "{wire:?} rounded source i={i} of {:#010x}",
                                xs[i].to_bits()
                            );
                        }
                    }
                    // widen
                    let want: Vec<u32> = hs.iter().map(|&h| from16(wire, h).to_bits()).collect();
                    for portable in [false, true] {
                        let mut got = vec![0f32; len];
                        let src = as_bytes(cast_u16_ref(hs));
                        if portable {
                            widen_portable(wire, &mut got, src);
                        } else {
                            widen(wire, &mut got, src);
                        }
                        let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                        assert_eq!(got, want, "{wire:?} widen len={len}");
                    }
                    // reduce_widened: acc = round(acc (op) widen(inc)), f32 in between.
                    for op in ReduceOp::ALL {
                        for first in [false, true] {
                            for portable in [false, true] {
                                let mut acc = xs.to_vec();
                                let inc = as_bytes(cast_u16_ref(hs));
                                if portable {
                                    reduce_widened_portable(wire, op, &mut acc, inc, first);
                                } else {
                                    reduce_widened(wire, op, &mut acc, inc, first);
                                }
                                for i in 0..len {
                                    let (a, b) = (xs[i], from16(wire, hs[i]));
                                    if a.is_nan() && b.is_nan() {
                                        assert!(acc[i].is_nan());
                                        continue;
                                    }
                                    let (x, y) = if first { (b, a) } else { (a, b) };
                                    let v = f32::reference(op, x, y);
                                    let want = from16(wire, to16(wire, v));
                                    let zeros = matches!(op, ReduceOp::Min | ReduceOp::Max)
                                        && a == 0.0
                                        && b == 0.0;
                                    assert!(
                                        acc[i].to_bits() == want.to_bits()
                                            || (zeros && acc[i] == 0.0),
                                        "{wire:?} {op} first={first} portable={portable} \
                                         {a:?} (op) {b:?}: got {:?} want {want:?}",
                                        acc[i]
                                    );
                                }
                            }
                        }
                    }
                    // round_to
                    let mut v = xs.to_vec();
                    round_to(wire, &mut v);
                    for (i, x) in v.iter().enumerate() {
                        assert_eq!(x.to_bits(), from16(wire, to16(wire, xs[i])).to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn f16_widen_exhaustive() {
        let src: Vec<u16> = (0..=u16::MAX).collect();
        let mut dst = vec![0f32; src.len()];
        widen(DType::F16, &mut dst, as_bytes(cast_u16_ref(&src)));
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(
                d.to_bits(),
                f16::from_bits(*s).to_f32().to_bits(),
                "{s:#06x}"
            );
        }
    }

    fn cast_u16(v: &mut [u16]) -> &mut [f16] {
        // SAFETY: f16 is a transparent u16.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
    }
    fn cast_u16_ref(v: &[u16]) -> &[f16] {
        // SAFETY: f16 is a transparent u16.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
    }

    #[test]
    fn bf16_narrow_matches_from_f32() {
        // Every 2^16 block boundary neighbourhood (ties, overflow to inf, NaNs of both
        // signs) plus a prime-stride sweep of the whole f32 space.
        let mut xs: Vec<f32> = Vec::new();
        for hi in 0..=u16::MAX as u32 {
            for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                xs.push(f32::from_bits(hi << 16 | lo));
            }
        }
        xs.extend((0..u32::MAX / 65_537).map(|i| f32::from_bits(i.wrapping_mul(65_537))));
        let mut dst = vec![bf16::ZERO; xs.len()];
        bf16::narrow(&mut dst, &xs);
        for (x, d) in xs.iter().zip(&dst) {
            assert_eq!(
                d.to_bits(),
                bf16::from_f32(*x).to_bits(),
                "{:#010x}",
                x.to_bits()
            );
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn bytes_length_mismatch_panics() {
        let mut a = [0i32; 4];
        let b = [0i32; 3];
        reduce_bytes(
            DType::F32,
            ReduceOp::Sum,
            as_bytes_mut(&mut a),
            as_bytes(&b),
            false,
        );
    }

    #[test]
    #[should_panic(expected = "not a multiple")]
    fn bytes_partial_element_panics() {
        let mut a = [0i64; 2];
        let b = [0i64; 2];
        reduce_bytes(
            DType::I64,
            ReduceOp::Max,
            &mut as_bytes_mut(&mut a)[..12],
            &as_bytes(&b)[..12],
            false,
        );
    }

    #[test]
    #[should_panic(expected = "not aligned")]
    fn bytes_misaligned_acc_panics() {
        let mut a = [0i32; 5];
        let b = [0i32; 5];
        // Valid length (4 elements), start one byte past an aligned address.
        reduce_bytes(
            DType::F32,
            ReduceOp::Sum,
            &mut as_bytes_mut(&mut a)[1..17],
            &as_bytes(&b)[..16],
            false,
        );
    }

    #[test]
    #[should_panic(expected = "not aligned")]
    fn bytes_misaligned_inc_panics() {
        let mut a = [0i64; 3];
        let b = [0i64; 3];
        reduce_bytes(
            DType::F64,
            ReduceOp::Min,
            &mut as_bytes_mut(&mut a)[..16],
            &as_bytes(&b)[4..20],
            true,
        );
    }

    #[test]
    fn op_codes_names_roundtrip() {
        for (i, op) in ReduceOp::ALL.into_iter().enumerate() {
            assert_eq!(op.code() as usize, i + 1);
            assert_eq!(ReduceOp::from_code(op.code()), Some(op));
            assert_eq!(ReduceOp::parse(op.name()), Some(op));
            assert_eq!(op.to_string(), op.name());
        }
        assert_eq!(ReduceOp::from_code(0), None);
        assert_eq!(ReduceOp::from_code(6), None);
        assert_eq!(ReduceOp::parse("Sum"), None);
    }
}
