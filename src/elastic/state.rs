//! [`State`]: what an elastic job must not lose when its membership changes.

use super::Comm;
use crate::element::{as_bytes, Element};
use crate::error::{Error, Result};
use crate::Communicator;
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"KST1";

/// Buffers and counters as of a commit.
type Snapshot = (BTreeMap<String, Vec<u8>>, BTreeMap<String, i64>);

/// Named byte buffers and integer counters, with an in-memory commit.
///
/// Training code keeps its parameters, optimizer state and progress here,
/// calls [`State::commit`] every step or few, and after a membership change
/// [`crate::elastic::run`] restores every rank's last commit and sends it to
/// the new members (each survivor holding the newest commit sends a slice).
///
/// ```
/// let mut s = kolo::elastic::State::new();
/// s.put("weights", &[1.0f32, 2.0]);
/// s.set_counter("step", 7);
/// s.commit_local();
/// s.put("weights", &[9.0f32, 9.0]);
/// s.restore();
/// assert_eq!(s.get::<f32>("weights"), Some(vec![1.0, 2.0]));
/// assert_eq!(s.counter("step"), 7);
/// ```
#[derive(Debug, Clone, Default)]
pub struct State {
    buffers: BTreeMap<String, Vec<u8>>,
    counters: BTreeMap<String, i64>,
    committed: Option<Snapshot>,
    serial: u64,
    last_sync: Option<SyncStats>,
}

/// What the last [`State::sync`] did on this rank (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Ranks that sent a slice of the state (empty: nothing was sent).
    pub sources: Vec<usize>,
    /// Size of the encoded state in bytes.
    pub bytes: usize,
    /// Whether this rank took the received state (it was new or behind).
    pub received: bool,
    /// The commit serial every rank holds afterwards.
    pub serial: u64,
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl State {
    /// An empty state.
    pub fn new() -> State {
        State::default()
    }

    /// Set buffer `name` to the bytes of `values`.
    pub fn put<T: Element>(&mut self, name: &str, values: &[T]) {
        self.buffers
            .insert(name.to_string(), as_bytes(values).to_vec());
    }

    /// A copy of buffer `name` as elements of `T` (`None`: absent or not a
    /// whole number of `T`).
    pub fn get<T: Element>(&self, name: &str) -> Option<Vec<T>> {
        let b = self.buffers.get(name)?;
        let size = std::mem::size_of::<T>();
        if b.len() % size != 0 {
            return None;
        }
        Some(
            b.chunks_exact(size)
                // SAFETY: T is a sealed padding-free Element of `size` bytes, for
                // which every bit pattern is valid; the read needs no alignment.
                .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) })
                .collect(),
        )
    }

    /// The raw bytes of buffer `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.buffers.get(name).map(Vec::as_slice)
    }

    /// Mutable raw bytes of buffer `name`, created empty when absent.
    pub fn bytes_mut(&mut self, name: &str) -> &mut Vec<u8> {
        self.buffers.entry(name.to_string()).or_default()
    }

    /// Counter `name` (0 when never set).
    pub fn counter(&self, name: &str) -> i64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// Set counter `name`.
    pub fn set_counter(&mut self, name: &str, v: i64) {
        self.counters.insert(name.to_string(), v);
    }

    /// How many commits this state has seen (carried over to new members).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// What the last synchronisation after a membership change did.
    pub fn last_sync(&self) -> Option<&SyncStats> {
        self.last_sync.as_ref()
    }

    /// Keep an in-memory copy of the current state, without talking to anyone.
    pub fn commit_local(&mut self) {
        self.committed = Some((self.buffers.clone(), self.counters.clone()));
        self.serial += 1;
    }

    /// Commit, then check with every rank whether the membership is about to
    /// change (the launcher started a member, or one registered for the next
    /// epoch); if so, fail with [`Error::MembershipChanged`] on every rank at
    /// this same step, so that [`crate::elastic::run`] re-forms the group.
    /// The check is a one-byte allreduce plus a store read.
    pub fn commit(&mut self, comm: &Comm) -> Result<()> {
        self.commit_local();
        comm.check_membership()
    }

    /// Go back to the last commit (or keep the current state if none was made).
    pub fn restore(&mut self) {
        if let Some((b, c)) = &self.committed {
            self.buffers = b.clone();
            self.counters = c.clone();
        }
    }

    /// Encode the committed state (or the current one before any commit).
    pub fn encode_committed(&self) -> Vec<u8> {
        let (b, c) = match &self.committed {
            Some((b, c)) => (b, c),
            None => (&self.buffers, &self.counters),
        };
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.serial.to_le_bytes());
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        for (k, v) in b {
            out.extend_from_slice(&(k.len() as u64).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(c.len() as u64).to_le_bytes());
        for (k, v) in c {
            out.extend_from_slice(&(k.len() as u64).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Replace this state (current and committed) by an encoded one.
    pub fn decode_into(&mut self, raw: &[u8]) -> std::result::Result<(), String> {
        let mut p = raw;
        fn take<'a>(p: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
            if p.len() < n {
                return Err(format!("truncated state ({} bytes short)", n - p.len()));
            }
            let (a, b) = p.split_at(n);
            *p = b;
            Ok(a)
        }
        fn u64_(p: &mut &[u8]) -> std::result::Result<u64, String> {
            Ok(u64::from_le_bytes(take(p, 8)?.try_into().expect("8 bytes")))
        }
        fn text(p: &mut &[u8]) -> std::result::Result<String, String> {
            let n = u64_(p)? as usize;
            String::from_utf8(take(p, n)?.to_vec()).map_err(|_| "name is not UTF-8".to_string())
        }
        if take(&mut p, 4)? != MAGIC {
            return Err("not an encoded kolo state".into());
        }
        let serial = u64_(&mut p)?;
        let mut b = BTreeMap::new();
        for _ in 0..u64_(&mut p)? {
            let k = text(&mut p)?;
            let n = u64_(&mut p)? as usize;
            b.insert(k, take(&mut p, n)?.to_vec());
        }
        let mut c = BTreeMap::new();
        for _ in 0..u64_(&mut p)? {
            let k = text(&mut p)?;
            c.insert(k, u64_(&mut p)? as i64);
        }
        if !p.is_empty() {
            return Err(format!("{} trailing bytes after the state", p.len()));
        }
        self.buffers = b.clone();
        self.counters = c.clone();
        self.committed = Some((b, c));
        self.serial = serial;
        Ok(())
    }

    /// Make every rank hold the same committed state: the ranks with the
    /// newest commit (the most commits; before any commit, rank 0) are the
    /// sources, each sends one slice of the encoded state in one allgatherv,
    /// and every rank checks the result against a checksum from the first
    /// source; each source also checks it bitwise against its own copy.
    /// Ranks that were behind (or new) take it. Called by
    /// [`crate::elastic::run`] after every membership change.
    pub fn sync(&mut self, comm: &Communicator) -> Result<&SyncStats> {
        let (rank, n) = (comm.rank(), comm.size());
        let mut serials = vec![0i64; n];
        comm.allgather(&[self.serial as i64], &mut serials)?;
        let max = serials.iter().copied().max().unwrap_or(0);
        if max > 0 && serials.iter().all(|&s| s == max) {
            self.restore();
            self.last_sync = Some(SyncStats {
                sources: Vec::new(),
                bytes: 0,
                received: false,
                serial: max as u64,
            });
            return Ok(self.last_sync.as_ref().expect("just set"));
        }
        let sources: Vec<usize> = if max > 0 {
            (0..n).filter(|&r| serials[r] == max).collect()
        } else {
            vec![0]
        };
        let first = sources[0];
        let is_source = sources.contains(&rank);
        let mine = if is_source {
            self.encode_committed()
        } else {
            Vec::new()
        };
        let mut head = [mine.len() as i64, fnv1a(&mine) as i64];
        comm.broadcast(&mut head, first)?;
        let (len, sum) = (head[0] as usize, head[1] as u64);
        let s = sources.len();
        let mut counts = vec![0usize; n];
        for (i, &src) in sources.iter().enumerate() {
            counts[src] = (i + 1) * len / s - i * len / s;
        }
        let slice = match sources.iter().position(|&r| r == rank) {
            Some(i) if mine.len() == len => &mine[i * len / s..(i + 1) * len / s],
            Some(_) => {
                return Err(comm.fail_call(
                    "elastic state sync",
                    format!(
                        "rank {rank} holds commit {max} as {} bytes, rank {first} as {len}: \
                         the ranks' committed states diverged",
                        mine.len()
                    ),
                ))
            }
            None => &[][..],
        };
        let mut all = vec![0u8; len];
        comm.allgatherv(slice, &mut all, &counts)?;
        if fnv1a(&all) != sum {
            return Err(Error::Mismatch {
                rank,
                peer: first,
                op: "elastic state sync".into(),
                detail: "the assembled state does not match the checksum of the first source"
                    .into(),
            });
        }
        if is_source && all != mine {
            let at = all.iter().zip(&mine).position(|(a, b)| a != b).unwrap_or(0);
            return Err(Error::Mismatch {
                rank,
                peer: first,
                op: "elastic state sync".into(),
                detail: format!(
                    "this rank's commit {max} differs from the assembled one at byte {at}: \
                     the sources' states diverged"
                ),
            });
        }
        let received = !is_source || (max == 0 && rank != first);
        if received {
            self.decode_into(&all).map_err(|e| Error::Mismatch {
                rank,
                peer: first,
                op: "elastic state sync".into(),
                detail: e,
            })?;
            if max == 0 {
                // Before any commit the received state is the starting point,
                // not a commit.
                self.committed = None;
                self.serial = 0;
            }
        } else {
            self.restore();
        }
        self.last_sync = Some(SyncStats {
            sources,
            bytes: len,
            received,
            serial: max as u64,
        });
        Ok(self.last_sync.as_ref().expect("just set"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_is_exact() {
        let mut s = State::new();
        s.put("a", &[1.5f64, -0.0, f64::NAN]);
        s.put::<u8>("empty", &[]);
        s.set_counter("step", -3);
        s.commit_local();
        let raw = s.encode_committed();
        let mut t = State::new();
        t.decode_into(&raw).unwrap();
        assert_eq!(t.encode_committed(), raw);
        assert_eq!(t.bytes("a"), s.bytes("a"));
        assert_eq!(t.counter("step"), -3);
        assert_eq!(t.serial(), 1);
        assert!(t.decode_into(&raw[..raw.len() - 1]).is_err());
    }
}
