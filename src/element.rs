//! The element types kolo reduces and moves, and their wire codes.

use half::{bf16, f16};

/// Element type of a buffer, as carried in frame headers and the C ABI.
///
/// ```
/// use kolo::DType;
/// assert_eq!(DType::F16.size(), 2);
/// assert_eq!(DType::from_code(DType::I64.code()), Some(DType::I64));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `u8`
    U8,
    /// `i32`
    I32,
    /// `i64`
    I64,
    /// IEEE half precision (`half::f16`)
    F16,
    /// bfloat16 (`half::bf16`)
    BF16,
    /// `f32`
    F32,
    /// `f64`
    F64,
}

impl DType {
    /// Every dtype, for tests and benchmarks.
    pub const ALL: [DType; 7] = [
        DType::U8,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// Code used on the wire.
    pub fn code(self) -> u8 {
        match self {
            DType::U8 => 1,
            DType::I32 => 2,
            DType::I64 => 3,
            DType::F16 => 4,
            DType::BF16 => 5,
            DType::F32 => 6,
            DType::F64 => 7,
        }
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(c: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == c)
    }

    /// Name as nccl-tests spells it (`float`, `half`, `bfloat16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
            DType::F32 => "float",
            DType::F64 => "double",
        }
    }

    /// Parse nccl-tests names and common aliases (`f32`, `float32`, ...).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "uint8" | "u8" => DType::U8,
            "int32" | "i32" | "int" => DType::I32,
            "int64" | "i64" => DType::I64,
            "half" | "f16" | "float16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "float" | "f32" | "float32" => DType::F32,
            "double" | "f64" | "float64" => DType::F64,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A plain-old-data element kolo can send and reduce. Sealed: implemented for
/// `u8, i32, i64, f16, bf16, f32, f64` only, which have no padding and no
/// invalid bit patterns, so viewing them as bytes is sound.
///
/// ```
/// use kolo::{DType, Element};
/// assert_eq!(<f32 as Element>::DTYPE, DType::F32);
/// let v = [1.0f32, 2.0];
/// assert_eq!(kolo::element::as_bytes(&v).len(), 8);
/// ```
pub trait Element:
    sealed::Sealed + Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static
{
    /// The wire dtype of this element type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: DType = DType::$d; }
    )*};
}
element!(u8 => U8, i32 => I32, i64 => I64, f16 => F16, bf16 => BF16, f32 => F32, f64 => F64);

/// View elements as bytes.
pub fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: Element is sealed to padding-free POD types; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

/// View elements as mutable bytes.
pub fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern is a valid Element, so writes
    // through the byte view cannot create an invalid value.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// View bytes as elements of `T`; `None` when the bytes are misaligned for `T`
/// or not a whole number of elements.
///
/// ```
/// let mut v = vec![0i64; 2];
/// let b = kolo::element::as_bytes_mut(&mut v);
/// assert_eq!(kolo::element::cast_mut::<f32>(b).map(|s| s.len()), Some(4));
/// ```
pub fn cast_mut<T: Element>(b: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: Element is sealed to POD types for which every bit pattern is valid.
    let (pre, mid, post) = unsafe { b.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// View bytes as elements of `T` (see [`cast_mut`]).
///
/// ```
/// let v = vec![0i64; 1];
/// assert_eq!(kolo::element::cast::<i32>(kolo::element::as_bytes(&v)), Some(&[0, 0][..]));
/// ```
pub fn cast<T: Element>(b: &[u8]) -> Option<&[T]> {
    // SAFETY: as in `cast_mut`.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Run an expression with a type alias bound to the Rust type of a runtime
/// [`DType`], so byte buffers can reach the typed API:
/// `with_dtype!(dtype, T => comm.allreduce(cast_mut::<T>(bytes)?, op))`.
macro_rules! with_dtype {
    ($d:expr, $t:ident => $body:expr) => {
        match $d {
            $crate::DType::U8 => {
                type $t = u8;
                $body
            }
            $crate::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            $crate::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::DType::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;
