//! Runs a schedule from [`crate::algo`] over the [`crate::transport`].
//!
//! All operations of a round progress together on this thread: sends are
//! written as far as the socket takes, receives are read segment by segment,
//! and a segment that must be reduced is reduced as soon as it is complete
//! while the kernel keeps receiving the next one. When nothing can move, the
//! executor spins briefly (small messages arrive within microseconds), then
//! sleeps in epoll until a socket is ready or the deadline passes.
//!
//! **Narrowing.** When [`Call::wire`] is a 16-bit float format and the buffers
//! hold `f32` ([`Call::dtype`]), values travel at half the size: a send encodes
//! its region (and rounds it in place to the values sent, so the sender keeps
//! exactly what its peer receives), a receive decodes, and every reduction,
//! whether on receive or in a `Combine`, computes in f32 and rounds its result
//! to the wire format. A rank therefore only ever holds, for a value that has
//! travelled or been reduced, the bits it would send, and every schedule that
//! is bitwise reproducible for plain dtypes stays so.

use crate::algo::{Apply, Buf, Op, Region, Schedule};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::reduce::{self, ReduceOp};
use crate::transport::frame::{Desc, Header, Kind};
use crate::transport::{Incoming, Outgoing, RecvError, Transport, DUPLEX, DUPLEX_MAX};
use std::time::{Duration, Instant};

/// Identity of one collective call, for frame headers and error messages.
#[derive(Debug, Clone)]
pub struct Call {
    /// What every rank must agree on.
    pub desc: Desc,
    /// Sequence number of this call on the communicator.
    pub seq: u64,
    /// Element type of the buffers.
    pub dtype: DType,
    /// Element type on the wire: `dtype`, or `F16`/`BF16` for `F32` buffers
    /// (narrowing, see the module docs).
    pub wire: DType,
    /// Reduction, for collectives that reduce.
    pub op: ReduceOp,
    /// Human name, e.g. "allreduce".
    pub name: &'static str,
    /// Finish an average: divide the reduced values by this where they form
    /// ([`Schedule::completions`]), so each is divided once, by the rank that
    /// reduced it last, and copies travel on; 0 or 1: divide nothing. Only
    /// for allreduce schedules, not narrowing ones (their wire rounding comes
    /// before any division).
    pub divide_by: usize,
}

impl Call {
    /// "allreduce #12" style label used in errors.
    pub fn label(&self) -> String {
        format!("{} #{}", self.name, self.seq)
    }
}

/// Tunables for one run.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// Receives are reduced in pieces of this many bytes.
    pub segment_bytes: usize,
    /// With several connections per peer ([`Transport::lanes`]), a message of
    /// at least twice this many bytes goes as one stripe per connection.
    pub min_stripe: usize,
    /// Busy-poll this long before sleeping in epoll.
    pub spin: Duration,
    /// Fail after this long without any byte moving.
    pub timeout: Duration,
    /// Declare a peer this rank waits on lost once its host has answered
    /// nothing for this long ([`Transport::silent_for`]); `None`: never.
    pub peer_timeout: Option<Duration>,
    /// Declare a peer frozen once its heartbeats stopped this long ago
    /// ([`Transport::frozen_peer`]); `None`: never.
    pub heartbeat_timeout: Option<Duration>,
}

/// Buffers reused across calls so the steady state allocates nothing.
#[derive(Default)]
pub struct Workspace {
    /// Receive segments for reductions (u64 so every dtype is aligned).
    segments: Vec<Vec<u64>>,
    /// The schedule's `Buf::Scratch`.
    scratch: Vec<u64>,
    /// Encoded send payloads when narrowing, one per send of a round.
    stages: Vec<Vec<u64>>,
}

fn words(bytes: usize) -> usize {
    bytes.div_ceil(8)
}

/// Raw view of the three buffers. Regions of one round are disjoint where one
/// of them is written (checked by `Schedule::check_disjoint` in the tests of
/// every algorithm), which is what makes handing out slices from these
/// pointers sound.
struct Mem<'a> {
    input: (*const u8, usize),
    /// The output buffer as pieces in order: one for a contiguous buffer;
    /// one per tensor for a fused allreduce over the tensors' own memory.
    output: &'a [Piece],
    scratch: (*mut u8, usize),
    elem: usize,
    /// Bytes per element on the wire.
    wire: usize,
}

/// A run of output bytes starting `at` bytes into the (logical) output.
#[derive(Debug, Clone, Copy)]
struct Piece {
    at: usize,
    ptr: *mut u8,
    len: usize,
}

impl Mem<'_> {
    fn bytes(&self, r: &Region) -> (usize, usize) {
        (r.start * self.elem, r.len * self.elem)
    }
    /// The bytes `from..from + len` of region `r` as runs of memory, in order.
    fn runs(&self, r: &Region, from: usize, len: usize) -> Vec<(*mut u8, usize)> {
        let (off, rlen) = self.bytes(r);
        assert!(from + len <= rlen, "range outside region {r:?}");
        let (start, end) = (off + from, off + from + len);
        let (p, cap) = match r.buf {
            Buf::Input => (self.input.0 as *mut u8, self.input.1),
            Buf::Scratch => self.scratch,
            Buf::Output => {
                let total = self.output.last().map_or(0, |p| p.at + p.len);
                assert!(end <= total, "schedule region {r:?} outside its buffer");
                let first = self.output.partition_point(|p| p.at + p.len <= start);
                let mut out = Vec::new();
                for p in &self.output[first.min(self.output.len())..] {
                    if p.at >= end {
                        break;
                    }
                    let a = start.max(p.at);
                    let b = end.min(p.at + p.len);
                    if b > a {
                        // SAFETY: within the piece (a, b clipped to it).
                        out.push((unsafe { p.ptr.add(a - p.at) }, b - a));
                    }
                }
                return out;
            }
        };
        assert!(end <= cap, "schedule region {r:?} outside its buffer");
        // SAFETY: in bounds (asserted).
        vec![(unsafe { p.add(start) }, len)]
    }
    /// Whether region `r` lies in one piece of memory (always, but for a
    /// fused allreduce's output regions that cross tensors).
    fn whole(&self, r: &Region) -> bool {
        if r.buf != Buf::Output || self.output.len() == 1 {
            return true;
        }
        let (off, len) = self.bytes(r);
        let i = self.output.partition_point(|p| p.at + p.len <= off);
        len == 0
            || self
                .output
                .get(i)
                .is_some_and(|p| off + len <= p.at + p.len)
    }
    fn slice(&self, r: &Region) -> &[u8] {
        let (off, len) = self.bytes(r);
        let (p, cap) = match r.buf {
            Buf::Input => self.input,
            Buf::Output => return self.slice_mut(r),
            Buf::Scratch => (self.scratch.0 as *const u8, self.scratch.1),
        };
        assert!(off + len <= cap, "schedule region {r:?} outside its buffer");
        // SAFETY: in bounds (asserted); see the type's comment for aliasing.
        unsafe { std::slice::from_raw_parts(p.add(off), len) }
    }
    /// The region as one slice; for output regions only when [`Mem::whole`].
    #[allow(clippy::mut_from_ref)]
    fn slice_mut(&self, r: &Region) -> &mut [u8] {
        let (off, len) = self.bytes(r);
        let (p, cap) = match r.buf {
            Buf::Input => panic!("schedule writes to the input buffer"),
            Buf::Output => {
                let i = self
                    .output
                    .partition_point(|p| p.at + p.len <= off)
                    .min(self.output.len().saturating_sub(1));
                let piece = self.output[i];
                assert!(
                    len == 0 || (off >= piece.at && off + len <= piece.at + piece.len),
                    "schedule region {r:?} outside its buffer or across pieces"
                );
                if len == 0 {
                    // An aligned empty slice (reductions check alignment).
                    // SAFETY: zero length at a piece's (aligned) start.
                    return unsafe { std::slice::from_raw_parts_mut(piece.ptr, 0) };
                }
                (piece.ptr.wrapping_sub(piece.at), piece.at + piece.len)
            }
            Buf::Scratch => self.scratch,
        };
        assert!(off + len <= cap, "schedule region {r:?} outside its buffer");
        // SAFETY: in bounds (asserted); see the type's comment for aliasing.
        unsafe { std::slice::from_raw_parts_mut(p.wrapping_add(off), len) }
    }
}

/// Call `f(src, dst)` on matching chunks of two equally long lists of runs.
fn zip_runs(
    src: &[(*mut u8, usize)],
    dst: &[(*mut u8, usize)],
    mut f: impl FnMut(&[u8], &mut [u8]),
) {
    let (mut i, mut j, mut a, mut b) = (0, 0, 0, 0);
    while i < src.len() && j < dst.len() {
        let k = (src[i].1 - a).min(dst[j].1 - b);
        // SAFETY: both chunks lie within their runs; source and destination
        // regions of one operation are disjoint (Schedule::check_disjoint).
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts(src[i].0.add(a), k),
                std::slice::from_raw_parts_mut(dst[j].0.add(b), k),
            )
        };
        f(x, y);
        a += k;
        b += k;
        if a == src[i].1 {
            (i, a) = (i + 1, 0);
        }
        if b == dst[j].1 {
            (j, b) = (j + 1, 0);
        }
    }
}

struct SendState {
    out: Outgoing,
    from: Region,
    /// When narrowing: index into `Workspace::stages` of the encoded payload.
    stage: Option<usize>,
    done: bool,
}

impl SendState {
    fn payload<'a>(&self, mem: &'a Mem, stages: &'a [Vec<u64>]) -> &'a [u8] {
        match self.stage {
            Some(k) => &bytes_ref(&stages[k])[..self.from.len * mem.wire],
            None => mem.slice(&self.from),
        }
    }
    /// Write what the socket takes; true once sent. A region across pieces
    /// goes as one message gathered from them.
    fn progress(
        &mut self,
        t: &mut Transport,
        mem: &Mem,
        stages: &[Vec<u64>],
    ) -> std::io::Result<bool> {
        if self.stage.is_some() || mem.whole(&self.from) {
            return self.out.progress(t, self.payload(mem, stages));
        }
        let (_, len) = mem.bytes(&self.from);
        let parts: Vec<&[u8]> = mem
            .runs(&self.from, 0, len)
            .into_iter()
            // SAFETY: runs of the region, which nothing writes while it is sent.
            .map(|(p, n)| unsafe { std::slice::from_raw_parts(p.cast_const(), n) })
            .collect();
        self.out.progress_parts(t, &parts)
    }
}

struct RecvState {
    inc: Incoming,
    into: Region,
    apply: Apply,
    /// Wire bytes of `into` completed (copied or reduced).
    pos: usize,
    /// Bytes buffered in the segment awaiting reduction (or decoding).
    fill: usize,
    /// Index into `Workspace::segments` for reductions and decoding.
    seg: usize,
    done: bool,
}

/// Run `sched` for `call`. `input` is read-only; `output` receives results.
/// On failure every peer is told why (or, mid-frame, its connection is
/// closed) and the error is returned.
pub fn run(
    t: &mut Transport,
    sched: &Schedule,
    call: &Call,
    input: &[u8],
    output: &mut [u8],
    ws: &mut Workspace,
    opts: Opts,
) -> Result<()> {
    let one = [Piece {
        at: 0,
        ptr: output.as_mut_ptr(),
        len: output.len(),
    }];
    run_on(t, sched, call, input, &one, ws, opts)
}

/// [`run`] with an output made of `parts` laid end to end (their bytes in
/// order are the output buffer), written in place: a fused allreduce runs
/// over the tensors' own memory instead of copying them into one buffer and
/// back. Not for narrowing calls. Each part holds whole elements, aligned.
pub fn run_parts(
    t: &mut Transport,
    sched: &Schedule,
    call: &Call,
    parts: &mut [&mut [u8]],
    ws: &mut Workspace,
    opts: Opts,
) -> Result<()> {
    let mut pieces = Vec::with_capacity(parts.len());
    let mut at = 0;
    for p in parts.iter_mut().filter(|p| !p.is_empty()) {
        pieces.push(Piece {
            at,
            ptr: p.as_mut_ptr(),
            len: p.len(),
        });
        at += p.len();
    }
    if pieces.is_empty() {
        pieces.push(Piece {
            at: 0,
            ptr: std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
            len: 0,
        });
    }
    run_on(t, sched, call, &[], &pieces, ws, opts)
}

fn run_on(
    t: &mut Transport,
    sched: &Schedule,
    call: &Call,
    input: &[u8],
    output: &[Piece],
    ws: &mut Workspace,
    opts: Opts,
) -> Result<()> {
    let res = run_rounds(t, sched, call, input, output, ws, opts);
    match res {
        Ok(()) => Ok(()),
        Err(e) => {
            t.send_aborts(call.desc, call.seq, &e.to_string());
            let e = find_hung(t, e, chain_wait(opts.timeout));
            t.close_all();
            Err(e)
        }
    }
}

/// How long a rank that timed out (or heard of a timeout) collects the other
/// ranks' aborts to find the rank at the head of the chain of waits.
fn chain_wait(timeout: Duration) -> Duration {
    Duration::from_secs(1).min(timeout / 2)
}

/// With ranks waiting on each other (in a ring every rank waits on its
/// predecessor), the first rank to time out may be waiting on a rank that is
/// itself only waiting. Every rank that fails this way has sent its abort to
/// every peer, saying whom it waits on (see [`aborted`]); so collect the
/// aborts that arrive for `wait`, follow the waits from the rank this error
/// names, and append the rank where they end (the one that said nothing:
/// stopped, or too busy to take part) as `hung peer rank P (HOST)`.
fn find_hung(t: &Transport, e: Error, wait: Duration) -> Error {
    let me = t.rank();
    let start = match &e {
        Error::Timeout { hung: Some(p), .. } | Error::Aborted { hung: Some(p), .. }
            if *p != me && *p < t.size() =>
        {
            *p
        }
        _ => return e,
    };
    // waits[a] = the rank that a's abort says it waits on.
    let mut waits: Vec<Option<usize>> = vec![None; t.size()];
    waits[me] = Some(start);
    let until = Instant::now() + wait;
    loop {
        // The aborts already read (among them the one that failed this
        // collective, whose other copy may never come) and those arriving.
        t.poll_back_aborts();
        for (a, text) in t.aborts_heard() {
            if let Some(b) = waited_on(&text).filter(|&b| b != a && b < t.size()) {
                waits[a] = Some(b);
            }
        }
        if Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut chain = vec![me];
    let mut cur = start;
    while !chain.contains(&cur) {
        chain.push(cur);
        match waits[cur] {
            Some(next) => cur = next,
            None => break,
        }
    }
    let head = *chain.last().expect("non-empty");
    let named = format!("hung peer rank {head} (");
    if matches!(&e, Error::Timeout { detail, .. } | Error::Aborted { detail, .. } if detail.contains(&named))
    {
        // A frozen peer's error names it already.
        return e;
    }
    let path = chain
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(" -> ");
    let note = format!(
        "; hung peer rank {head} ({}): waits {path}, and rank {head} said nothing within {:.1}s",
        t.host(head),
        wait.as_secs_f64()
    );
    match e {
        Error::Timeout {
            rank,
            op,
            waited,
            detail,
            ..
        } => Error::Timeout {
            rank,
            op,
            waited,
            detail: detail + &note,
            hung: Some(head),
        },
        Error::Aborted {
            rank,
            origin,
            op,
            detail,
            ..
        } => Error::Aborted {
            rank,
            origin,
            op,
            detail: detail + &note,
            hung: Some(head),
        },
        e => e,
    }
}

/// The rank named last in a text as one that a rank was still receiving from
/// or sending to (a timeout's detail), i.e. the deepest in a chain of waits.
fn waited_on(text: &str) -> Option<usize> {
    ["receiving from rank ", "sending to rank "]
        .iter()
        .filter_map(|pat| {
            let (i, _) = text.rmatch_indices(pat).next()?;
            let rest = &text[i + pat.len()..];
            let (num, _) = rest.split_once(" (")?;
            Some((i, num.parse::<usize>().ok()?))
        })
        .max()
        .map(|(_, r)| r)
}

#[allow(clippy::too_many_arguments)]
fn run_rounds(
    t: &mut Transport,
    sched: &Schedule,
    call: &Call,
    input: &[u8],
    output: &[Piece],
    ws: &mut Workspace,
    opts: Opts,
) -> Result<()> {
    let elem = call.dtype.size();
    let narrow = call.wire != call.dtype;
    if narrow && (call.dtype != DType::F32 || !reduce::is_wire16(call.wire)) {
        return Err(Error::InvalidArgument(format!(
            "{}: {} buffers cannot travel as {}",
            call.label(),
            call.dtype,
            call.wire
        )));
    }
    let wire = call.wire.size();
    let seg_bytes = (opts.segment_bytes / 8 * 8).max(8);
    let scratch_bytes = sched.scratch_len() * elem;
    if ws.scratch.len() < words(scratch_bytes) {
        ws.scratch.resize(words(scratch_bytes), 0);
    }
    let mem = Mem {
        input: (input.as_ptr(), input.len()),
        output,
        scratch: (ws.scratch.as_mut_ptr().cast(), scratch_bytes),
        elem,
        wire,
    };
    // An inactivity deadline: a huge buffer on a slow link may legitimately
    // take longer than the timeout, but never that long without a byte moving.
    let mut deadline = Instant::now() + opts.timeout;
    let mut moved_since_deadline = false;
    let comm_id = t.comm_id();
    let header = |len: usize| Header {
        kind: Kind::Data,
        desc: call.desc,
        comm_id,
        seq: call.seq,
        len: len as u64,
    };
    let mut sends: Vec<SendState> = Vec::new();
    let mut recvs: Vec<RecvState> = Vec::new();
    let finals = (call.divide_by > 1).then(|| sched.completions(output_elems(output, elem)));
    let divide = |regions: &[Region]| {
        for r in regions {
            for (p, len) in mem.runs(r, 0, r.len * elem) {
                // SAFETY: a run of the output (Mem::runs), not otherwise
                // borrowed between rounds.
                let b = unsafe { std::slice::from_raw_parts_mut(p, len) };
                reduce::divide_bytes(call.dtype, b, call.divide_by);
            }
        }
    };
    for (k, round) in sched.rounds.iter().enumerate() {
        sends.clear();
        recvs.clear();
        let mut nseg = 0;
        for op in &round.ops {
            match *op {
                Op::Copy { from, to } if mem.whole(&from) && mem.whole(&to) => {
                    let src = mem.slice(&from);
                    mem.slice_mut(&to).copy_from_slice(src);
                }
                Op::Copy { from, to } => {
                    let len = from.len * elem;
                    zip_runs(&mem.runs(&from, 0, len), &mem.runs(&to, 0, len), |a, b| {
                        b.copy_from_slice(a)
                    });
                }
                Op::Send { peer, from } => {
                    for (lane, from) in stripes(from, elem, t.lanes(), opts.min_stripe) {
                        let lane = small_on_duplex(lane, &from, elem, t.lanes(), opts.min_stripe);
                        let stage = narrow.then(|| {
                            let k = sends.iter().filter(|s| s.stage.is_some()).count();
                            if ws.stages.len() <= k {
                                ws.stages.resize_with(k + 1, Vec::new);
                            }
                            let st = &mut ws.stages[k];
                            if st.len() < words(from.len * wire) {
                                st.resize(words(from.len * wire), 0);
                            }
                            let dst = &mut bytes_of(st)[..from.len * wire];
                            match from.buf {
                                // Read-only: encoded as is.
                                Buf::Input => {
                                    reduce::narrow(call.wire, dst, f32s(mem.slice(&from)))
                                }
                                _ => reduce::narrow_rounding(
                                    call.wire,
                                    dst,
                                    f32s_mut(mem.slice_mut(&from)),
                                ),
                            }
                            k
                        });
                        sends.push(SendState {
                            out: Outgoing::new(peer, header(from.len * wire).encode())
                                .on_lane(lane),
                            from,
                            stage,
                            done: false,
                        })
                    }
                }
                Op::Recv { peer, into, apply } => {
                    for (lane, into) in stripes(into, elem, t.lanes(), opts.min_stripe) {
                        let lane = small_on_duplex(lane, &into, elem, t.lanes(), opts.min_stripe);
                        let seg = if narrow || matches!(apply, Apply::Reduce { .. }) {
                            nseg += 1;
                            nseg - 1
                        } else {
                            usize::MAX
                        };
                        recvs.push(RecvState {
                            inc: Incoming::new(peer, header(into.len * wire)).on_lane(lane),
                            into,
                            apply,
                            pos: 0,
                            fill: 0,
                            seg,
                            done: false,
                        });
                    }
                }
                Op::Combine { .. } => {}
            }
        }
        while ws.segments.len() < nseg {
            ws.segments.push(Vec::new());
        }
        for s in ws.segments.iter_mut().take(nseg) {
            if s.len() < words(seg_bytes) {
                s.resize(words(seg_bytes), 0);
            }
        }
        let mut idle_since: Option<Instant> = None;
        let mut next_liveness = Instant::now() + LIVENESS_PERIOD;
        loop {
            let mut moved = false;
            // Sends first: a peer may be waiting for exactly this message.
            for s in sends.iter_mut().filter(|s| !s.done) {
                let len = s.from.len * wire;
                let before = s.out.remaining(len);
                match s.progress(t, &mem, &ws.stages) {
                    Ok(done) => {
                        s.done = done;
                        moved |= s.out.remaining(len) != before;
                    }
                    Err(e) => {
                        let peer = s.out.peer();
                        // The peer may have closed after telling us why (on
                        // a lane-0 connection, readable only at a frame
                        // boundary there; the transport checks).
                        if let Some(text) = t.back_abort(peer, BACK_WAIT) {
                            return Err(aborted(t, call, peer, text, ""));
                        }
                        if let Some(text) = t.pending_abort(peer) {
                            return Err(aborted(t, call, peer, text, ""));
                        }
                        let on = on_lane(t, s.out.lane());
                        return Err(peer_lost(t, call, peer, &format!("send failed{on}: {e}")));
                    }
                }
            }
            for i in 0..recvs.len() {
                if recvs[i].done {
                    continue;
                }
                match progress_recv(t, &mut recvs[i], &mem, ws, seg_bytes, call) {
                    Ok(m) => moved |= m,
                    Err(e) => {
                        let pending = pending_desc(t, &sends, &recvs, &mem);
                        let e = match e {
                            RecvError::Io(e) if t.lanes() > 1 => {
                                let on = on_lane(t, recvs[i].inc.lane());
                                RecvError::Io(std::io::Error::new(e.kind(), format!("{e}{on}")))
                            }
                            e => e,
                        };
                        return Err(recv_error(t, call, recvs[i].inc.peer(), e, &pending));
                    }
                }
            }
            if sends.iter().all(|s| s.done) && recvs.iter().all(|r| r.done) {
                break;
            }
            if moved {
                idle_since = None;
                moved_since_deadline = true;
                continue;
            }
            let now = Instant::now();
            if moved_since_deadline {
                deadline = now + opts.timeout;
                moved_since_deadline = false;
            }
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) < opts.spin {
                // Poll again soon, but let another runnable process have the
                // core first: with more ranks than cores, a pure busy loop
                // would steal the time the peer needs to send us data.
                std::thread::yield_now();
                continue;
            }
            // Anything a bystander sent earlier has no readiness edge left
            // to wake us, so look before sleeping.
            check_bystanders(t, call, &|t: &Transport| {
                pending_desc(t, &sends, &recvs, &mem)
            })?;
            if t.abort_requested() {
                return Err(aborted_here(t, call));
            }
            let mut wake = deadline;
            if let Some(limit) = opts.heartbeat_timeout {
                if let Some((peer, age)) = t.frozen_peer(limit) {
                    // Silent since the last byte moved (the deadline is that plus the timeout).
                    let stuck = opts
                        .timeout
                        .saturating_sub(deadline.saturating_duration_since(now));
                    return Err(frozen(t, call, peer, age, stuck));
                }
                wake = wake.min(now + HEARTBEAT_CHECK);
            }
            if let Some(limit) = opts.peer_timeout {
                if now >= next_liveness {
                    next_liveness = now + LIVENESS_PERIOD;
                    check_reachable(t, call, limit, &sends, &recvs)?;
                }
                wake = wake.min(next_liveness);
            }
            if !t.wait(wake)? && wake >= deadline {
                return Err(timeout(t, call, opts.timeout, &sends, &recvs, &mem));
            }
            idle_since = None;
        }
        for op in &round.ops {
            if let Op::Combine {
                from,
                into,
                incoming_first,
            } = *op
            {
                let combine = |inc: &[u8], acc: &mut [u8]| {
                    reduce::reduce_bytes(call.dtype, call.op, acc, inc, incoming_first);
                    if narrow {
                        reduce::round_to(call.wire, f32s_mut(acc));
                    }
                };
                if mem.whole(&from) && mem.whole(&into) {
                    combine(mem.slice(&from), mem.slice_mut(&into));
                } else {
                    let len = into.len * elem;
                    zip_runs(&mem.runs(&from, 0, len), &mem.runs(&into, 0, len), combine);
                }
            }
        }
        if let Some(f) = &finals {
            divide(&f.after[k]);
        }
    }
    if let Some(f) = &finals {
        divide(&f.at_end);
    }
    Ok(())
}

/// How often a waiting rank looks at its peers' heartbeats.
const HEARTBEAT_CHECK: Duration = Duration::from_secs(1);

/// A peer whose heartbeats stopped: its whole process is frozen (stopped,
/// a paused VM, swapping), which TCP alone cannot see. Named as the hung
/// peer, so the launcher and every rank blame it.
fn frozen(t: &Transport, call: &Call, peer: usize, age: Duration, idle: Duration) -> Error {
    Error::Timeout {
        rank: t.rank(),
        op: call.label(),
        waited: idle,
        detail: format!(
            "rank {peer} ({}) has sent no heartbeat for {:.1}s: its process is frozen \
             (stopped, a paused VM, swapping); hung peer rank {peer} ({})",
            t.host(peer),
            age.as_secs_f64(),
            t.host(peer)
        ),
        hung: Some(peer),
    }
}

/// This rank's own abort ([`crate::Communicator::abort`]), which its peers
/// hear through the abort frames that every failure sends.
pub(crate) fn aborted_here(t: &Transport, call: &Call) -> Error {
    Error::Aborted {
        rank: t.rank(),
        origin: t.rank(),
        op: call.label(),
        detail: "aborted by the caller (Communicator::abort)".into(),
        hung: None,
    }
}

/// Elements in an output made of pieces.
fn output_elems(output: &[Piece], elem: usize) -> usize {
    output.last().map_or(0, |p| p.at + p.len) / elem.max(1)
}

/// How a message of `r` (elements of `elem` bytes) travels over `lanes`
/// connections: as one piece on lane 0 unless it has at least `2 * min_stripe`
/// bytes, else as up to `lanes` contiguous stripes of at least `min_stripe`
/// bytes, stripe `i` on lane `i`. Sender and receiver compute the same split
/// from the same region length, and each lane carries its frames in order,
/// so every stripe arrives where its receive expects it.
fn stripes(
    r: Region,
    elem: usize,
    lanes: usize,
    min_stripe: usize,
) -> impl Iterator<Item = (usize, Region)> {
    let bytes = r.len * elem;
    let k = if lanes > 1 && bytes >= 2 * min_stripe {
        // Never an empty stripe, whatever the minimum.
        lanes.min(bytes / min_stripe.max(1)).min(r.len)
    } else {
        1
    };
    (0..k).map(move |i| {
        let (a, b) = (r.len * i / k, r.len * (i + 1) / k);
        (
            i,
            Region {
                start: r.start + a,
                len: b - a,
                ..r
            },
        )
    })
}

/// The lane of one piece from [`stripes`]: a small message (at most
/// [`DUPLEX_MAX`] bytes, so never striped) goes on [`DUPLEX`], where both
/// directions of a pair share a connection. Sender and receiver decide alike.
fn small_on_duplex(
    lane: usize,
    piece: &Region,
    elem: usize,
    lanes: usize,
    min_stripe: usize,
) -> usize {
    let bytes = piece.len * elem;
    let whole = lanes == 1 || bytes < 2 * min_stripe;
    if lane == 0 && whole && bytes <= DUPLEX_MAX {
        DUPLEX
    } else {
        lane
    }
}

/// How often a waiting collective asks the kernel whether the peers it waits
/// on still answer.
const LIVENESS_PERIOD: Duration = Duration::from_secs(1);

/// Fail with [`Error::PeerLost`] when a peer this round still waits on has
/// had a silent host for `limit`: its connections have carried neither data
/// nor ACKs (of our data, or of the keepalive probes sent every second once a
/// connection is idle for 2 s), so it is unreachable or gone without a FIN.
/// A stopped or busy peer still answers at the TCP level and is left to the
/// collective's inactivity timeout.
fn check_reachable(
    t: &Transport,
    call: &Call,
    limit: Duration,
    sends: &[SendState],
    recvs: &[RecvState],
) -> Result<()> {
    let waiting = sends
        .iter()
        .filter(|s| !s.done)
        .map(|s| s.out.peer())
        .chain(recvs.iter().filter(|r| !r.done).map(|r| r.inc.peer()));
    for peer in waiting {
        if let Some(quiet) = t.silent_for(peer) {
            if quiet >= limit {
                return Err(peer_lost(
                    t,
                    call,
                    peer,
                    &format!(
                        "unreachable: its host answered nothing (no data, no ACK of data or keepalive probes) for {:.1}s (KOLO_PEER_TIMEOUT={})",
                        quiet.as_secs_f64(),
                        limit.as_secs_f64()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// How long to wait for a peer's abort on the back channel after its
/// connection to us failed.
const BACK_WAIT: Duration = Duration::from_millis(200);

/// An abort from `origin`. When the text says that some other rank was lost
/// (the origin saw it die, or heard so from another), this rank reports that
/// loss itself, as [`Error::PeerLost`] naming the lost rank and its host, so
/// every survivor's error says which rank is gone, not only who told it.
///
/// When the text is a timeout (it names a rank its origin waited on), this
/// rank says whom it was itself waiting on (`pending`, the unfinished
/// operations of its round), so its own abort extends the chain of waits
/// (see [`find_hung`]). That holds whoever the origin waited on: a rank
/// aborted by a rank further down the ring before its own deadline must still
/// say that it waits on the stopped rank, not repeat the origin's wait.
fn aborted(t: &Transport, call: &Call, origin: usize, text: String, pending: &str) -> Error {
    let me = t.rank();
    if let Some((peer, host)) = lost_peer_in(&text) {
        if peer != me && peer < t.size() && peer != origin {
            return Error::PeerLost {
                rank: me,
                peer,
                host,
                op: call.label(),
                detail: format!("reported by rank {origin}: {text}"),
            };
        }
    }
    // The abort frame carries the origin's words only: the rank it traces
    // the failure to is read back from them here, in one place.
    let detail = match waited_on(&text) {
        Some(_) if !pending.is_empty() => format!("{text}; this rank was itself still {pending}"),
        _ => text,
    };
    Error::Aborted {
        rank: me,
        origin,
        op: call.label(),
        hung: blamed_in(&detail).filter(|&p| p < t.size()),
        detail,
    }
}

/// The rank and host of the first `lost peer rank P (HOST): ` in an error text
/// (the [`Error::PeerLost`] display).
fn lost_peer_in(text: &str) -> Option<(usize, String)> {
    let (_, rest) = text.split_once("lost peer rank ")?;
    let (num, rest) = rest.split_once(" (")?;
    let (host, _) = rest.split_once("): ")?;
    Some((num.parse().ok()?, host.to_string()))
}

/// While this rank waits, a peer it is not reading from may have sent an
/// abort, or a frame of this very collective with different arguments (say,
/// it believes another rank is the broadcast root, so neither side would ever
/// receive what the other expects). Peeking at their next header turns such
/// silent deadlocks into immediate errors.
///
/// Every idle peer is checked, not only those that just became readable: with
/// edge-triggered readiness, the event for a frame may have been consumed
/// while an earlier collective was waiting (a broadcast root can send its next
/// collective's frame before this rank has finished the previous one).
fn check_bystanders(
    t: &mut Transport,
    call: &Call,
    pending: &dyn Fn(&Transport) -> String,
) -> Result<()> {
    let me = t.rank();
    for peer in (0..t.size()).filter(|&p| p != me) {
        // Headers are peeked on the lane-0 connections (aborts and small
        // frames travel there), each unless a frame on it is partly read.
        // A frame on the one this rank does not expect it on means the
        // peer's sizes differ: its header says how.
        let lanes = if t.duplex_apart(peer) {
            &[0, DUPLEX][..]
        } else {
            &[0][..]
        };
        for &lane in lanes {
            if t.in_mid(peer, lane) {
                continue;
            }
            check_bystander(t, call, peer, lane, pending)?;
        }
    }
    Ok(())
}

fn check_bystander(
    t: &mut Transport,
    call: &Call,
    peer: usize,
    lane: usize,
    pending: &dyn Fn(&Transport) -> String,
) -> Result<()> {
    {
        match t.peek_header(peer, lane) {
            // Frames of later collectives wait until this rank gets there.
            Some(Ok(h)) if h.comm_id == t.comm_id() && h.seq > call.seq => {}
            Some(Ok(h)) if h.comm_id == t.comm_id() && h.kind == Kind::Abort => {
                let detail = t.take_abort(peer, lane, &h);
                return Err(aborted(t, call, peer, detail, &pending(t)));
            }
            Some(Ok(h)) if h.comm_id == t.comm_id() && h.seq == call.seq && h.desc != call.desc => {
                let mut mine = h;
                mine.desc = call.desc;
                return Err(recv_error(t, call, peer, RecvError::Mismatch(mine, h), ""));
            }
            Some(Ok(h)) if h.comm_id != t.comm_id() => {
                return Err(Error::Protocol {
                    rank: t.rank(),
                    peer,
                    detail: format!(
                        "frame for communicator {:#x}, this one is {:#x}",
                        h.comm_id,
                        t.comm_id()
                    ),
                })
            }
            Some(Err(detail)) => {
                return Err(Error::Protocol {
                    rank: t.rank(),
                    peer,
                    detail,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Advance one receive; returns whether any byte moved.
fn progress_recv(
    t: &mut Transport,
    r: &mut RecvState,
    mem: &Mem,
    ws: &mut Workspace,
    seg_bytes: usize,
    call: &Call,
) -> std::result::Result<bool, RecvError> {
    // When narrowing, wire bytes are half the f32 bytes of `dest`.
    let narrow = call.wire != call.dtype;
    let wire_len = r.into.len * mem.wire;
    let mut moved = false;
    if !mem.whole(&r.into) || (matches!(r.apply, Apply::Reduce { .. }) && !narrow) {
        // Across pieces (never narrowed): straight into them, or through a
        // segment reduced piece by piece; and every plain reduction, which
        // may read its bytes in place from a shared-memory ring there.
        return progress_recv_parts(t, r, mem, ws, seg_bytes, call);
    }
    let dest = mem.slice_mut(&r.into);
    if let (Apply::Copy, false) = (r.apply, narrow) {
        // Straight into place.
        loop {
            let n = r.inc.progress(t, &mut dest[r.pos..])?;
            r.pos += n;
            moved |= n > 0;
            if r.inc.is_done() {
                r.done = true;
            }
            if r.done || n == 0 {
                return Ok(moved);
            }
        }
    }
    // Narrowed (what is left): through a segment, widened or reduced into
    // place as soon as it is full, while the kernel receives the next one.
    loop {
        let seg_len = seg_bytes.min(wire_len - r.pos);
        let buf: &mut [u8] = bytes_of(&mut ws.segments[r.seg]);
        let n = r.inc.progress(t, &mut buf[r.fill..seg_len])?;
        r.fill += n;
        moved |= n > 0;
        if r.fill == seg_len && seg_len > 0 {
            let seg = &buf[..seg_len];
            let out = &mut dest[r.pos * 2..(r.pos + seg_len) * 2];
            match r.apply {
                Apply::Copy => reduce::widen(call.wire, f32s_mut(out), seg),
                Apply::Reduce { incoming_first } => {
                    reduce::reduce_widened(call.wire, call.op, f32s_mut(out), seg, incoming_first)
                }
            }
            r.pos += seg_len;
            r.fill = 0;
            continue;
        }
        if r.inc.is_done() {
            r.done = true;
        }
        if r.done || n == 0 {
            return Ok(moved);
        }
    }
}

/// Reduce the next `len` bytes of receive `r` with `f` where they lie in a
/// shared-memory ring, without copying them out: `Some(done)` when it did,
/// `None` when they must come the usual way (see [`Incoming::take_in_place`]).
fn reduce_from_ring(
    t: &mut Transport,
    r: &mut RecvState,
    len: usize,
    elem: usize,
    f: impl FnMut(&[u8], usize),
) -> std::result::Result<Option<bool>, RecvError> {
    if !r.inc.take_in_place(t, len, elem, f)? {
        return Ok(None);
    }
    r.pos += len;
    r.done = r.inc.is_done();
    Ok(Some(r.done))
}

/// [`progress_recv`] for a region across pieces of the output.
fn progress_recv_parts(
    t: &mut Transport,
    r: &mut RecvState,
    mem: &Mem,
    ws: &mut Workspace,
    seg_bytes: usize,
    call: &Call,
) -> std::result::Result<bool, RecvError> {
    let len = r.into.len * mem.elem;
    let mut moved = false;
    loop {
        let n = match r.apply {
            Apply::Copy => {
                let runs = mem.runs(&r.into, r.pos, len - r.pos);
                let mut parts: Vec<&mut [u8]> = runs
                    .into_iter()
                    .take(crate::transport::MAX_PARTS)
                    // SAFETY: runs of the region this receive owns in its round.
                    .map(|(p, n)| unsafe { std::slice::from_raw_parts_mut(p, n) })
                    .collect();
                let n = r.inc.progress_parts(t, &mut parts)?;
                r.pos += n;
                n
            }
            Apply::Reduce { incoming_first } => {
                let seg_len = seg_bytes.min(len - r.pos);
                if r.fill == 0 {
                    // The runs are only looked up when the bytes are in a
                    // ring: not on every small receive over TCP.
                    let (into, pos) = (r.into, r.pos);
                    let from_ring = reduce_from_ring(t, r, seg_len, mem.elem, |inc, off| {
                        let runs = mem.runs(&into, pos + off, inc.len());
                        let inc = [(inc.as_ptr().cast_mut(), inc.len())];
                        zip_runs(&inc, &runs, |inc, acc| {
                            reduce::reduce_bytes(call.dtype, call.op, acc, inc, incoming_first)
                        })
                    })?;
                    if let Some(done) = from_ring {
                        if done {
                            return Ok(true);
                        }
                        moved = true;
                        continue;
                    }
                    if !r.inc.has_header() {
                        // Nothing has come (the look above tried).
                        return Ok(moved);
                    }
                }
                let buf: &mut [u8] = bytes_of(&mut ws.segments[r.seg]);
                let n = r.inc.progress(t, &mut buf[r.fill..seg_len])?;
                r.fill += n;
                if r.fill == seg_len && seg_len > 0 {
                    let seg = (buf.as_mut_ptr(), seg_len);
                    zip_runs(&[seg], &mem.runs(&r.into, r.pos, seg_len), |inc, acc| {
                        reduce::reduce_bytes(call.dtype, call.op, acc, inc, incoming_first)
                    });
                    r.pos += seg_len;
                    r.fill = 0;
                }
                n
            }
        };
        moved |= n > 0;
        if r.inc.is_done() && r.fill == 0 {
            r.done = true;
        }
        if r.done || n == 0 {
            return Ok(moved);
        }
    }
}

fn bytes_of(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and every byte pattern is valid for it.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
}

fn bytes_ref(v: &[u64]) -> &[u8] {
    // SAFETY: as in `bytes_of`, shared.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 8) }
}

/// The f32 view of a narrowing call's buffer bytes.
fn f32s(b: &[u8]) -> &[f32] {
    assert!(b.len() % 4 == 0 && b.as_ptr().cast::<f32>().is_aligned());
    // SAFETY: length and alignment checked; every bit pattern is an f32.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 4) }
}

fn f32s_mut(b: &mut [u8]) -> &mut [f32] {
    assert!(b.len() % 4 == 0 && b.as_ptr().cast::<f32>().is_aligned());
    // SAFETY: as in `f32s`, and the exclusive borrow moves into the result.
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast(), b.len() / 4) }
}

/// " (stream L of N)" when there are several connections per peer (`KOLO_NSOCKS`),
/// so a failure says which one broke; empty otherwise.
fn on_lane(t: &Transport, lane: usize) -> String {
    if lane == DUPLEX {
        String::new()
    } else if t.lanes() > 1 {
        format!(" (stream {lane} of {})", t.lanes())
    } else {
        String::new()
    }
}

fn peer_lost(t: &Transport, call: &Call, peer: usize, detail: &str) -> Error {
    Error::PeerLost {
        rank: t.rank(),
        peer,
        host: t.host(peer).to_string(),
        op: call.label(),
        detail: detail.to_string(),
    }
}

fn code_name(field: &str, v: u64) -> String {
    match field {
        "dtype" => DType::from_code(v as u8).map_or(v.to_string(), |d| d.name().to_string()),
        "op" => ReduceOp::from_code(v as u8).map_or(v.to_string(), |o| o.name().to_string()),
        "collective" => crate::comm::coll_name(v as u8).to_string(),
        _ => v.to_string(),
    }
}

fn recv_error(t: &Transport, call: &Call, peer: usize, e: RecvError, pending: &str) -> Error {
    let rank = t.rank();
    match e {
        RecvError::Io(e) => match t.back_abort(peer, BACK_WAIT) {
            Some(text) => aborted(t, call, peer, text, pending),
            None => peer_lost(t, call, peer, &e.to_string()),
        },
        RecvError::Aborted(text) => aborted(t, call, peer, text, pending),
        RecvError::Protocol(detail) => Error::Protocol { rank, peer, detail },
        RecvError::Mismatch(exp, got) => {
            let detail = if got.seq != exp.seq {
                format!(
                    "rank {peer} is at collective #{} ({}), this rank at #{} ({})",
                    got.seq,
                    code_name("collective", got.desc.coll as u64),
                    exp.seq,
                    call.name
                )
            } else if let Some(fields) = exp.desc.diff(&got.desc) {
                fields
                    .iter()
                    .map(|(f, mine, theirs)| {
                        format!(
                            "{f}: rank {rank} has {}, rank {peer} has {}",
                            code_name(f, *mine),
                            code_name(f, *theirs)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            } else {
                format!(
                    "message length: rank {rank} expects {} bytes, rank {peer} sent {} (per-rank counts differ)",
                    exp.len, got.len
                )
            };
            Error::Mismatch {
                rank,
                peer,
                op: call.label(),
                detail,
            }
        }
    }
}

fn timeout(
    t: &Transport,
    call: &Call,
    waited: Duration,
    sends: &[SendState],
    recvs: &[RecvState],
    mem: &Mem,
) -> Error {
    // The peer named last in the description (a send's before a receive's).
    let last_recv = recvs
        .iter()
        .filter(|r| !r.done)
        .map(|r| r.inc.peer())
        .next_back();
    let last_send = sends
        .iter()
        .filter(|s| !s.done)
        .map(|s| s.out.peer())
        .next_back();
    Error::Timeout {
        rank: t.rank(),
        op: call.label(),
        waited,
        detail: format!(
            "nothing moved for that long; still {}",
            pending_desc(t, sends, recvs, mem)
        ),
        hung: last_send.or(last_recv),
    }
}

/// The rank an abort's text traces the failure to: the last one it names as
/// hung, lost, or waited on (nested reasons end with the deepest).
fn blamed_in(text: &str) -> Option<usize> {
    [
        "lost peer rank ",
        "receiving from rank ",
        "sending to rank ",
        "hung peer rank ",
    ]
    .iter()
    .filter_map(|pat| {
        let (i, _) = text.rmatch_indices(pat).next()?;
        let (num, _) = text[i + pat.len()..].split_once(" (")?;
        Some((i, num.parse::<usize>().ok()?))
    })
    .max()
    .map(|(_, r)| r)
}

/// The unfinished operations of a round: `receiving from rank 3 (10.0.0.4):
/// 0 of 4096 bytes; sending to rank 1 (...): 12 bytes left`.
fn pending_desc(t: &Transport, sends: &[SendState], recvs: &[RecvState], mem: &Mem) -> String {
    let mut parts: Vec<String> = recvs
        .iter()
        .filter(|r| !r.done)
        .map(|r| {
            format!(
                "receiving from rank {} ({}): {} of {} bytes",
                r.inc.peer(),
                t.host(r.inc.peer()),
                r.into.len * mem.wire - r.inc.remaining(),
                r.into.len * mem.wire
            )
        })
        .collect();
    parts.extend(sends.iter().filter(|s| !s.done).map(|s| {
        format!(
            "sending to rank {} ({}): {} bytes left",
            s.out.peer(),
            t.host(s.out.peer()),
            s.out.remaining(s.from.len * mem.wire)
        )
    }));
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(len: usize, elem: usize, lanes: usize, min: usize) -> Vec<(usize, usize, usize)> {
        let r = Region {
            start: 10,
            ..Region::out(0..len)
        };
        stripes(r, elem, lanes, min)
            .map(|(l, s)| (l, s.start, s.len))
            .collect()
    }

    #[test]
    fn an_abort_text_is_traced_to_the_deepest_rank_it_names() {
        let l = "rank 1: allreduce #9: lost peer rank 5 (10.213.0.3): connection reset";
        assert_eq!(blamed_in(l), Some(5));
        let l = "rank 0: allreduce #3: timed out after 5.0s: nothing moved for that long; still receiving from rank 2 (h3): 0 of 8 bytes";
        assert_eq!(blamed_in(l), Some(2));
        let l = "rank 7: allreduce #16: timed out after 4.0s: nothing moved for that long; still receiving from rank 6 (h4): 0 of 8 bytes; hung peer rank 5 (h3): waits 7 -> 6 -> 5, and rank 5 said nothing within 1.0s";
        assert_eq!(blamed_in(l), Some(5));
        assert_eq!(
            blamed_in("rank 0: allreduce #3: mismatch with rank 1: count"),
            None
        );
    }

    #[test]
    fn stripes_cover_the_message_in_order_no_smaller_than_the_minimum() {
        // One stream, or too small to split: one piece on lane 0.
        assert_eq!(split(1000, 4, 1, 64), [(0, 10, 1000)]);
        assert_eq!(split(31, 4, 4, 64), [(0, 10, 31)]);
        assert_eq!(split(0, 4, 4, 64), [(0, 10, 0)]);
        // 2 * 64 bytes: two stripes even with 4 lanes.
        assert_eq!(split(32, 4, 4, 64), [(0, 10, 16), (1, 26, 16)]);
        // A 1-byte minimum: at most one stripe per element.
        assert_eq!(split(2, 4, 4, 1), [(0, 10, 1), (1, 11, 1)]);
        for lanes in 1..=8 {
            for len in [0, 1, 7, 33, 100, 1009, 4096] {
                let s = split(len, 4, lanes, 64);
                assert!(s.len() <= lanes);
                let mut at = 10;
                for (i, &(l, start, n)) in s.iter().enumerate() {
                    assert_eq!((l, start), (i, at), "lanes={lanes} len={len}");
                    assert!(s.len() == 1 || n * 4 >= 64, "lanes={lanes} len={len}");
                    at += n;
                }
                assert_eq!(at, 10 + len);
            }
        }
    }
}
