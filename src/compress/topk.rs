//! Top-k sparsification with error feedback.
//!
//! Per tensor and step: `c = g + residual`; select the k = density·n entries
//! of largest |c|; `residual = c` with the selected entries zeroed (so nothing
//! is ever dropped, only delayed); exchange the selected `(index u32, value)`
//! pairs with a variable-size allgather; every rank adds the contributions in
//! rank order, so every rank computes the same bits, and `Avg` divides by N.
//!
//! Selection estimates the threshold from a sample of ~1% of |c|, keeps every
//! entry at or above it in one pass, and adjusts when the count falls outside
//! [0.8k, 1.3k] (trimming to exactly k, or lowering the threshold);
//! [`Selection::Exact`] picks exactly k (ties to the lower index), for tests.
//! NaNs count as the largest magnitudes, so they are sent and reported rather
//! than kept in the residual forever.
//!
//! Small tensors (`min_numel`) and cases where the pairs would cost more bytes
//! than the dense ring, `k·pair·(N-1) ≥ 2(N-1)/N·4n`, go dense; the dense
//! call also sends (and clears) the residual.

use super::{invalid, CompressState, Stats};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::reduce::{self, ReduceOp};
use half::f16;

/// How the k entries are chosen.
///
/// ```
/// assert_eq!(kolo::compress::Selection::default(), kolo::compress::Selection::Sampled);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selection {
    /// Threshold estimated from a ~1% sample, one filter pass; lands in [0.8k, 1.3k].
    #[default]
    Sampled,
    /// Exactly the k largest |c| (ties to the lower index): a partial sort.
    Exact,
}

/// Options of [`super::Compression::TopK`].
///
/// ```
/// use kolo::compress::TopKConfig;
/// let c = TopKConfig { density: 0.001, warmup_steps: 100, ..TopKConfig::default() };
/// assert_eq!(c.k(1_000_000, 1000), 1000);
/// assert!(c.k(1_000_000, 0) > 1000); // warm-up starts denser
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopKConfig {
    /// Fraction of the entries sent per step, in (0, 1] (default 0.01).
    pub density: f64,
    /// Tensors with fewer elements go dense (default 1024).
    pub min_numel: usize,
    /// Keep what was not sent in the residual and add it to the next step
    /// (default true). Without it, unselected entries are dropped.
    pub error_feedback: bool,
    /// Send values as f16 (6-byte pairs) instead of f32 (8-byte pairs); the
    /// rounding error stays in the residual. Default false.
    pub half_values: bool,
    /// Threshold estimation or exact selection (default sampled).
    pub selection: Selection,
    /// Density warm-up: over the first `warmup_steps` calls the density falls
    /// exponentially from `warmup_density` to `density` (DGC). 0: off (default).
    pub warmup_steps: u64,
    /// Density of the first warm-up step (default 0.25).
    pub warmup_density: f64,
    /// DGC momentum correction with this momentum factor: accumulate the
    /// velocity `u = m·u + g` into the residual instead of `g`, and clear the
    /// momentum of the entries sent (momentum factor masking). The optimizer
    /// then applies the result without momentum of its own. Default `None`.
    pub momentum: Option<f32>,
}

impl Default for TopKConfig {
    fn default() -> TopKConfig {
        TopKConfig {
            density: 0.01,
            min_numel: 1024,
            error_feedback: true,
            half_values: false,
            selection: Selection::Sampled,
            warmup_steps: 0,
            warmup_density: 0.25,
            momentum: None,
        }
    }
}

impl TopKConfig {
    /// Density used at `step` (0-based), following the warm-up schedule.
    ///
    /// ```
    /// use kolo::compress::TopKConfig;
    /// let c = TopKConfig { density: 0.01, warmup_steps: 2, warmup_density: 0.25, ..Default::default() };
    /// assert_eq!(c.density_at(0), 0.25);
    /// assert!((c.density_at(1) - 0.05).abs() < 1e-12);
    /// assert_eq!(c.density_at(2), 0.01);
    /// ```
    pub fn density_at(&self, step: u64) -> f64 {
        if step >= self.warmup_steps || self.warmup_density <= self.density {
            return self.density;
        }
        let f = step as f64 / self.warmup_steps as f64;
        self.warmup_density * (self.density / self.warmup_density).powf(f)
    }

    /// Entries selected from a tensor of `n` at `step`: ⌈density·n⌉, at least 1.
    ///
    /// ```
    /// let c = kolo::compress::TopKConfig::default();
    /// assert_eq!(c.k(100_000, 0), 1000);
    /// assert_eq!(c.k(10, 0), 1);
    /// ```
    pub fn k(&self, n: usize, step: u64) -> usize {
        ((self.density_at(step) * n as f64).ceil() as usize).clamp(n.min(1), n)
    }

    /// Bytes of one (index, value) pair on the wire.
    ///
    /// ```
    /// assert_eq!(kolo::compress::TopKConfig::default().pair_bytes(), 8);
    /// ```
    pub fn pair_bytes(&self) -> usize {
        if self.half_values {
            6
        } else {
            8
        }
    }

    /// Whether a tensor of `n` with `k` selected entries goes dense on `nranks`
    /// ranks: below `min_numel`, or when the pairs cost at least the dense
    /// ring's bytes, `k·pair·(N-1) ≥ 2(N-1)/N·4n` (always for one rank).
    ///
    /// ```
    /// let c = kolo::compress::TopKConfig::default();
    /// assert!(c.goes_dense(1000, 10, 4)); // below min_numel
    /// assert!(!c.goes_dense(1 << 20, 10486, 4));
    /// assert!(c.goes_dense(1 << 20, 600_000, 4));
    /// ```
    pub fn goes_dense(&self, n: usize, k: usize, nranks: usize) -> bool {
        // Both sides times N: k·pair·N·(N-1) ≥ 8n(N-1).
        let (k, n, nr) = (k as u128, n as u128, nranks as u128);
        let pair = self.pair_bytes() as u128;
        n < self.min_numel as u128
            || k * pair * nr * nr.saturating_sub(1) >= 8 * n * nr.saturating_sub(1)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(format!("top-k density {} is not in (0, 1]", self.density));
        }
        if self.warmup_steps > 0 && !(self.warmup_density > 0.0 && self.warmup_density <= 1.0) {
            return Err(format!(
                "top-k warm-up density {} is not in (0, 1]",
                self.warmup_density
            ));
        }
        if let Some(m) = self.momentum {
            if !(0.0..1.0).contains(&m) {
                return Err(format!("top-k momentum {m} is not in [0, 1)"));
            }
        }
        Ok(())
    }
}

/// One rank's contribution of a top-k step: indices ascending, values as they
/// will be summed (f16-rounded when `half_values`).
///
/// ```
/// let s = kolo::compress::topk::Sparse::default();
/// assert!(s.indices.is_empty() && !s.non_finite);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sparse {
    /// Selected entries, ascending.
    pub indices: Vec<u32>,
    /// Their values.
    pub values: Vec<f32>,
    /// `c` held a NaN or an infinity.
    pub non_finite: bool,
}

/// Sort key of |x|: its bits without the sign (monotone in |x|; NaNs largest).
#[inline(always)]
fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `k` largest of `cand` (indices into `c`) by |c|, ties to the lower
/// index, ascending.
fn top_of(c: &[f32], mut cand: Vec<u32>, k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, |&a, &b| {
            key(c[b as usize]).cmp(&key(c[a as usize])).then(a.cmp(&b))
        });
        cand.truncate(k);
    }
    cand.sort_unstable();
    cand
}

/// Exactly the `k` entries of largest |c| (ties to the lower index), ascending.
///
/// ```
/// let c = [0.5f32, -3.0, 2.0, 0.0, 3.0];
/// assert_eq!(kolo::compress::topk::select_exact(&c, 2), vec![1, 4]);
/// ```
pub fn select_exact(c: &[f32], k: usize) -> Vec<u32> {
    top_of(c, (0..c.len() as u32).collect(), k.min(c.len()))
}

/// Elements sampled for the threshold: 1% of the tensor, at least this many.
const SAMPLE_MIN: usize = 4096;

/// Entries at or above a threshold estimated from a sample of ~1% of |c|
/// (positions drawn from `seed`); ascending. Lands in [0.8k, 1.3k]: a count
/// above is trimmed to exactly the k largest, a count below retries with a
/// lower threshold and finally selects exactly. Every entry selected has
/// |c| at least that of every entry not selected.
///
/// ```
/// let c: Vec<f32> = (0..100_000).map(|i| ((i * 7919) % 100_003) as f32).collect();
/// let s = kolo::compress::topk::select_sampled(&c, 1000, 1);
/// assert!((800..=1300).contains(&s.len()));
/// ```
pub fn select_sampled(c: &[f32], k: usize, seed: u64) -> Vec<u32> {
    let n = c.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u32).collect();
    }
    let s = (n / 100).max(SAMPLE_MIN).min(n);
    let mut sample: Vec<u32> = (0..s as u64)
        .map(|j| key(c[(mix(seed ^ j.wrapping_mul(0x2545_f491_4f6c_dd1d)) % n as u64) as usize]))
        .collect();
    let (lo, hi) = ((k * 4).div_ceil(5), k * 13 / 10);
    // The q-th largest sample key estimates the k-th largest |c|.
    let mut q = (k * s).div_ceil(n).clamp(1, s);
    for _ in 0..4 {
        let (_, &mut t, _) = sample.select_nth_unstable_by(q - 1, |a, b| b.cmp(a));
        let cand = filter(c, t);
        if cand.len() > hi {
            return top_of(c, cand, k);
        }
        if cand.len() >= lo {
            return cand;
        }
        if q == s {
            break;
        }
        // Too few: aim for k with some margin, at least twice as deep.
        let want = (q as f64 * k as f64 * 1.1 / cand.len().max(1) as f64).ceil() as usize;
        q = want.max(2 * q).min(s);
    }
    select_exact(c, k)
}

/// Indices of the entries with `key(c[i]) >= t`, ascending.
fn filter(c: &[f32], t: u32) -> Vec<u32> {
    let mut out = Vec::new();
    const W: usize = 16;
    for (ci, ch) in c.chunks(W).enumerate() {
        // A branch-free test of the whole chunk first: most chunks hold nothing.
        if ch.iter().fold(false, |a, &x| a | (key(x) >= t)) {
            for (j, &x) in ch.iter().enumerate() {
                if key(x) >= t {
                    out.push((ci * W + j) as u32);
                }
            }
        }
    }
    out
}

fn state_len_check(state: &CompressState, n: usize) -> std::result::Result<(), String> {
    for (what, v) in [("residual", &state.residual), ("momentum", &state.momentum)] {
        if !v.is_empty() && v.len() != n {
            return Err(format!(
                "top-k state holds a {what} of {} elements but the tensor has {n} \
                 (use one CompressState per tensor)",
                v.len()
            ));
        }
    }
    Ok(())
}

/// Apply momentum correction: `u = m·u + g`; returns whether it is on.
fn momentum(cfg: &TopKConfig, state: &mut CompressState, grad: &[f32]) -> bool {
    let Some(m) = cfg.momentum else {
        return false;
    };
    if state.momentum.is_empty() {
        state.momentum = vec![0.0; grad.len()];
    }
    for (u, &g) in state.momentum.iter_mut().zip(grad) {
        *u = m * *u + g;
    }
    true
}

/// One rank's half of a top-k step, without communication: fold `grad` into
/// the residual (`c = residual + g`, or `+ u` with momentum correction),
/// select `k` entries of `c` (per `cfg.selection`), and leave the rest in the
/// residual (including the f16 rounding error with `half_values`). Counts a
/// step of `state`. Without error feedback, `c = g` and nothing is kept.
///
/// ```
/// use kolo::compress::{topk, CompressState, Selection, TopKConfig};
/// let cfg = TopKConfig { selection: Selection::Exact, ..TopKConfig::default() };
/// let mut st = CompressState::new();
/// let s = topk::sparsify(&cfg, &mut st, &[0.1, -2.0, 0.3], 1)?;
/// assert_eq!((s.indices.as_slice(), s.values.as_slice()), (&[1u32][..], &[-2.0f32][..]));
/// assert_eq!(st.residual(), &[0.1, 0.0, 0.3]);
/// # Ok::<(), String>(())
/// ```
pub fn sparsify(
    cfg: &TopKConfig,
    state: &mut CompressState,
    grad: &[f32],
    k: usize,
) -> std::result::Result<Sparse, String> {
    cfg.check()?;
    state_len_check(state, grad.len())?;
    let n = grad.len();
    let seed = mix(state.step ^ (n as u64) << 32);
    state.step += 1;
    let with_u = momentum(cfg, state, grad);
    let mut tmp = Vec::new();
    let mut non_finite = false;
    let c: &mut [f32] = if cfg.error_feedback {
        if state.residual.is_empty() {
            state.residual = vec![0.0; n];
        }
        let add: &[f32] = if with_u { &state.momentum } else { grad };
        // One pass: fold, and look for NaN/inf on the way (branch-free per block).
        for (rs, gs) in state.residual.chunks_mut(4096).zip(add.chunks(4096)) {
            let mut bad = 0u32;
            for (r, &g) in rs.iter_mut().zip(gs) {
                *r += g;
                bad |= u32::from(r.to_bits() & 0x7f80_0000 == 0x7f80_0000);
            }
            non_finite |= bad != 0;
        }
        &mut state.residual
    } else {
        tmp.extend_from_slice(if with_u { &state.momentum } else { grad });
        non_finite = super::any_non_finite(&tmp);
        &mut tmp
    };
    let indices = match cfg.selection {
        Selection::Exact => select_exact(c, k),
        Selection::Sampled => select_sampled(c, k, seed),
    };
    let mut values = Vec::with_capacity(indices.len());
    for &i in &indices {
        let x = c[i as usize];
        let v = if cfg.half_values {
            f16::from_f32(x).to_f32()
        } else {
            x
        };
        values.push(v);
        // What was not sent stays behind (the f16 rounding error, or nothing).
        // An overflow to inf leaves -inf here: reported via `non_finite`.
        c[i as usize] = if v == x || !v.is_finite() { 0.0 } else { x - v };
    }
    if with_u {
        for &i in &indices {
            state.momentum[i as usize] = 0.0;
        }
    }
    Ok(Sparse {
        indices,
        values,
        non_finite,
    })
}

/// Append `s` as little-endian `(u32 index, f32 or f16 value)` pairs.
///
/// ```
/// use kolo::compress::topk::{encode_pairs, sum_pairs, Sparse};
/// let s = Sparse { indices: vec![2], values: vec![1.5], non_finite: false };
/// let mut b = Vec::new();
/// encode_pairs(&s, false, &mut b);
/// let mut out = [0f32; 3];
/// sum_pairs(&b, false, &mut out).unwrap();
/// assert_eq!(out, [0.0, 0.0, 1.5]);
/// ```
pub fn encode_pairs(s: &Sparse, half_values: bool, out: &mut Vec<u8>) {
    out.reserve(s.indices.len() * if half_values { 6 } else { 8 });
    for (&i, &v) in s.indices.iter().zip(&s.values) {
        out.extend_from_slice(&i.to_le_bytes());
        if half_values {
            out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        } else {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Add encoded pairs into `out` in order (`out[i] += v`). An index outside
/// `out` or a partial pair is an error, not a panic.
///
/// ```
/// let mut out = [0f32; 1];
/// assert!(kolo::compress::topk::sum_pairs(&[5, 0, 0, 0, 0, 0, 128, 63], false, &mut out).is_err());
/// ```
pub fn sum_pairs(
    pairs: &[u8],
    half_values: bool,
    out: &mut [f32],
) -> std::result::Result<(), String> {
    let pb = if half_values { 6 } else { 8 };
    if pairs.len() % pb != 0 {
        return Err(format!(
            "{} bytes is not a whole number of {pb}-byte pairs",
            pairs.len()
        ));
    }
    for p in pairs.chunks_exact(pb) {
        let i = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
        let v = if half_values {
            f16::from_le_bytes([p[4], p[5]]).to_f32()
        } else {
            f32::from_le_bytes([p[4], p[5], p[6], p[7]])
        };
        match out.get_mut(i) {
            Some(o) => *o += v,
            None => return Err(format!("pair index {i} outside a tensor of {}", out.len())),
        }
    }
    Ok(())
}

/// The top-k compressed allreduce (see the module docs).
pub(crate) fn allreduce(
    comm: &Communicator,
    buf: &mut [f32],
    op: ReduceOp,
    cfg: &TopKConfig,
    state: &mut CompressState,
) -> Result<Stats> {
    let (n, nr) = (buf.len(), comm.size());
    let local = cfg
        .check()
        .and_then(|()| state_len_check(state, n))
        .and_then(|()| match op {
            ReduceOp::Sum | ReduceOp::Avg => Ok(()),
            _ => Err(format!("top-k compression reduces by sum or avg, not {op}")),
        });
    if let Err(msg) = local {
        return Err(invalid(comm, msg));
    }
    let k = cfg.k(n, state.step);
    if cfg.goes_dense(n, k, nr) {
        return dense(comm, buf, op, cfg, state);
    }
    let sp = sparsify(cfg, state, buf, k).map_err(|m| invalid(comm, m))?;
    let mut mine = Vec::new();
    encode_pairs(&sp, cfg.half_values, &mut mine);
    // Pair counts and tensor lengths: every rank validates the same numbers.
    let mut meta = vec![0i64; 2 * nr];
    comm.allgather(&[sp.indices.len() as i64, n as i64], &mut meta)?;
    for r in 0..nr {
        let (cnt, len) = (meta[2 * r], meta[2 * r + 1]);
        if len != n as i64 || cnt < 0 || cnt > len {
            return Err(Error::InvalidArgument(format!(
                "rank {}: allreduce_compressed: rank {r} sent {cnt} pairs for a tensor of \
                 {len} elements, this rank has {n}",
                comm.rank()
            )));
        }
    }
    let pb = cfg.pair_bytes();
    let counts: Vec<usize> = (0..nr).map(|r| meta[2 * r] as usize * pb).collect();
    let mut all = vec![0u8; counts.iter().sum()];
    comm.allgatherv(&mine, &mut all, &counts)?;
    buf.fill(0.0);
    // Rank order: the gathered buffer is laid out by rank.
    sum_pairs(&all, cfg.half_values, buf).map_err(|m| {
        Error::InvalidArgument(format!("rank {}: allreduce_compressed: {m}", comm.rank()))
    })?;
    if op == ReduceOp::Avg {
        reduce::divide(buf, nr);
    }
    // Only the entries the pairs touched can be non-zero, let alone non-finite.
    let non_finite = all
        .chunks_exact(pb)
        .any(|p| !buf[u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize].is_finite());
    Ok(Stats {
        nnz: sp.indices.len(),
        nnz_total: all.len() / pb,
        fell_back_to_dense: false,
        non_finite: sp.non_finite || non_finite,
        ..Stats::default()
    })
}

/// Dense fallback: sends `g` plus the residual (and the momentum), then clears
/// the residual; the momentum is kept (dense momentum SGD).
fn dense(
    comm: &Communicator,
    buf: &mut [f32],
    op: ReduceOp,
    cfg: &TopKConfig,
    state: &mut CompressState,
) -> Result<Stats> {
    state.step += 1;
    if cfg.momentum.is_some() {
        momentum(cfg, state, buf);
        buf.copy_from_slice(&state.momentum);
    }
    if cfg.error_feedback && !state.residual.is_empty() {
        for (b, r) in buf.iter_mut().zip(state.residual.iter_mut()) {
            *b += *r;
            *r = 0.0;
        }
    }
    let non_finite = super::any_non_finite(buf);
    comm.allreduce(buf, op)?;
    Ok(Stats {
        nnz: buf.len(),
        nnz_total: buf.len() * comm.size(),
        fell_back_to_dense: true,
        non_finite: non_finite || super::any_non_finite(buf),
        ..Stats::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn density_schedule_is_monotone_and_ends_at_target() {
        let c = TopKConfig {
            warmup_steps: 5,
            ..TopKConfig::default()
        };
        let d: Vec<f64> = (0..7).map(|s| c.density_at(s)).collect();
        assert_eq!(d[0], 0.25);
        assert!(d.windows(2).all(|w| w[1] <= w[0]));
        assert_eq!(d[5], 0.01);
        assert_eq!(d[6], 0.01);
    }

    #[test]
    fn dense_rule_matches_the_byte_formula() {
        let c = TopKConfig::default();
        for nr in 1..9usize {
            for n in [1024usize, 4096, 100_000] {
                for k in [1usize, n / 100, n / 4, n / 2, n] {
                    // k·8·(N-1) ≥ 2(N-1)/N·4n, in exact rationals.
                    let lhs = (k * 8 * (nr - 1)) as f64;
                    let rhs = 2.0 * (nr as f64 - 1.0) / nr as f64 * 4.0 * n as f64;
                    assert_eq!(c.goes_dense(n, k, nr), lhs >= rhs, "n={n} k={k} N={nr}");
                }
            }
        }
        assert!(c.goes_dense(1023, 1, 4));
    }

    #[test]
    fn nan_is_selected_first() {
        let c = [1.0f32, f32::NAN, -5.0, f32::INFINITY];
        assert_eq!(select_exact(&c, 2), vec![1, 3]);
    }

    #[test]
    fn half_values_keep_the_rounding_error() {
        let cfg = TopKConfig {
            half_values: true,
            selection: Selection::Exact,
            ..TopKConfig::default()
        };
        let mut st = CompressState::new();
        let x = 1.0f32 + 1e-4;
        let s = sparsify(&cfg, &mut st, &[x, 0.0], 1).unwrap();
        assert_eq!(s.values, vec![1.0]);
        assert_eq!(st.residual()[0], x - 1.0);
    }
}
