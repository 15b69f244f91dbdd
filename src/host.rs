//! What this host lends the process: the CPUs it may run on. The launcher
//! pins ranks to shares of them, and the communicator asks whether its ranks
//! outnumber the cores they share (see `algo::cost::select`).

/// The CPUs this process may run on (its affinity mask), in increasing order;
/// empty if the kernel will not say.
///
/// ```
/// let cpus = kolo::host::usable_cpus();
/// assert!(cpus.windows(2).all(|w| w[0] < w[1]));
/// ```
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; the kernel fills at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Words of a CPU bitmask ([`cpu_mask`]): enough for `CPU_SETSIZE` (1024) CPUs.
pub const MASK_WORDS: usize = 16;

/// `cpus` as a bitmask of [`MASK_WORDS`] words (bit `c % 64` of word `c / 64`),
/// in `i64` so that ranks can allgather masks and OR them: the union of the
/// masks of ranks on one host is the set of cores they share, whether or not
/// each is pinned to a part of it.
///
/// ```
/// let m = kolo::host::cpu_mask(&[0, 3, 64]);
/// assert_eq!((m[0], m[1]), (0b1001, 1));
/// assert_eq!(kolo::host::count_union(&m), 3);
/// ```
pub fn cpu_mask(cpus: &[usize]) -> [i64; MASK_WORDS] {
    let mut m = [0i64; MASK_WORDS];
    for &c in cpus.iter().filter(|&&c| c < MASK_WORDS * 64) {
        m[c / 64] |= 1i64 << (c % 64);
    }
    m
}

/// The number of CPUs in the union of masks laid end to end (each
/// [`MASK_WORDS`] words, as an allgather of [`cpu_mask`]s leaves them).
///
/// ```
/// use kolo::host::{count_union, cpu_mask};
/// let all: Vec<i64> = [cpu_mask(&[0]), cpu_mask(&[1]), cpu_mask(&[0, 1])].concat();
/// assert_eq!(count_union(&all), 2);
/// ```
pub fn count_union(masks: &[i64]) -> usize {
    (0..MASK_WORDS)
        .map(|w| {
            masks
                .iter()
                .skip(w)
                .step_by(MASK_WORDS)
                .fold(0i64, |a, &b| a | b)
                .count_ones() as usize
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_union_of_disjoint_shares_counts_every_core_once() {
        // Four ranks pinned to two cores each of an 8-core host, and one
        // unpinned rank that sees them all.
        let shares: Vec<i64> = (0..4).flat_map(|r| cpu_mask(&[2 * r, 2 * r + 1])).collect();
        assert_eq!(count_union(&shares), 8);
        let mut with_unpinned = shares.clone();
        with_unpinned.extend(cpu_mask(&(0..8).collect::<Vec<_>>()));
        assert_eq!(count_union(&with_unpinned), 8);
        // CPUs past the mask are dropped rather than wrapped around.
        assert_eq!(count_union(&cpu_mask(&[1023, 1024, 5000])), 1);
    }

    #[test]
    fn this_process_may_run_somewhere() {
        let cpus = usable_cpus();
        assert!(!cpus.is_empty());
        assert_eq!(
            count_union(&cpu_mask(&cpus)),
            cpus.len().min(MASK_WORDS * 64)
        );
    }
}
