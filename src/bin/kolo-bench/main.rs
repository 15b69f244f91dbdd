//! `kolo-bench`: collective benchmark in the style of nccl-tests' `all_reduce_perf`.
//!
//! Run it under a launcher (`kolorun -np 4 kolo-bench -b 8 -e 64M -f 4`); every rank runs
//! the same sizes, rank 0 prints the table. Per size: one checked call (inputs filled from
//! (rank, index), the expected result computed here serially and compared bitwise), then
//! warmup calls, a barrier, and timed back-to-back calls.
//!
//! Output columns: `size(B) count(elements) type redop time(us) algbw(GB/s) busbw(GB/s)
//! p50(us) iters #wrong`. These are the nccl-tests columns plus the baselines' `p50(us)` and
//! `iters`. `#wrong` is last, where the baseline tables have their `check` column, so
//! `/work/shared/baselines/compare_table.py` parses the rows (10 fields, time at 5, p50 at 8,
//! iters at 9).
//!
//! With `--compression none|fp16|bf16|topk[:DENSITY]` (float allreduce only), each call is
//! `Communicator::allreduce_compressed` on one tensor whose compression state lives across
//! the calls of a size, its input restored (untimed) before every call, and the rows get
//! two more columns: `wire(B)`, bytes sent per rank per call counted at the socket (mean
//! over ranks), and `ratio`, the dense ring's payload bytes over `wire(B)`. Inputs are then
//! multiples of 2^-20 in [-1, 1]; `#wrong` counts, for `none`, elements that differ from the
//! exact sum, for fp16/bf16, elements off the exact sum by more than the format allows
//! (N roundings), and for top-k, ranks whose result is not bitwise equal to rank 0's.
//!
//! With `--json`, rank 0 prints only JSON instead: one object per size on its own line
//! (`coll algo dtype op nranks bytes count time_us p50_us algbw_gbps busbw_gbps iters wrong`)
//! and a last summary object (`"summary": true`, with the totals of the footer).

mod fusion;

use half::{bf16, f16};
use kolo::algo::cost::Algo;
use kolo::compress::{dense_ring_bytes, CompressState, Compression};
use kolo::{Communicator, DType, Element, ReduceOp};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "\
usage: kolo-bench [options]   (run under a launcher, e.g. kolorun -np 4 kolo-bench ...)
  -b, --minbytes N       smallest size in bytes (suffix K, M, G = 1024^k; default 8)
  -e, --maxbytes N       largest size in bytes (default 64M)
  -f, --stepfactor N     multiply the size by N between rows (integer >= 2; default 2)
  -n, --iters N          timed calls per size (default auto: 100 up to 64K, 20 up to 4M,
                         10 up to 32M, 5 above)
  -w, --warmup_iters N   untimed calls per size before timing (default 5)
  -c, --check 0|1        check the result of one call per size (default 1)
  -d, --datatype T       float, double, half, bfloat16, int32, int64, uint8 (default float)
  -o, --op OP            sum, prod, min, max, avg (default sum)
      --coll C           allreduce, allgather, reducescatter, broadcast, alltoall
                         (default allreduce)
  -r, --root R           root rank of broadcast (default 0)
  -a, --algo A           allreduce algorithm: auto, ring, tree, rhd, rd, binomial
                         (default auto: KOLO_ALGO, else chosen by size)
      --compression C    none, fp16, bf16, topk or topk:DENSITY: compressed float
                         allreduce; adds the columns wire(B) (bytes sent per rank per
                         call) and ratio (dense ring bytes / wire bytes)
      --json             print only JSON lines: one object per size, then a summary object
      --fusion SET       instead of the size sweep: a training step's gradients (SET =
                         resnet50: ResNet-50's 161 tensors, 25.6 M floats; small: 1000
                         tensors of 4 KiB), reduced per tensor, by the engine (each rank
                         in its own random order) and as one flat buffer; prints
                         mode=<m> step_ms=<t> busbw=<b> per mode
      --steps N          steps per mode with --fusion (default 20)
  -h, --help             print this help
Sizes are per-rank buffer sizes as in nccl-tests: the allreduce/broadcast buffer, the
gathered buffer of allgather, the input of reducescatter, the send buffer of alltoall.
Exit status: 0 ok, 1 library error or wrong results, 2 bad arguments.";

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    AllToAll,
}

impl Coll {
    const ALL: [Coll; 5] = [
        Coll::AllReduce,
        Coll::AllGather,
        Coll::ReduceScatter,
        Coll::Broadcast,
        Coll::AllToAll,
    ];

    fn parse(s: &str) -> Option<Coll> {
        let s = s.to_ascii_lowercase().replace(['_', '-'], "");
        Coll::ALL.into_iter().find(|c| c.name() == s)
    }

    fn name(self) -> &'static str {
        match self {
            Coll::AllReduce => "allreduce",
            Coll::AllGather => "allgather",
            Coll::ReduceScatter => "reducescatter",
            Coll::Broadcast => "broadcast",
            Coll::AllToAll => "alltoall",
        }
    }

    /// nccl-tests' bus bandwidth factor for `n` ranks.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Coll::AllReduce => 2.0 * (n - 1.0) / n,
            Coll::AllGather | Coll::ReduceScatter | Coll::AllToAll => (n - 1.0) / n,
            Coll::Broadcast => 1.0,
        }
    }

    /// Whether the reduction operator matters.
    fn reduces(self) -> bool {
        matches!(self, Coll::AllReduce | Coll::ReduceScatter)
    }

    /// Whether the buffer is split into one block per rank (count must divide by n).
    fn splits(self) -> bool {
        matches!(self, Coll::AllGather | Coll::ReduceScatter | Coll::AllToAll)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    min_bytes: u64,
    max_bytes: u64,
    factor: u64,
    /// `None`: choose per size ([`auto_iters`]).
    iters: Option<usize>,
    warmup: usize,
    check: bool,
    dtype: DType,
    op: ReduceOp,
    coll: Coll,
    root: usize,
    /// Allreduce algorithm; `None`: the communicator's choice.
    algo: Option<Algo>,
    /// Print JSON lines instead of the table.
    json: bool,
    /// Run the fusion benchmark on this gradient set instead of the sweep.
    fusion: Option<fusion::Set>,
    /// Steps per mode of the fusion benchmark.
    steps: usize,
    /// `--compression`: compressed f32 allreduce, with the wire columns.
    compression: Option<Compression>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            min_bytes: 8,
            max_bytes: 64 << 20,
            factor: 2,
            iters: None,
            warmup: 5,
            check: true,
            dtype: DType::F32,
            op: ReduceOp::Sum,
            coll: Coll::AllReduce,
            algo: None,
            root: 0,
            json: false,
            fusion: None,
            steps: 20,
            compression: None,
        }
    }
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Run(Opts),
    Help,
}

/// Parse a byte count with an optional K/M/G suffix (powers of 1024), e.g. `256M`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} is not a size (a number with optional K, M or G)"
        ));
    }
    let v: u64 = digits.parse().map_err(|_| format!("{s:?} is too large"))?;
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{flag}: {v:?} is not a non-negative integer"))
}

fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut o = Opts::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        i += 1;
        if a == "-h" || a == "--help" {
            return Ok(Parsed::Help);
        }
        if a == "--json" {
            o.json = true;
            continue;
        }
        // Split into (canonical flag, inline value) for -bVAL, --long=VAL, and -b VAL forms.
        let (flag, inline): (&str, Option<&str>) = if let Some(long) = a.strip_prefix("--") {
            let (name, val) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            let short = match name {
                "minbytes" => "b",
                "maxbytes" => "e",
                "stepfactor" => "f",
                "iters" => "n",
                "warmup_iters" | "warmup" => "w",
                "check" => "c",
                "datatype" | "dtype" => "d",
                "op" => "o",
                "coll" => "coll",
                "root" => "r",
                "algo" => "a",
                "fusion" => "fusion",
                "steps" => "steps",
                "compression" => "compression",
                _ => return Err(format!("unknown option {a:?}")),
            };
            (short, val)
        } else if let Some(short) = a.strip_prefix('-') {
            let mut ch = short.chars();
            match ch.next() {
                Some(c @ ('b' | 'e' | 'f' | 'n' | 'w' | 'c' | 'd' | 'o' | 'r' | 'a')) => {
                    let rest = ch.as_str();
                    let flag = &short[..c.len_utf8()];
                    (flag, if rest.is_empty() { None } else { Some(rest) })
                }
                _ => return Err(format!("unknown option {a:?}")),
            }
        } else {
            return Err(format!("unexpected argument {a:?}"));
        };
        let val = match inline {
            Some(v) => v.to_string(),
            None => {
                let v = args.get(i).ok_or_else(|| format!("{a} needs a value"))?;
                i += 1;
                v.clone()
            }
        };
        let shown = if flag.len() == 1 {
            format!("-{flag}")
        } else {
            format!("--{flag}")
        };
        match flag {
            "b" => o.min_bytes = parse_size(&val).map_err(|e| format!("{shown}: {e}"))?,
            "e" => o.max_bytes = parse_size(&val).map_err(|e| format!("{shown}: {e}"))?,
            "f" => o.factor = parse_num(&shown, &val)?,
            "n" => o.iters = Some(parse_num(&shown, &val)?),
            "w" => o.warmup = parse_num(&shown, &val)?,
            "c" => {
                o.check = match val.trim() {
                    "0" => false,
                    "1" => true,
                    _ => return Err(format!("{shown}: {val:?} is not 0 or 1")),
                }
            }
            "d" => {
                o.dtype = DType::parse(val.trim()).ok_or_else(|| {
                    format!(
                        "{shown}: unknown datatype {val:?} \
                         (float, double, half, bfloat16, int32, int64, uint8)"
                    )
                })?
            }
            "o" => {
                o.op = ReduceOp::parse(&val.trim().to_ascii_lowercase()).ok_or_else(|| {
                    format!("{shown}: unknown op {val:?} (sum, prod, min, max, avg)")
                })?
            }
            "coll" => {
                o.coll = Coll::parse(val.trim()).ok_or_else(|| {
                    format!(
                        "{shown}: unknown collective {val:?} \
                         (allreduce, allgather, reducescatter, broadcast, alltoall)"
                    )
                })?
            }
            "r" => o.root = parse_num(&shown, &val)?,
            "fusion" => {
                o.fusion = Some(fusion::Set::parse(val.trim()).ok_or_else(|| {
                    format!("{shown}: unknown gradient set {val:?} (resnet50, small)")
                })?)
            }
            "steps" => o.steps = parse_num(&shown, &val)?,
            "compression" => {
                o.compression = Some(Compression::parse(&val).ok_or_else(|| {
                    format!(
                        "{shown}: unknown compression {val:?} \
                         (none, fp16, bf16, topk or topk:DENSITY with DENSITY in (0, 1])"
                    )
                })?)
            }
            "a" => {
                o.algo = match val.trim() {
                    "auto" => None,
                    a => Some(Algo::parse(a).ok_or_else(|| {
                        format!(
                        "{shown}: unknown algorithm {val:?} (auto, ring, tree, rhd, rd, binomial)"
                    )
                    })?),
                }
            }
            _ => unreachable!("flag table above"),
        }
    }
    if o.min_bytes == 0 {
        return Err("-b: the smallest size must be at least 1 byte".into());
    }
    if o.min_bytes > o.max_bytes {
        return Err(format!(
            "-b {} is larger than -e {}",
            o.min_bytes, o.max_bytes
        ));
    }
    if o.factor < 2 {
        return Err(format!("-f: factor {} must be at least 2", o.factor));
    }
    if o.steps == 0 {
        return Err("--steps: need at least one step".into());
    }
    if o.iters == Some(0) {
        return Err("-n: need at least one timed iteration".into());
    }
    if o.compression.is_some() && (o.coll != Coll::AllReduce || o.dtype != DType::F32) {
        return Err(
            "--compression: only for the float allreduce (-d float --coll allreduce)".into(),
        );
    }
    Ok(Parsed::Run(o))
}

/// Timed iterations when `-n` is not given (the baselines' schedule).
fn auto_iters(bytes: u64) -> usize {
    match bytes {
        b if b <= 64 << 10 => 100,
        b if b <= 4 << 20 => 20,
        b if b <= 32 << 20 => 10,
        _ => 5,
    }
}

/// The row sizes in bytes: min, min*f, ... up to max, each rounded down to a whole number of
/// elements (times `n` blocks for the collectives that split the buffer), at least one unit.
fn row_sizes(o: &Opts, n: usize) -> Vec<u64> {
    let unit = o.dtype.size() as u64 * if o.coll.splits() { n.max(1) as u64 } else { 1 };
    let mut out: Vec<u64> = Vec::new();
    let mut s = o.min_bytes;
    loop {
        let b = (s / unit).max(1) * unit;
        if out.last() != Some(&b) {
            out.push(b);
        }
        match s.checked_mul(o.factor) {
            Some(next) if next <= o.max_bytes => s = next,
            _ => break,
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Row {
    bytes: u64,
    count: u64,
    dtype: DType,
    /// `None` for collectives without an operator (printed `none`, as nccl-tests does).
    op: Option<ReduceOp>,
    /// Mean per call, max over ranks.
    time_us: f64,
    /// Median call, max over ranks.
    p50_us: f64,
    iters: usize,
    /// Wrong elements summed over ranks; `None` when not checked.
    wrong: Option<u64>,
    bus_factor: f64,
    /// With `--compression`: bytes sent per rank per call and the dense ring's payload.
    wire: Option<(f64, u64)>,
}

impl Row {
    fn algbw(&self) -> f64 {
        if self.time_us > 0.0 {
            self.bytes as f64 / self.time_us / 1e3
        } else {
            0.0
        }
    }
    fn busbw(&self) -> f64 {
        self.algbw() * self.bus_factor
    }
    /// Dense ring bytes over wire bytes (`None` for one rank, which sends nothing).
    fn ratio(&self) -> Option<f64> {
        self.wire
            .and_then(|(w, dense)| (w > 0.0 && dense > 0).then(|| dense as f64 / w))
    }
}

fn header_lines(o: &Opts, n: usize, init_ms: f64) -> String {
    let iters = match o.iters {
        Some(i) => i.to_string(),
        None => "auto".to_string(),
    };
    let op = if o.coll.reduces() {
        o.op.name()
    } else {
        "none"
    };
    let root = if o.coll == Coll::Broadcast {
        o.root.to_string()
    } else {
        "-".to_string()
    };
    format!(
        "# nThread 1 nranks={n} minBytes {} maxBytes {} step: {}(factor) warmup iters: {} \
         iters: {iters} validation: {} coll: {} type: {} redop: {op} root: {root} algo: {}{} kolo {}\n\
         # init: Communicator::from_env {init_ms:.1} ms (max over ranks)\n{}",
        o.min_bytes,
        o.max_bytes,
        o.factor,
        o.warmup,
        u8::from(o.check),
        o.coll.name(),
        o.dtype.name(),
        algo_name(o),
        o.compression
            .as_ref()
            .map_or(String::new(), |c| format!(" compression: {c}")),
        kolo::VERSION,
        column_header(o.compression.is_some())
    )
}

/// The cost model `auto` chose by and where its choice changes, as a comment line.
fn model_line(comm: &Communicator) -> String {
    let m = comm.cost_model();
    let c = comm.auto_crossovers();
    let runs: Vec<String> = c
        .iter()
        .enumerate()
        .map(|(i, (first, a))| match (c.get(i + 1), *first) {
            (Some((next, _)), _) => format!("{} up to {}", a.name(), human_bytes(next - 1)),
            (None, 1) => format!("{} at every size", a.name()),
            (None, f) => format!("{} above {}", a.name(), human_bytes(f - 1)),
        })
        .collect();
    format!(
        "# cost model: alpha {:.1} us, beta {:.2} GB/s, gamma {:.2} GB/s; auto allreduce: {}",
        m.alpha_s * 1e6,
        1e-9 / m.beta_s_per_byte,
        1e-9 / m.gamma_s_per_byte,
        runs.join(", ")
    )
}

fn human_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn column_header(wire: bool) -> String {
    let extra = if wire {
        format!(" {:>12} {:>8}", "wire(B)", "ratio")
    } else {
        String::new()
    };
    format!(
        "# {:>12} {:>15} {:>8} {:>6} {:>12} {:>11} {:>11} {:>10} {:>6} {:>6}{extra}",
        "size(B)",
        "count(elements)",
        "type",
        "redop",
        "time(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        "p50(us)",
        "iters",
        "#wrong"
    )
}

fn format_row(r: &Row) -> String {
    let wrong = match r.wrong {
        Some(w) => w.to_string(),
        None => "N/A".to_string(),
    };
    let extra = match (r.wire, r.ratio()) {
        (Some((w, _)), Some(q)) => format!(" {w:>12.0} {q:>8.2}"),
        (Some((w, _)), None) => format!(" {w:>12.0} {:>8}", "-"),
        _ => String::new(),
    };
    format!(
        "{:>14} {:>15} {:>8} {:>6} {:>12.2} {:>11.3} {:>11.3} {:>10.2} {:>6} {:>6}{extra}",
        r.bytes,
        r.count,
        r.dtype.name(),
        r.op.map_or("none", ReduceOp::name),
        r.time_us,
        r.algbw(),
        r.busbw(),
        r.p50_us,
        r.iters,
        wrong
    )
}

fn footer_lines(rows: &[Row], wall_s: f64) -> String {
    let wrong: u64 = rows.iter().filter_map(|r| r.wrong).sum();
    let avg = if rows.is_empty() {
        0.0
    } else {
        rows.iter().map(Row::busbw).sum::<f64>() / rows.len() as f64
    };
    format!(
        "# Out of bounds values : {wrong}\n# Avg bus bandwidth : {avg:.3}\n\
         # wall time for whole run: {wall_s:.1} s"
    )
}

/// One size as a JSON line (`--json`).
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    coll: &'a str,
    algo: &'a str,
    dtype: &'a str,
    /// `"none"` for collectives without an operator, as in the table.
    op: &'a str,
    nranks: usize,
    bytes: u64,
    count: u64,
    time_us: f64,
    p50_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    iters: usize,
    /// `null` when not checked (`-c 0`).
    wrong: Option<u64>,
    /// With `--compression`: its name, bytes sent per rank per call, and the ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    compression: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wire_bytes: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

/// The last JSON line (`--json`): what the table's header and footer say.
#[derive(Debug, Serialize)]
struct JsonSummary<'a> {
    summary: bool,
    coll: &'a str,
    algo: &'a str,
    dtype: &'a str,
    op: &'a str,
    nranks: usize,
    rows: usize,
    checked: bool,
    /// Wrong elements over all sizes and ranks (0 when not checked).
    wrong: u64,
    avg_busbw_gbps: f64,
    init_ms: f64,
    wall_s: f64,
    kolo_version: &'a str,
}

fn algo_name(o: &Opts) -> &'static str {
    o.algo.map_or("auto", Algo::name)
}

fn json_row(o: &Opts, n: usize, r: &Row) -> String {
    serde_json::to_string(&JsonRow {
        coll: o.coll.name(),
        algo: algo_name(o),
        dtype: r.dtype.name(),
        op: r.op.map_or("none", ReduceOp::name),
        nranks: n,
        bytes: r.bytes,
        count: r.count,
        time_us: r.time_us,
        p50_us: r.p50_us,
        algbw_gbps: r.algbw(),
        busbw_gbps: r.busbw(),
        iters: r.iters,
        wrong: r.wrong,
        compression: o.compression.as_ref().map(|c| c.to_string()),
        wire_bytes: r.wire.map(|w| w.0),
        ratio: r.ratio(),
    })
    .expect("a struct of numbers and strings serializes")
}

fn json_summary(o: &Opts, n: usize, rows: &[Row], init_ms: f64, wall_s: f64) -> String {
    let avg = if rows.is_empty() {
        0.0
    } else {
        rows.iter().map(Row::busbw).sum::<f64>() / rows.len() as f64
    };
    serde_json::to_string(&JsonSummary {
        summary: true,
        coll: o.coll.name(),
        algo: algo_name(o),
        dtype: o.dtype.name(),
        op: if o.coll.reduces() {
            o.op.name()
        } else {
            "none"
        },
        nranks: n,
        rows: rows.len(),
        checked: o.check,
        wrong: rows.iter().filter_map(|r| r.wrong).sum(),
        avg_busbw_gbps: avg,
        init_ms,
        wall_s,
        kolo_version: kolo::VERSION,
    })
    .expect("a struct of numbers and strings serializes")
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic data and the expected results
// ---------------------------------------------------------------------------------------

/// Element operations the checker needs; all exact for the values [`Gen`] produces.
trait Val: Element {
    const FLOAT: bool;
    /// Largest magnitude every partial result may reach and still be exact.
    const EXACT: i64;
    /// Largest power of two that is finite (for products of +-1, +-2).
    const MAX_POW2: usize;
    /// Exact for floats within `EXACT`; integers keep the low bits (wrapping).
    fn from_i64(v: i64) -> Self;
    /// `a (op) b`, wrapping for integers; `Avg` adds (the division comes last).
    fn reduce(a: Self, b: Self, op: ReduceOp) -> Self;
    fn div_n(self, n: usize) -> Self;
    fn bits(self) -> u64;
}

macro_rules! int_val {
    ($t:ty, $exact:expr) => {
        impl Val for $t {
            const FLOAT: bool = false;
            const EXACT: i64 = $exact;
            const MAX_POW2: usize = 0;
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            fn reduce(a: Self, b: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            fn div_n(self, n: usize) -> Self {
                (self as i64 / n as i64) as $t
            }
            fn bits(self) -> u64 {
                self as u64
            }
        }
    };
}
int_val!(u8, 255);
int_val!(i32, i32::MAX as i64);
int_val!(i64, 1 << 62);

macro_rules! float_val {
    ($t:ty, $exact:expr, $pow2:expr, $to:expr, $from:expr, $bits:expr) => {
        impl Val for $t {
            const FLOAT: bool = true;
            const EXACT: i64 = $exact;
            const MAX_POW2: usize = $pow2;
            fn from_i64(v: i64) -> Self {
                $from(v as f64)
            }
            fn reduce(a: Self, b: Self, op: ReduceOp) -> Self {
                let (x, y): (f64, f64) = ($to(a), $to(b));
                $from(match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                })
            }
            fn div_n(self, n: usize) -> Self {
                $from($to(self) / n as f64)
            }
            fn bits(self) -> u64 {
                $bits(self)
            }
        }
    };
}
float_val!(
    f16,
    2048,
    15,
    f16::to_f64,
    f16::from_f64,
    |v: f16| v.to_bits() as u64
);
float_val!(
    bf16,
    256,
    127,
    bf16::to_f64,
    bf16::from_f64,
    |v: bf16| v.to_bits() as u64
);
float_val!(
    f32,
    1 << 24,
    127,
    f64::from,
    |v: f64| v as f32,
    |v: f32| v.to_bits() as u64
);
float_val!(f64, 1 << 53, 1023, |v: f64| v, |v: f64| v, f64::to_bits);

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How values are drawn, chosen per (dtype, op) so that every reduction order is exact.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Any 64 random bits (integers: wrapping arithmetic is exact).
    Raw,
    /// Integers in `-h..=h`; `n*h` stays exactly representable.
    Small(i64),
    /// +-1 or +-2; only ranks below `k` may give 2, so products stay finite.
    Pow2(usize),
    /// Rank 0 gives `w + (n-1)c`, the others `w - c` with `w` in `1..=m`, `c` in {0,1}:
    /// the sum is `n*w`, so the average is exactly `w`.
    Avg(i64),
}

/// The value rank `r` puts at (global) index `g`.
#[derive(Debug, Clone)]
struct Gen {
    kind: Kind,
    n: usize,
    keys: Vec<u64>,
}

impl Gen {
    fn new<T: Val>(op: Option<ReduceOp>, n: usize, seed: u64) -> Gen {
        let n1 = n.max(1) as i64;
        let kind = match op {
            Some(ReduceOp::Avg) => Kind::Avg(((T::EXACT - (n1 - 1)) / n1).clamp(1, 1000)),
            Some(ReduceOp::Prod) if T::FLOAT => Kind::Pow2(T::MAX_POW2),
            _ if !T::FLOAT => Kind::Raw,
            _ => Kind::Small((T::EXACT / n1).clamp(1, 1 << 20)),
        };
        let keys = (0..n.max(1) as u64)
            .map(|r| splitmix64(seed ^ r.wrapping_mul(0x2545_f491_4f6c_dd1d)))
            .collect();
        Gen { kind, n, keys }
    }

    fn value(&self, r: usize, g: usize) -> i64 {
        let h = splitmix64(self.keys[r] ^ g as u64);
        match self.kind {
            Kind::Raw => h as i64,
            Kind::Small(m) => (h % (2 * m as u64 + 1)) as i64 - m,
            Kind::Pow2(k) => {
                let mag = if r < k && h & 1 == 1 { 2 } else { 1 };
                if h & 2 == 2 {
                    -mag
                } else {
                    mag
                }
            }
            Kind::Avg(m) => {
                // w and c depend on the index only, so every rank draws the same.
                let h = splitmix64(self.keys[0] ^ g as u64 ^ 0xa5a5);
                let w = 1 + (h % m as u64) as i64;
                let c = ((h >> 32) & 1) as i64;
                if r == 0 {
                    w + (self.n as i64 - 1) * c
                } else {
                    w - c
                }
            }
        }
    }

    fn elem<T: Val>(&self, r: usize, g: usize) -> T {
        T::from_i64(self.value(r, g))
    }

    /// The reduction over all ranks of their values at `g`, serially.
    fn reduced<T: Val>(&self, g: usize, op: ReduceOp) -> T {
        let mut acc: T = self.elem(0, g);
        for r in 1..self.n {
            acc = T::reduce(acc, self.elem(r, g), op);
        }
        if op == ReduceOp::Avg {
            acc = acc.div_n(self.n);
        }
        acc
    }
}

/// One rank's buffers for one size. In-place collectives (allreduce, broadcast) use `recv`.
struct Bufs<T> {
    send: Vec<T>,
    recv: Vec<T>,
}

/// Sizes of (send, recv) in elements for a row of `count` elements.
fn buf_lens(coll: Coll, count: usize, n: usize) -> (usize, usize) {
    match coll {
        Coll::AllReduce | Coll::Broadcast => (0, count),
        Coll::AllGather => (count / n, count),
        Coll::ReduceScatter => (count, count / n),
        Coll::AllToAll => (count, count),
    }
}

/// The check's setup: inputs from `gen`, outputs filled with `poison` values.
fn fill<T: Val>(
    coll: Coll,
    count: usize,
    rank: usize,
    root: usize,
    gen: &Gen,
    poison: &Gen,
) -> Bufs<T> {
    let n = gen.n;
    let (ls, lr) = buf_lens(coll, count, n);
    let mut recv: Vec<T> = (0..lr).map(|g| poison.elem(rank, g)).collect();
    let send: Vec<T> = match coll {
        Coll::AllReduce => {
            recv = (0..lr).map(|g| gen.elem(rank, g)).collect();
            Vec::new()
        }
        Coll::Broadcast => {
            if rank == root {
                recv = (0..lr).map(|g| gen.elem(root, g)).collect();
            }
            Vec::new()
        }
        // Rank r's block of the gathered buffer is its values at r*c..(r+1)*c.
        Coll::AllGather => (0..ls).map(|i| gen.elem(rank, rank * ls + i)).collect(),
        // Block j of the send buffer goes to rank j.
        Coll::ReduceScatter | Coll::AllToAll => (0..ls).map(|g| gen.elem(rank, g)).collect(),
    };
    Bufs { send, recv }
}

/// What `rank` must hold at `recv[i]` after the collective.
fn expected<T: Val>(
    coll: Coll,
    count: usize,
    rank: usize,
    root: usize,
    op: ReduceOp,
    gen: &Gen,
    i: usize,
) -> T {
    let c = count / gen.n;
    match coll {
        Coll::AllReduce => gen.reduced(i, op),
        Coll::Broadcast => gen.elem(root, i),
        Coll::AllGather => gen.elem(i / c, i),
        Coll::ReduceScatter => gen.reduced(rank * c + i, op),
        Coll::AllToAll => gen.elem(i / c, rank * c + i % c),
    }
}

/// Elements of `recv` that differ bitwise from the expected result.
#[allow(clippy::too_many_arguments)]
fn count_wrong<T: Val>(
    coll: Coll,
    count: usize,
    rank: usize,
    root: usize,
    op: ReduceOp,
    gen: &Gen,
    recv: &[T],
) -> u64 {
    recv.iter()
        .enumerate()
        .filter(|&(i, v)| v.bits() != expected::<T>(coll, count, rank, root, op, gen, i).bits())
        .count() as u64
}

// ---------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------

fn call<T: Element>(comm: &Communicator, o: &Opts, b: &mut Bufs<T>) -> kolo::Result<()> {
    match o.coll {
        Coll::AllReduce => match o.algo {
            Some(a) => comm.allreduce_with(&mut b.recv, o.op, a),
            None => comm.allreduce(&mut b.recv, o.op),
        },
        Coll::Broadcast => comm.broadcast(&mut b.recv, o.root),
        Coll::AllGather => comm.allgather(&b.send, &mut b.recv),
        Coll::ReduceScatter => comm.reduce_scatter(&b.send, &mut b.recv, o.op),
        Coll::AllToAll => comm.alltoall(&b.send, &mut b.recv),
    }
}

const SEED: u64 = 0x6b6f_6c6f_6265_6e63; // "kolobenc"

fn run_size<T: Val>(comm: &Communicator, o: &Opts, bytes: u64) -> kolo::Result<Row> {
    let (rank, n) = (comm.rank(), comm.size());
    let count = (bytes / T::DTYPE.size() as u64) as usize;
    let op = o.coll.reduces().then_some(o.op);
    let gen = Gen::new::<T>(op, n, SEED ^ bytes);
    let poison = Gen::new::<T>(op, n, !SEED ^ bytes);
    let mut b = fill::<T>(o.coll, count, rank, o.root, &gen, &poison);

    let mut wrong = 0u64;
    if o.check {
        call(comm, o, &mut b)?;
        wrong = count_wrong(o.coll, count, rank, o.root, o.op, &gen, &b.recv);
    }
    for _ in 0..o.warmup {
        call(comm, o, &mut b)?;
    }
    let iters = o.iters.unwrap_or_else(|| auto_iters(bytes));
    let mut times = Vec::with_capacity(iters);
    comm.barrier()?;
    for _ in 0..iters {
        let t = Instant::now();
        call(comm, o, &mut b)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut stats = [mean(&times), median(&times)];
    comm.allreduce(&mut stats, ReduceOp::Max)?;
    let wrong = if o.check {
        let mut w = [wrong as f64];
        comm.allreduce(&mut w, ReduceOp::Sum)?;
        Some(w[0] as u64)
    } else {
        None
    };
    Ok(Row {
        bytes,
        count: count as u64,
        dtype: T::DTYPE,
        op,
        time_us: stats[0],
        p50_us: stats[1],
        iters,
        wrong,
        bus_factor: o.coll.bus_factor(n),
        wire: None,
    })
}

/// One size with `--compression` (see the module docs): one checked call, warmup, then
/// timed calls on one tensor (one `CompressState`), each on the restored input.
fn run_size_compressed(
    comm: &Communicator,
    o: &Opts,
    c: &Compression,
    bytes: u64,
) -> kolo::Result<Row> {
    let (rank, n) = (comm.rank(), comm.size());
    let count = (bytes / 4) as usize;
    // Integers in [-2^20, 2^20] (fewer for more than 16 ranks) times 2^-20: every f32
    // sum of them is exact.
    let gen = Gen::new::<f32>(Some(ReduceOp::Sum), n, SEED ^ bytes);
    let val = |r: usize, g: usize| gen.value(r, g) as f32 * (1.0 / (1 << 20) as f32);
    let input: Vec<f32> = (0..count).map(|g| val(rank, g)).collect();
    let mut buf = input.clone();
    let mut state = CompressState::new();
    let mut wrong = 0u64;
    if o.check {
        comm.allreduce_compressed(&mut buf, o.op, c, &mut state)?;
        let (u, tiny) = match c {
            Compression::Fp16 => (2f64.powi(-11), 2f64.powi(-24)),
            _ => (2f64.powi(-8), 2f64.powi(-133)),
        };
        let nf = n as f64;
        for (g, &got) in buf.iter().enumerate() {
            let vals = (0..n).map(|r| val(r, g) as f64);
            let (sum, mag) = vals.fold((0f64, 0f64), |(s, m), v| (s + v, m + v.abs()));
            let (want, mag) = if o.op == ReduceOp::Avg {
                ((sum as f32 / n as f32) as f64, mag / nf)
            } else {
                (sum, mag)
            };
            wrong += u64::from(match c {
                Compression::None => got.to_bits() != (want as f32).to_bits(),
                Compression::Fp16 | Compression::Bf16 => {
                    (got as f64 - want).abs() > nf * (u * mag + tiny) * 1.0001
                }
                Compression::TopK(_) => false,
            });
        }
        // Every rank must hold rank 0's bits.
        let print = buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            splitmix64(h ^ x.to_bits() as u64)
        });
        let mut all = vec![0i64; n];
        comm.allgather(&[print as i64], &mut all)?;
        wrong += u64::from(all[rank] != all[0]);
    }
    for _ in 0..o.warmup {
        buf.copy_from_slice(&input);
        comm.allreduce_compressed(&mut buf, o.op, c, &mut state)?;
    }
    let iters = o.iters.unwrap_or_else(|| auto_iters(bytes));
    let mut times = Vec::with_capacity(iters);
    let mut sent = 0u64;
    comm.barrier()?;
    for _ in 0..iters {
        buf.copy_from_slice(&input);
        let t = Instant::now();
        let st = comm.allreduce_compressed(&mut buf, o.op, c, &mut state)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        sent += st.bytes_sent;
    }
    let mut stats = [mean(&times), median(&times)];
    comm.allreduce(&mut stats, ReduceOp::Max)?;
    let mut w = [sent as f64 / iters as f64, wrong as f64];
    comm.allreduce(&mut w, ReduceOp::Sum)?;
    Ok(Row {
        bytes,
        count: count as u64,
        dtype: DType::F32,
        op: Some(o.op),
        time_us: stats[0],
        p50_us: stats[1],
        iters,
        wrong: o.check.then_some(w[1] as u64),
        bus_factor: o.coll.bus_factor(n),
        wire: Some((w[0] / n as f64, dense_ring_bytes(count, n))),
    })
}

/// Runs every size; returns the total of wrong elements over ranks and sizes.
fn bench<T: Val>(comm: &Communicator, o: &Opts, init_ms: f64, start: Instant) -> kolo::Result<u64> {
    let mut init = [init_ms];
    comm.allreduce(&mut init, ReduceOp::Max)?;
    let root = comm.rank() == 0;
    let n = comm.size();
    if root && !o.json {
        println!("{}", header_lines(o, n, init[0]));
        println!("{}", model_line(comm));
    }
    let mut rows = Vec::new();
    for bytes in row_sizes(o, n) {
        let row = match &o.compression {
            Some(c) => run_size_compressed(comm, o, c, bytes)?,
            None => run_size::<T>(comm, o, bytes)?,
        };
        if root {
            if o.json {
                println!("{}", json_row(o, n, &row));
            } else {
                println!("{}", format_row(&row));
            }
        }
        rows.push(row);
    }
    if root {
        let wall_s = start.elapsed().as_secs_f64();
        if o.json {
            println!("{}", json_summary(o, n, &rows, init[0], wall_s));
        } else {
            println!("{}", footer_lines(&rows, wall_s));
        }
    }
    Ok(rows.iter().filter_map(|r| r.wrong).sum())
}

fn dispatch(comm: &Communicator, o: &Opts, init_ms: f64, start: Instant) -> kolo::Result<u64> {
    match o.dtype {
        DType::U8 => bench::<u8>(comm, o, init_ms, start),
        DType::I32 => bench::<i32>(comm, o, init_ms, start),
        DType::I64 => bench::<i64>(comm, o, init_ms, start),
        DType::F16 => bench::<f16>(comm, o, init_ms, start),
        DType::BF16 => bench::<bf16>(comm, o, init_ms, start),
        DType::F32 => bench::<f32>(comm, o, init_ms, start),
        DType::F64 => bench::<f64>(comm, o, init_ms, start),
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Before the communicator exists, only the launcher's variables say who we are; print
    // usage once (rank 0, or when the rank is unknown), not once per rank.
    let env_rank = kolo::Config::from_env().ok().map(|c| c.rank);
    let speaks = env_rank.unwrap_or(0) == 0;
    let opts = match parse_args(&args) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            if speaks {
                println!("{USAGE}");
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            if speaks {
                eprintln!("kolo-bench: {e}\n{USAGE}");
            }
            return ExitCode::from(2);
        }
    };
    let t = Instant::now();
    // -a applies to the compressed calls through the communicator's configuration.
    let comm = match kolo::Config::from_env().and_then(|mut cfg| {
        if opts.compression.is_some() && opts.algo.is_some() {
            cfg.algo = opts.algo;
        }
        Communicator::init(cfg)
    }) {
        Ok(c) => c,
        Err(e) => {
            let r = env_rank.map_or_else(|| "?".to_string(), |r| r.to_string());
            eprintln!("kolo-bench: rank {r}: {e}");
            return ExitCode::from(1);
        }
    };
    let init_ms = t.elapsed().as_secs_f64() * 1e3;
    if let Some(set) = opts.fusion {
        let rank = comm.rank();
        return match fusion::run(comm, set, opts.steps, opts.json) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(wrong) => {
                if rank == 0 {
                    eprintln!("kolo-bench: {wrong} wrong values");
                }
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("kolo-bench: rank {rank}: {e}");
                ExitCode::from(1)
            }
        };
    }
    if opts.coll == Coll::Broadcast && opts.root >= comm.size() {
        if comm.rank() == 0 {
            eprintln!(
                "kolo-bench: -r: root {} is not a rank (nranks={})\n{USAGE}",
                opts.root,
                comm.size()
            );
        }
        return ExitCode::from(2);
    }
    match dispatch(&comm, &opts, init_ms, start) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(wrong) => {
            if comm.rank() == 0 {
                eprintln!("kolo-bench: {wrong} wrong values");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("kolo-bench: rank {}: {e}", comm.rank());
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests (argument parsing, formatting, and the checker against simulated collectives)
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn parsed(s: &str) -> Opts {
        match parse_args(&args(s)) {
            Ok(Parsed::Run(o)) => o,
            other => panic!("{s:?} -> {other:?}"),
        }
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("8"), Ok(8));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        for bad in [
            "",
            "M",
            "abc",
            "1T",
            "-1",
            "1.5M",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults() {
        let o = parsed("");
        assert_eq!(o, Opts::default());
        assert_eq!(
            (o.min_bytes, o.max_bytes, o.factor, o.warmup),
            (8, 64 << 20, 2, 5)
        );
        assert!(o.check && o.iters.is_none() && o.root == 0);
        assert_eq!(
            (o.dtype, o.op, o.coll),
            (DType::F32, ReduceOp::Sum, Coll::AllReduce)
        );
    }

    #[test]
    fn all_flags() {
        let o =
            parsed("-b 1K -e 256M -f 4 -n 7 -w 0 -c 0 -d bfloat16 -o max --coll broadcast -r 3");
        assert_eq!(o.min_bytes, 1024);
        assert_eq!(o.max_bytes, 256 << 20);
        assert_eq!(o.factor, 4);
        assert_eq!(o.iters, Some(7));
        assert_eq!(o.warmup, 0);
        assert!(!o.check);
        assert_eq!(o.dtype, DType::BF16);
        assert_eq!(o.op, ReduceOp::Max);
        assert_eq!(o.coll, Coll::Broadcast);
        assert_eq!(o.root, 3);
        // Attached and long forms, as getopt_long accepts them in nccl-tests.
        let o = parsed("-b8 -e64M --stepfactor=8 --datatype half --op=avg --coll=all_gather");
        assert_eq!((o.min_bytes, o.max_bytes, o.factor), (8, 64 << 20, 8));
        assert_eq!(
            (o.dtype, o.op, o.coll),
            (DType::F16, ReduceOp::Avg, Coll::AllGather)
        );
        for (name, d) in [
            ("float", DType::F32),
            ("double", DType::F64),
            ("half", DType::F16),
            ("bfloat16", DType::BF16),
            ("int32", DType::I32),
            ("int64", DType::I64),
            ("uint8", DType::U8),
        ] {
            assert_eq!(parsed(&format!("-d {name}")).dtype, d);
            assert_eq!(d.name(), name);
        }
        for c in Coll::ALL {
            assert_eq!(parsed(&format!("--coll {}", c.name())).coll, c);
        }
        for op in ["sum", "prod", "min", "max", "avg"] {
            assert_eq!(parsed(&format!("-o {op}")).op.name(), op);
        }
        assert_eq!(parse_args(&args("-h")), Ok(Parsed::Help));
        assert_eq!(parse_args(&args("-b 8 --help")), Ok(Parsed::Help));
    }

    #[test]
    fn compression_flag() {
        assert_eq!(parsed("-b 8").compression, None);
        assert_eq!(
            parsed("--compression fp16").compression,
            Some(Compression::Fp16)
        );
        assert_eq!(
            parsed("--compression=bf16").compression,
            Some(Compression::Bf16)
        );
        match parsed("--compression topk:0.05").compression {
            Some(Compression::TopK(c)) => assert_eq!(c.density, 0.05),
            other => panic!("{other:?}"),
        }
        let o = parsed("--compression none");
        assert!(header_lines(&o, 4, 1.0).contains("compression: none"));
        assert!(header_lines(&o, 4, 1.0).contains("wire(B)"));
        let mut r = sample_row(1 << 20, 100.0, 90.0, Some(0));
        r.wire = Some((50_000.0, 1_500_000));
        let line = format_row(&r);
        assert!(line.ends_with("50000    30.00"), "{line}");
        assert_eq!(line.split_whitespace().count(), 12);
    }

    #[test]
    fn bad_flags_are_errors_not_panics() {
        for bad in [
            "-x",
            "--nope",
            "foo",
            "-b",
            "-e",
            "-b 1X",
            "-b 0",
            "-b 1M -e 1K",
            "-f 1",
            "-f 0",
            "-f two",
            "-n 0",
            "-n -3",
            "-w x",
            "-c 2",
            "-d float8",
            "-o xor",
            "--coll reduce",
            "--coll",
            "-r -1",
            "-",
            "--",
            "-é",
            "--compression",
            "--compression zip",
            "--compression topk:0",
            "--compression topk:1.5",
            "--compression fp16 -d half",
            "--compression fp16 --coll allgather",
        ] {
            let r = parse_args(&args(bad));
            assert!(r.is_err(), "{bad:?} -> {r:?}");
        }
    }

    #[test]
    fn iteration_schedule() {
        assert_eq!(auto_iters(8), 100);
        assert_eq!(auto_iters(64 << 10), 100);
        assert_eq!(auto_iters((64 << 10) + 1), 20);
        assert_eq!(auto_iters(4 << 20), 20);
        assert_eq!(auto_iters((4 << 20) + 1), 10);
        assert_eq!(auto_iters(32 << 20), 10);
        assert_eq!(auto_iters((32 << 20) + 1), 5);
        assert_eq!(auto_iters(256 << 20), 5);
    }

    #[test]
    fn row_size_series() {
        let o = parsed("-b 8 -e 64M -f 4");
        let s = row_sizes(&o, 4);
        assert_eq!(s.first(), Some(&8));
        assert_eq!(s.last(), Some(&(32 << 20)));
        assert_eq!(s.len(), 12);
        assert!(s.windows(2).all(|w| w[1] == 4 * w[0]));
        // The baselines' series: 8 B .. 256 MiB doubling, 26 sizes.
        assert_eq!(row_sizes(&parsed("-b 8 -e 256M"), 2).len(), 26);
        // Split collectives round to whole elements per rank; tiny sizes collapse.
        let o = parsed("-b 1 -e 64 -d double --coll allgather");
        assert_eq!(row_sizes(&o, 3), vec![24, 48]);
        let o = parsed("-b 1 -e 4");
        assert_eq!(row_sizes(&o, 4), vec![4]);
        // Overflow of the step ends the series instead of looping.
        let o = parsed("-b 8G -e 16G -f 1000000000");
        assert_eq!(row_sizes(&o, 2), vec![8 << 30]);
    }

    #[test]
    fn bus_factors() {
        assert_eq!(Coll::AllReduce.bus_factor(4), 1.5);
        assert_eq!(Coll::AllReduce.bus_factor(2), 1.0);
        assert_eq!(Coll::AllGather.bus_factor(4), 0.75);
        assert_eq!(Coll::ReduceScatter.bus_factor(4), 0.75);
        assert_eq!(Coll::AllToAll.bus_factor(4), 0.75);
        assert_eq!(Coll::Broadcast.bus_factor(4), 1.0);
        assert_eq!(Coll::AllReduce.bus_factor(1), 0.0);
    }

    #[test]
    fn stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
    }

    fn sample_row(bytes: u64, time_us: f64, p50_us: f64, wrong: Option<u64>) -> Row {
        Row {
            bytes,
            count: bytes / 4,
            dtype: DType::F32,
            op: Some(ReduceOp::Sum),
            time_us,
            p50_us,
            iters: auto_iters(bytes),
            wrong,
            bus_factor: Coll::AllReduce.bus_factor(4),
            wire: None,
        }
    }

    /// The rows must parse the way `summarize.parse` (used by compare_table.py) reads them:
    /// exactly 10 fields, a numeric size first, time at 5, p50 at 8, integer iters at 9.
    #[test]
    fn rows_parse_like_compare_table() {
        let r = sample_row(33554432, 20322.63, 20783.62, Some(0));
        let line = format_row(&r);
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 10, "{line}");
        assert!(f[0].bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(f[0], "33554432");
        assert_eq!(f[1], "8388608");
        assert_eq!((f[2], f[3]), ("float", "sum"));
        assert_eq!(f[4].parse::<f64>().unwrap(), 20322.63);
        assert_eq!(f[5], format!("{:.3}", 33554432.0 / 20322.63 / 1e3));
        assert_eq!(f[6], format!("{:.3}", 1.5 * 33554432.0 / 20322.63 / 1e3));
        assert_eq!(f[7].parse::<f64>().unwrap(), 20783.62);
        assert_eq!(f[8].parse::<usize>().unwrap(), 10);
        assert_eq!(f[9], "0");
        let unchecked = format_row(&sample_row(8, 1.0, 1.0, None));
        assert_eq!(unchecked.split_whitespace().nth(9), Some("N/A"));
        // Header and column names: comments, so not parsed as rows.
        let h = header_lines(&Opts::default(), 4, 12.5);
        assert!(h.lines().all(|l| l.starts_with('#')));
        assert!(h
            .lines()
            .next()
            .unwrap()
            .starts_with("# nThread 1 nranks=4 "));
        assert_eq!(h.matches("nranks=").count(), 1);
        let hdr = column_header(false);
        let cols: Vec<&str> = hdr.split_whitespace().skip(1).collect();
        assert_eq!(
            cols,
            [
                "size(B)",
                "count(elements)",
                "type",
                "redop",
                "time(us)",
                "algbw(GB/s)",
                "busbw(GB/s)",
                "p50(us)",
                "iters",
                "#wrong"
            ]
        );
        // Columns line up with the header.
        assert_eq!(column_header(false).len(), line.len());
    }

    #[test]
    fn footer() {
        let rows = [
            sample_row(8, 10.0, 9.0, Some(0)),
            sample_row(1 << 20, 1000.0, 900.0, Some(3)),
        ];
        let f = footer_lines(&rows, 1.25);
        let avg = (rows[0].busbw() + rows[1].busbw()) / 2.0;
        assert!(f.contains("# Out of bounds values : 3\n"), "{f}");
        assert!(
            f.contains(&format!("# Avg bus bandwidth : {avg:.3}\n")),
            "{f}"
        );
        assert!(f.contains("# wall time for whole run: 1.2 s") || f.contains("1.3 s"));
    }

    #[test]
    fn json_flag() {
        assert!(!parsed("").json);
        let o = parsed("--json -b 8 -e 1M -a ring");
        assert!(o.json);
        assert_eq!((o.min_bytes, o.max_bytes), (8, 1 << 20));
        assert_eq!(o.algo, Algo::parse("ring"));
        assert!(parsed("-b 8 --json").json);
        for bad in ["--json=1", "--jsonx", "-json"] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }

    /// A `--json` row is one line of one JSON object with exactly the documented keys, and
    /// its numbers read back equal to the row's.
    #[test]
    fn json_row_parses_back() {
        let o = parsed("--json -a rd");
        let r = sample_row(33554432, 20322.63, 20783.62, Some(0));
        let line = json_row(&o, 4, &r);
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = [
            "coll",
            "algo",
            "dtype",
            "op",
            "nranks",
            "bytes",
            "count",
            "time_us",
            "p50_us",
            "algbw_gbps",
            "busbw_gbps",
            "iters",
            "wrong",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["coll"], "allreduce");
        assert_eq!(v["algo"], "rd");
        assert_eq!(v["dtype"], "float");
        assert_eq!(v["op"], "sum");
        assert_eq!(v["nranks"], 4);
        assert_eq!(v["bytes"], 33554432u64);
        assert_eq!(v["count"], 8388608u64);
        assert_eq!(v["time_us"].as_f64(), Some(20322.63));
        assert_eq!(v["p50_us"].as_f64(), Some(20783.62));
        assert_eq!(v["algbw_gbps"].as_f64(), Some(r.algbw()));
        assert_eq!(v["busbw_gbps"].as_f64(), Some(r.busbw()));
        assert_eq!(v["iters"], 10);
        assert_eq!(v["wrong"], 0);
        // Unchecked rows: wrong is null; no operator: "none"; auto algorithm.
        let o = parsed("--json --coll allgather -c 0");
        let mut r = sample_row(64, 5.0, 4.0, None);
        r.op = None;
        let v: serde_json::Value = serde_json::from_str(&json_row(&o, 2, &r)).unwrap();
        assert!(v["wrong"].is_null());
        assert_eq!((&v["op"], &v["algo"]), (&"none".into(), &"auto".into()));
        assert_eq!(v["coll"], "allgather");
    }

    #[test]
    fn json_summary_parses_back() {
        let o = parsed("--json");
        let rows = [
            sample_row(8, 10.0, 9.0, Some(0)),
            sample_row(1 << 20, 1000.0, 900.0, Some(3)),
        ];
        let line = json_summary(&o, 4, &rows, 12.5, 1.25);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["summary"], true);
        assert_eq!(v["rows"], 2);
        assert_eq!(v["wrong"], 3);
        assert_eq!(v["checked"], true);
        assert_eq!(v["nranks"], 4);
        assert_eq!(v["algo"], "auto");
        assert_eq!(
            v["avg_busbw_gbps"].as_f64(),
            Some((rows[0].busbw() + rows[1].busbw()) / 2.0)
        );
        assert_eq!(v["init_ms"].as_f64(), Some(12.5));
        assert_eq!(v["wall_s"].as_f64(), Some(1.25));
        assert_eq!(v["kolo_version"], kolo::VERSION);
        // Rows never carry the summary key, so readers can tell the two apart.
        let row: serde_json::Value = serde_json::from_str(&json_row(&o, 4, &rows[0])).unwrap();
        assert!(row.get("summary").is_none());
    }

    /// Print a sample table (`cargo test --bin kolo-bench sample -- --nocapture`).
    #[test]
    fn sample_table() {
        let o = parsed("-b 8 -e 64M -f 4");
        let mut rows = Vec::new();
        println!("{}", header_lines(&o, 4, 15.2));
        for b in row_sizes(&o, 4) {
            let t = 50.0 + b as f64 / 1000.0;
            let r = sample_row(b, t, t * 0.9, Some(0));
            println!("{}", format_row(&r));
            rows.push(r);
        }
        println!("{}", footer_lines(&rows, 3.0));
    }

    // --- The checker, against collectives simulated here from every rank's inputs. -----

    /// Every rank's `recv` after a correct collective, computed from all ranks' inputs in
    /// an order unlike `Gen::reduced` (reverse ranks, reduce in T as a ring would).
    fn simulate<T: Val>(coll: Coll, op: ReduceOp, n: usize, count: usize, root: usize) -> Vec<u64> {
        let opt = coll.reduces().then_some(op);
        let gen = Gen::new::<T>(opt, n, 1234);
        let poison = Gen::new::<T>(opt, n, 999);
        let bufs: Vec<Bufs<T>> = (0..n)
            .map(|r| fill(coll, count, r, root, &gen, &poison))
            .collect();
        let c = count / n;
        let reduce_at = |g: usize, from_send: bool| -> T {
            let get = |r: usize| {
                if from_send {
                    bufs[r].send[g]
                } else {
                    bufs[r].recv[g]
                }
            };
            let mut acc = get(n - 1);
            for r in (0..n - 1).rev() {
                acc = T::reduce(get(r), acc, op);
            }
            if op == ReduceOp::Avg {
                acc = acc.div_n(n);
            }
            acc
        };
        let mut wrong = Vec::new();
        for rank in 0..n {
            let out: Vec<T> = match coll {
                Coll::AllReduce => (0..count).map(|g| reduce_at(g, false)).collect(),
                Coll::Broadcast => bufs[root].recv.clone(),
                Coll::AllGather => (0..count).map(|g| bufs[g / c].send[g % c]).collect(),
                Coll::ReduceScatter => (0..c).map(|i| reduce_at(rank * c + i, true)).collect(),
                Coll::AllToAll => (0..count)
                    .map(|g| bufs[g / c].send[rank * c + g % c])
                    .collect(),
            };
            wrong.push(count_wrong(coll, count, rank, root, op, &gen, &out));
            // A corrupted element is seen.
            let mut bad = out.clone();
            let k = bad.len() / 2;
            bad[k] = if bad[k].bits() == T::from_i64(7).bits() {
                T::from_i64(5)
            } else {
                T::from_i64(7)
            };
            assert_eq!(count_wrong(coll, count, rank, root, op, &gen, &bad), 1);
            // So is data that never arrived (the poison is still there).
            if coll != Coll::AllReduce && !(coll == Coll::Broadcast && rank == root) {
                let before = &bufs[rank].recv;
                assert!(count_wrong(coll, count, rank, root, op, &gen, before) > 0);
            }
        }
        wrong
    }

    fn check_dtype<T: Val>() {
        for coll in Coll::ALL {
            let ops: &[ReduceOp] = if coll.reduces() {
                &[
                    ReduceOp::Sum,
                    ReduceOp::Prod,
                    ReduceOp::Min,
                    ReduceOp::Max,
                    ReduceOp::Avg,
                ]
            } else {
                &[ReduceOp::Sum]
            };
            for &op in ops {
                for n in [2usize, 3, 4, 8, 16] {
                    let count = 64 * n;
                    let root = n - 1;
                    let w = simulate::<T>(coll, op, n, count, root);
                    assert!(
                        w.iter().all(|&x| x == 0),
                        "{:?} {} {} n={n}: {w:?}",
                        T::DTYPE,
                        coll.name(),
                        op.name()
                    );
                }
            }
        }
    }

    #[test]
    fn checker_exact_u8() {
        check_dtype::<u8>();
    }
    #[test]
    fn checker_exact_i32() {
        check_dtype::<i32>();
    }
    #[test]
    fn checker_exact_i64() {
        check_dtype::<i64>();
    }
    #[test]
    fn checker_exact_f16() {
        check_dtype::<f16>();
    }
    #[test]
    fn checker_exact_bf16() {
        check_dtype::<bf16>();
    }
    #[test]
    fn checker_exact_f32() {
        check_dtype::<f32>();
    }
    #[test]
    fn checker_exact_f64() {
        check_dtype::<f64>();
    }

    /// The values are exact in every partial sum/product, whatever the order: check the
    /// worst case (all magnitudes summed) stays within each dtype's exact range.
    #[test]
    fn value_ranges_are_exact() {
        fn bound<T: Val>(op: ReduceOp, n: usize) {
            let gen = Gen::new::<T>(Some(op), n, 42);
            for g in 0..2000 {
                let vals: Vec<i64> = (0..n).map(|r| gen.value(r, g)).collect();
                match gen.kind {
                    Kind::Small(_) | Kind::Avg(_) => {
                        let s: i64 = vals.iter().map(|v| v.abs()).sum();
                        assert!(s <= T::EXACT, "{:?} {op:?} n={n}: {s}", T::DTYPE);
                        if let Kind::Avg(_) = gen.kind {
                            assert_eq!(
                                vals.iter().sum::<i64>() % n as i64,
                                0,
                                "{:?} n={n} {vals:?} {:?}",
                                T::DTYPE,
                                gen.kind
                            );
                            assert!(vals.iter().all(|&v| v >= 0));
                        }
                    }
                    Kind::Pow2(_) => {
                        let twos = vals.iter().filter(|v| v.abs() == 2).count();
                        assert!(twos <= T::MAX_POW2);
                    }
                    Kind::Raw => assert!(!T::FLOAT),
                }
            }
        }
        for n in [1, 2, 3, 4, 7, 16, 32] {
            for op in [
                ReduceOp::Sum,
                ReduceOp::Prod,
                ReduceOp::Min,
                ReduceOp::Max,
                ReduceOp::Avg,
            ] {
                bound::<f16>(op, n);
                bound::<bf16>(op, n);
                bound::<f32>(op, n);
                bound::<u8>(op, n);
            }
        }
        // Products of 2s in f16 stay finite with many ranks.
        let gen = Gen::new::<f16>(Some(ReduceOp::Prod), 64, 7);
        for g in 0..1000 {
            assert!(gen.reduced::<f16>(g, ReduceOp::Prod).is_finite());
        }
    }
}
