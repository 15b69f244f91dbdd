//! A per-rank Chrome-trace / Perfetto timeline (`KOLO_TIMELINE=path` writes
//! `path.<rank>.json`): one row per tensor, with its NEGOTIATE, QUEUE,
//! COPY_IN, collective and COPY_OUT spans. Open it in chrome://tracing or
//! ui.perfetto.dev; `scripts/merge-timeline` merges the ranks into one file.
//! A fused allreduce reduces tensors of 1 KiB and more in their own memory
//! (its ALLREDUCE span's `in_place` counts them): for those, COPY_IN is only
//! the staging of the small ones, and COPY_OUT the division of an average.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Writes trace events as they happen; the JSON is closed on drop.
pub struct Timeline {
    out: BufWriter<File>,
    path: PathBuf,
    rank: usize,
    /// Instant of `t0_us` on the wall clock, so ranks' files line up.
    t0: Instant,
    t0_us: u64,
    lanes: HashMap<String, usize>,
}

impl Timeline {
    /// Create `<prefix>.<rank>.json`.
    pub fn create(prefix: &Path, rank: usize) -> Result<Timeline> {
        let mut path = prefix.as_os_str().to_owned();
        path.push(format!(".{rank}.json"));
        let path = PathBuf::from(path);
        let f = File::create(&path)
            .map_err(|e| Error::Io(format!("timeline {}: {e}", path.display())))?;
        let mut out = BufWriter::new(f);
        let t0_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_micros() as u64;
        let meta = serde_json::json!({
            "name": "process_name", "ph": "M", "pid": rank, "tid": 0,
            "args": {"name": format!("rank {rank}")}
        });
        write!(out, "{{\"traceEvents\":[\n{meta}")
            .map_err(|e| Error::Io(format!("timeline {}: {e}", path.display())))?;
        Ok(Timeline {
            out,
            path,
            rank,
            t0: Instant::now(),
            t0_us,
            lanes: HashMap::new(),
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn us(&self, t: Instant) -> u64 {
        self.t0_us + t.saturating_duration_since(self.t0).as_micros() as u64
    }

    fn lane(&mut self, tensor: &str) -> usize {
        if let Some(&l) = self.lanes.get(tensor) {
            return l;
        }
        let l = self.lanes.len() + 1;
        self.lanes.insert(tensor.to_string(), l);
        let meta = serde_json::json!({
            "name": "thread_name", "ph": "M", "pid": self.rank, "tid": l,
            "args": {"name": tensor}
        });
        // A timeline is diagnostics: a full disk must not fail training.
        let _ = write!(self.out, ",\n{meta}");
        l
    }

    /// One span `phase` of `tensor` from `from` to `to`, with optional details.
    pub fn span(
        &mut self,
        tensor: &str,
        phase: &str,
        from: Instant,
        to: Instant,
        args: Option<serde_json::Value>,
    ) {
        let tid = self.lane(tensor);
        let ts = self.us(from);
        let dur = self.us(to).saturating_sub(ts);
        let mut ev = serde_json::json!({
            "name": phase, "cat": "kolo", "ph": "X", "pid": self.rank, "tid": tid,
            "ts": ts, "dur": dur
        });
        if let Some(a) = args {
            ev["args"] = a;
        }
        let _ = write!(self.out, ",\n{ev}");
    }

    /// Push buffered events to the file (called when the engine goes idle).
    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        let _ = write!(self.out, "\n]}}\n");
        let _ = self.out.flush();
    }
}
