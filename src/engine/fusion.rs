//! Which ready allreduces share a fusion buffer. Pure planning: the worker
//! copies tensors in, runs one collective per batch and copies them out.

use super::negotiate::{Coll, Spec};
use crate::ReduceOp;

/// Tensors reduced by one collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Indices into the ready list, in order.
    pub members: Vec<usize>,
    /// Total payload bytes.
    pub bytes: usize,
}

/// The reduction that travels on the wire: an average is a sum divided
/// afterwards (by the number of contributors), so sums and averages fuse.
pub fn wire_op(op: ReduceOp) -> ReduceOp {
    match op {
        ReduceOp::Avg => ReduceOp::Sum,
        o => o,
    }
}

/// Pack the ready allreduces into batches of one dtype and wire reduction, in
/// order of first appearance, each at most `threshold` bytes. A tensor of at
/// least `threshold` or `inplace` bytes goes alone and is reduced in place:
/// copying it in and out would cost more than the latency fusion saves. Every
/// rank computes the same plan from the same ready list.
///
/// ```ignore
/// let batches = plan(ready.iter().map(Ready::spec), 64 << 20, 1 << 20);
/// ```
pub fn plan<'a>(
    ready: impl IntoIterator<Item = &'a Spec>,
    threshold: usize,
    inplace: usize,
) -> Vec<Batch> {
    let mut open: Vec<((u8, ReduceOp, &str), Batch)> = Vec::new();
    let mut done: Vec<Batch> = Vec::new();
    // Compared per tensor: the string only when one is not empty (an equal
    // comparison of two empty strings still calls memcmp).
    let same = |a: &(u8, ReduceOp, &str), b: &(u8, ReduceOp, &str)| {
        a.0 == b.0 && a.1 == b.1 && (a.2.is_empty() && b.2.is_empty() || a.2 == b.2)
    };
    for (i, s) in ready.into_iter().enumerate() {
        if s.coll != Coll::Allreduce {
            continue;
        }
        let dtype = crate::DType::from_code(s.dtype).map_or(1, |d| d.size());
        let bytes = s.count() as usize * dtype;
        let key = (
            s.dtype,
            wire_op(ReduceOp::from_code(s.op).unwrap_or(ReduceOp::Sum)),
            s.compression.as_str(),
        );
        // Top-k keeps error feedback per tensor, so it never shares a buffer.
        if bytes >= threshold || bytes >= inplace || s.compression.starts_with("topk") {
            done.push(Batch {
                members: vec![i],
                bytes,
            });
            continue;
        }
        match open.iter_mut().find(|(k, _)| same(k, &key)) {
            Some((_, b)) if b.bytes + bytes <= threshold => {
                b.members.push(i);
                b.bytes += bytes;
            }
            Some((_, b)) => {
                let full = std::mem::replace(
                    b,
                    Batch {
                        members: vec![i],
                        bytes,
                    },
                );
                done.push(full);
            }
            None => open.push((
                key,
                Batch {
                    members: vec![i],
                    bytes,
                },
            )),
        }
    }
    done.extend(open.into_iter().map(|(_, b)| b));
    // Run in order of each batch's first tensor, the order tensors became ready.
    done.sort_by_key(|b| b.members[0]);
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::negotiate::Ready;
    use crate::DType;

    fn ready(name: &str, dtype: DType, op: ReduceOp, len: u64) -> Ready {
        Ready {
            specs: std::sync::Arc::new(vec![Some(Spec {
                name: name.into(),
                coll: Coll::Allreduce,
                dtype: dtype.code(),
                op: op.code(),
                root: 0,
                shape: crate::engine::negotiate::Shape::flat(len),
                group: None,
                compression: String::new(),
            })]),
            contributors: 1,
            slot: None,
        }
    }

    #[test]
    fn packs_by_dtype_and_wire_op_up_to_the_threshold() {
        let r = [
            ready("a", DType::F32, ReduceOp::Sum, 10),  // 40 B
            ready("b", DType::F64, ReduceOp::Sum, 10),  // 80 B
            ready("c", DType::F32, ReduceOp::Avg, 10),  // fuses with a
            ready("d", DType::F32, ReduceOp::Max, 10),  // other wire op
            ready("e", DType::F32, ReduceOp::Sum, 100), // 400 B: alone
            ready("f", DType::F32, ReduceOp::Sum, 10),  // a+c+f = 120 > 100: new batch
        ];
        let b = plan(r.iter().map(Ready::spec), 100, usize::MAX);
        let m: Vec<Vec<usize>> = b.iter().map(|b| b.members.clone()).collect();
        assert_eq!(m, vec![vec![0, 2], vec![1], vec![3], vec![4], vec![5]]);
        assert_eq!(b[0].bytes, 80);
    }

    #[test]
    fn zero_threshold_means_every_tensor_alone() {
        let r: Vec<Ready> = (0..3)
            .map(|i| ready(&i.to_string(), DType::F32, ReduceOp::Sum, 4))
            .collect();
        assert_eq!(plan(r.iter().map(Ready::spec), 0, usize::MAX).len(), 3);
        // Big tensors stay out of fusion buffers.
        assert_eq!(plan(r.iter().map(Ready::spec), 1 << 20, 16).len(), 3);
        assert_eq!(plan(r.iter().map(Ready::spec), 1 << 20, 17).len(), 1);
    }
}
