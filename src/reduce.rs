//! Reduction kernels: `acc = acc (op) incoming` over slices, per dtype.
//! (Interface pinned; kernels to be written.)

use crate::element::DType;

/// Reduction operator. `Avg` reduces as `Sum`; the caller divides by the rank count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Prod,
    Min,
    Max,
    Avg,
}
