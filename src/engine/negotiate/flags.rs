//! A round's vector of flags, packed to travel and counted on arrival.

/// A round's vector (every entry 0 or 1) as bits, eight to a byte, to travel.
///
/// ```
/// use kolo::engine::negotiate::{count_flags, pack_flags};
/// let a = pack_flags(&[1, 0, 1]);
/// let b = pack_flags(&[1, 1, 0]);
/// assert_eq!(count_flags(&[a, b].concat(), 2, 3), [2, 1, 1]);
/// ```
pub fn pack_flags(v: &[i32]) -> Vec<u8> {
    let mut w = vec![0u8; v.len().div_ceil(8)];
    for (i, &f) in v.iter().enumerate() {
        debug_assert!(f == 0 || f == 1, "vector entries are flags");
        w[i / 8] |= u8::from(f != 0) << (i % 8);
    }
    w
}

/// The summed vector: for each of `len` entries, how many of the `n` ranks'
/// packed vectors (laid end to end in `all`) have it set.
pub fn count_flags(all: &[u8], n: usize, len: usize) -> Vec<i32> {
    let bytes = len.div_ceil(8);
    let mut v = vec![0i32; len];
    for r in 0..n {
        for (k, &b) in all[r * bytes..(r + 1) * bytes].iter().enumerate() {
            let mut b = b;
            while b != 0 {
                let i = k * 8 + b.trailing_zeros() as usize;
                if i < len {
                    v[i] += 1;
                }
                b &= b - 1;
            }
        }
    }
    v
}
