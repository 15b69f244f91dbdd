//! [`Shape`], a tensor's dimensions, kept out of line for short ones.

use serde::{Deserialize, Serialize};

/// A tensor's dimensions, held inline up to four of them: building a
/// [`Spec`] then allocates nothing, and a training step submits hundreds.
/// Compares, prints and serializes as the list of dimensions.
///
/// ```
/// use kolo::engine::negotiate::Shape;
/// let s = Shape::from(&[64u64, 3, 3, 3][..]);
/// assert_eq!((s.len(), s.iter().product::<u64>()), (4, 1728));
/// assert_eq!(Shape::from(&[1u64, 2, 3, 4, 5][..])[4], 5);
/// ```
#[derive(Clone)]
pub enum Shape {
    /// At most four dimensions: the first `.0` of `.1`.
    Inline(u8, [u64; 4]),
    /// More than four.
    Heap(Vec<u64>),
}

impl Shape {
    /// A one-dimensional shape of `len` elements.
    pub fn flat(len: u64) -> Shape {
        Shape::Inline(1, [len, 0, 0, 0])
    }
}

impl From<&[u64]> for Shape {
    fn from(d: &[u64]) -> Shape {
        if d.len() <= 4 {
            let mut a = [0; 4];
            a[..d.len()].copy_from_slice(d);
            Shape::Inline(d.len() as u8, a)
        } else {
            Shape::Heap(d.to_vec())
        }
    }
}

impl std::ops::Deref for Shape {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        match self {
            Shape::Inline(n, a) => &a[..*n as usize],
            Shape::Heap(v) => v,
        }
    }
}

impl PartialEq for Shape {
    fn eq(&self, o: &Shape) -> bool {
        **self == **o
    }
}

impl Eq for Shape {}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Serialize for Shape {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
        Vec::<u64>::deserialize(d).map(|v| Shape::from(&v[..]))
    }
}
