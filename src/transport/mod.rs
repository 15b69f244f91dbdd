//! Moves bytes between ranks over TCP with mio: a full mesh of non-blocking,
//! `TCP_NODELAY` connections, framed messages written with vectored sends, and
//! an epoll wait with a deadline. It knows nothing of reductions or dtypes:
//! [`crate::exec`] decides where received bytes go.

pub mod frame;
pub mod heartbeat;
pub mod shm;
mod switch;

use crate::auth::{self, Secret};
use crate::error::{Error, Result};
use frame::{Desc, Header, Kind, HEADER_LEN, KIND_AT};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::SockRef;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
pub use switch::AbortSwitch;

/// One connected peer: a connection per direction. On loopback (and on any
/// host) a socket that both sends and receives bulk data has its lock taken by
/// the kernel's delivery of incoming segments while this rank sends, so the
/// two directions contend; separate sockets let them run in parallel.
///
/// Small frames are the exception ([`DUPLEX`]): both directions share the
/// lane-0 connection dialed by the lower rank, so that a reply carries the
/// TCP acknowledgement of the request it answers. On one-way connections
/// every small frame also costs a bare ACK segment the other way (the kernel
/// acknowledges every second small segment at once), which is a quarter of
/// a small exchange's time on loopback.
///
/// With `KOLO_NSOCKS` > 1 there are that many connections each way ("lanes"):
/// large messages are striped across them (see [`crate::exec`]); lane 0 also
/// carries aborts and the back channel.
struct Peer {
    /// Dialed by this rank; carry our frames to the peer. Lane 0 first.
    tx: Vec<TcpStream>,
    /// Accepted from the peer; carry its frames to us. Lane 0 first.
    rx: Vec<TcpStream>,
    host: String,
    /// Per lane-0 connection ([`MINE`]: `tx[0]`, [`THEIRS`]: `rx[0]`): our
    /// frame on it is partly written, so an abort frame cannot follow.
    out_mid: [bool; 2],
    /// Per lane-0 connection: a frame from the peer on it is partly read, so
    /// its next bytes are not a header.
    in_mid: [bool; 2],
}

/// Index of `tx[0]` (dialed by this rank) in [`Peer`]'s flags.
const MINE: usize = 0;
/// Index of `rx[0]` (dialed by the peer) in [`Peer`]'s flags.
const THEIRS: usize = 1;

/// The lane of small frames: a frame of at most [`DUPLEX_MAX`] payload bytes
/// to or from a peer travels on the lane-0 connection that the lower rank of
/// the two dialed, in both directions (see [`Peer`]). Sender and receiver
/// both derive the lane from the length they expect.
pub const DUPLEX: usize = usize::MAX;

/// Largest payload that travels on [`DUPLEX`]: above this, a message is bulk
/// data and takes the sender's own connection, so the two directions of a
/// full-duplex exchange do not contend for one socket.
pub const DUPLEX_MAX: usize = 64 << 10;

/// The connections of one rank to every other rank.
pub struct Transport {
    rank: usize,
    size: usize,
    comm_id: u64,
    lanes: usize,
    peers: Vec<Option<Peer>>,
    poll: Poll,
    events: Events,
    /// Wakes [`Transport::wait_incoming`] from another thread (created on first use).
    waker: Option<std::sync::Arc<mio::Waker>>,
    /// Set by an [`AbortSwitch`]: whatever waits here gives up.
    abort: std::sync::Arc<AtomicBool>,
    /// The peers' heartbeats, when they run ([`heartbeat`]).
    heartbeat: Option<heartbeat::Heartbeat>,
    /// Payload and header bytes sent since creation (payloads that went
    /// through a shared-memory ring included).
    pub bytes_sent: u64,
    /// Of [`Transport::bytes_sent`], the payload bytes that went through
    /// shared-memory rings.
    pub bytes_shm: u64,
    /// Payload and header bytes read from sockets since creation.
    pub bytes_received: u64,
    /// Every abort text read so far, as (peer, text), whichever connection
    /// and reader it came through: a failed rank follows the chain of waits
    /// from them (a peer's abort arrives twice, and the copy read first may
    /// be the one that failed the collective). See [`Transport::aborts_heard`].
    heard: std::cell::RefCell<Vec<(usize, String)>>,
    /// Shared-memory rings for bulk payloads to ([`shm`]) each peer of this
    /// host, per connection; empty when there are none.
    shm_out: shm::Rings,
    /// The rings this rank created for bulk payloads from each peer.
    shm_in: shm::Rings,
}

/// Token of the cross-thread waker in the data connections' epoll set.
const WAKER: Token = Token(usize::MAX - 1);

/// What ended a [`Transport::wait_incoming`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// This peer sent bytes (or closed its connection).
    Peer(usize),
    /// The waker fired.
    Woken,
    /// The deadline passed.
    Deadline,
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::Io(format!("{what}: {e}"))
}

fn tune(stream: &std::net::TcpStream, size: usize) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let s = SockRef::from(stream);
    if size > 0 {
        s.set_send_buffer_size(size)?;
        s.set_recv_buffer_size(size)?;
    }
    // Detect a peer host that vanished without a FIN (power loss, cable cut):
    // an idle connection is probed after 2 s and every second after that, so
    // a live peer's kernel answers at least every ~2 s (even when the peer
    // process is stopped) and [`Transport::silent_for`] stays small; the
    // kernel itself drops a connection whose probes go unanswered for ~7 s.
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(5);
    s.set_tcp_keepalive(&ka)?;
    Ok(())
}

impl Transport {
    /// Connect to every other rank. `listener` is this rank's bound listener
    /// whose address was published as `addrs[rank]`. Each rank dials every
    /// peer (its sending connection) and accepts one connection from every
    /// peer (its receiving connection), the two at once on two threads. Each
    /// connection starts with the authenticated handshake of [`crate::auth`]
    /// over `secret`, naming the job and both ranks; connections with a wrong
    /// secret, job id, version or rank are dropped (one logged line each)
    /// without disturbing the rest. `sockbuf` is the SO_SNDBUF/SO_RCVBUF to
    /// request (0: leave the kernel's autotuning).
    #[allow(clippy::too_many_arguments)]
    pub fn establish(
        rank: usize,
        size: usize,
        comm_id: u64,
        listener: std::net::TcpListener,
        addrs: &[SocketAddr],
        deadline: Instant,
        sockbuf: usize,
        secret: Option<&Secret>,
    ) -> Result<Transport> {
        Transport::establish_lanes(
            rank, size, comm_id, listener, addrs, deadline, sockbuf, secret, 1,
        )
    }

    /// [`Transport::establish`] with `lanes` connections each way per peer
    /// (`KOLO_NSOCKS`, 1 to 8). Every rank must use the same number: a hello
    /// that says otherwise is refused, naming both numbers.
    #[allow(clippy::too_many_arguments)]
    pub fn establish_lanes(
        rank: usize,
        size: usize,
        comm_id: u64,
        listener: std::net::TcpListener,
        addrs: &[SocketAddr],
        deadline: Instant,
        sockbuf: usize,
        secret: Option<&Secret>,
        lanes: usize,
    ) -> Result<Transport> {
        if !(1..=MAX_LANES).contains(&lanes) {
            return Err(Error::Config(format!(
                "KOLO_NSOCKS={lanes}: between 1 and {MAX_LANES} connections per peer"
            )));
        }
        let stop = AtomicBool::new(false);
        let (mut tx, mut rx) = std::thread::scope(|sc| {
            let acceptor = std::thread::Builder::new()
                .name("kolo-accept".into())
                .spawn_scoped(sc, || {
                    accept_all(
                        rank, size, comm_id, listener, deadline, sockbuf, secret, lanes, &stop,
                    )
                })
                .map_err(|e| io_err("cannot start the accepting thread", e))?;
            let tx = dial_all(rank, size, comm_id, addrs, deadline, sockbuf, secret, lanes);
            if tx.is_err() {
                stop.store(true, Ordering::SeqCst);
            }
            let rx = acceptor.join().unwrap_or_else(|_| {
                Err(Error::Io(format!(
                    "rank {rank}: the accepting thread panicked"
                )))
            });
            // A failed dial is the root cause; the acceptor merely stopped.
            Ok::<_, Error>((tx?, rx?))
        })?;
        let poll = Poll::new().map_err(|e| io_err("epoll", e))?;
        let mut peers: Vec<Option<Peer>> = (0..size).map(|_| None).collect();
        for j in (0..size).filter(|&j| j != rank) {
            let (t, r) = (std::mem::take(&mut tx[j]), std::mem::take(&mut rx[j]));
            let from = r[0].1;
            let mut p = Peer {
                tx: t.into_iter().map(TcpStream::from_std).collect(),
                rx: r.into_iter().map(|(s, _)| TcpStream::from_std(s)).collect(),
                host: addrs
                    .get(j)
                    .map_or(from.ip().to_string(), |a| a.ip().to_string()),
                out_mid: [false; 2],
                in_mid: [false; 2],
            };
            // Tokens only need to differ from the waker's: readiness is
            // never routed by token. `tx[0]` also receives: the peer's small
            // frames when this rank is the lower, its back-channel aborts.
            for (l, s) in p.tx.iter_mut().enumerate() {
                let interest = if l == 0 {
                    Interest::WRITABLE | Interest::READABLE
                } else {
                    Interest::WRITABLE
                };
                poll.registry()
                    .register(s, Token(2 * (j * lanes + l)), interest)
                    .map_err(|e| io_err("epoll register", e))?;
            }
            for (l, s) in p.rx.iter_mut().enumerate() {
                poll.registry()
                    .register(s, Token(2 * (j * lanes + l) + 1), Interest::READABLE)
                    .map_err(|e| io_err("epoll register", e))?;
            }
            peers[j] = Some(p);
        }
        Ok(Transport {
            rank,
            size,
            comm_id,
            lanes,
            peers,
            poll,
            events: Events::with_capacity(256),
            waker: None,
            abort: Default::default(),
            heartbeat: None,
            bytes_sent: 0,
            bytes_shm: 0,
            bytes_received: 0,
            heard: Default::default(),
            shm_out: Vec::new(),
            shm_in: Vec::new(),
        })
    }

    /// Use shared-memory rings for bulk payloads ([`shm`]): `outgoing`
    /// opened on the peers' side, `incoming` created on this one.
    pub fn attach_shm(&mut self, outgoing: shm::Rings, incoming: shm::Rings) {
        self.shm_out = outgoing;
        self.shm_in = incoming;
    }

    /// Remove the names of this rank's rings once every peer has opened
    /// them (after the first barrier): nothing is left in `/dev/shm` when
    /// the job ends, however it ends.
    pub fn unlink_shm(&mut self) {
        for r in self.shm_in.iter_mut().flatten().flatten() {
            r.unlink();
        }
    }

    /// Whether bulk frames to and from every peer can go through rings.
    pub fn rings_to_all(&self) -> bool {
        (0..self.size)
            .filter(|&p| p != self.rank)
            .all(|p| self.ring(p, 0, true).is_some() && self.ring(p, 0, false).is_some())
    }

    /// The ring of bulk frames to (`outgoing`) or from `peer` on `lane`.
    fn ring(&self, peer: usize, lane: usize, outgoing: bool) -> Option<&shm::Ring> {
        let rings = if outgoing {
            &self.shm_out
        } else {
            &self.shm_in
        };
        rings.get(peer)?.get(lane)?.as_ref()
    }

    /// Put a bulk payload in the ring to `peer` on `lane`; false if there is
    /// no ring or not room enough (the frame then goes inline).
    fn push_ring(&mut self, peer: usize, lane: usize, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len <= DUPLEX_MAX || lane == DUPLEX {
            return false;
        }
        let pushed = self
            .ring(peer, lane, true)
            .is_some_and(|r| r.push_frame(parts));
        if pushed {
            self.bytes_sent += len as u64;
            self.bytes_shm += len as u64;
        }
        pushed
    }

    /// Take the next `dst.len()` payload bytes of a [`Kind::Shm`] frame from
    /// `peer` on `lane` out of its ring.
    fn pop_ring(
        &mut self,
        peer: usize,
        lane: usize,
        dst: &mut [u8],
    ) -> std::result::Result<(), RecvError> {
        let r = self.ring(peer, lane, false).ok_or_else(|| {
            RecvError::Protocol(
                "a shared-memory frame, but this rank made no ring for that connection".into(),
            )
        })?;
        r.pop(dst).map_err(RecvError::Protocol)?;
        self.bytes_received += dst.len() as u64;
        Ok(())
    }

    /// Hand the next `len` payload bytes from the ring of `peer`/`lane` to
    /// `f` in place, with their offset: in one piece, or two where they wrap
    /// round the ring's end, each aligned to `align`; false (nothing taken)
    /// when a piece is not.
    fn use_ring(
        &mut self,
        peer: usize,
        lane: usize,
        len: usize,
        align: usize,
        mut f: impl FnMut(&[u8], usize),
    ) -> std::result::Result<bool, RecvError> {
        let r = self.ring(peer, lane, false).ok_or_else(|| {
            RecvError::Protocol(
                "a shared-memory frame, but this rank made no ring for that connection".into(),
            )
        })?;
        let (a, b) = r.front_split(len).map_err(RecvError::Protocol)?;
        let align = align.max(1);
        if (a.as_ptr() as usize) % align != 0 || (!b.is_empty() && a.len() % align != 0) {
            return Ok(false);
        }
        f(a, 0);
        if !b.is_empty() {
            f(b, a.len());
        }
        r.advance(len);
        self.bytes_received += len as u64;
        Ok(true)
    }

    /// A shared-memory frame from `peer` on `lane` begins: skip to where
    /// [`shm::Ring::push_frame`] put it.
    fn ring_frame_start(&mut self, peer: usize, lane: usize) {
        if let Some(r) = self.ring(peer, lane, false) {
            r.skip_to_line();
        }
    }

    /// Whether payloads to (`outgoing`) or from `peer` on `lane` may go
    /// through a ring: bulk frames only (small ones share [`DUPLEX`], where
    /// the socket's latency is the cost, not its copies).
    pub fn has_ring(&self, peer: usize, lane: usize, outgoing: bool) -> bool {
        lane != DUPLEX && self.ring(peer, lane, outgoing).is_some()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The id every frame of this communicator carries.
    pub fn comm_id(&self) -> u64 {
        self.comm_id
    }
    /// Connections each way per peer (`KOLO_NSOCKS`).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// Host (address) of `peer`, for error messages.
    pub fn host(&self, peer: usize) -> &str {
        self.peers[peer].as_ref().map_or("?", |p| p.host.as_str())
    }

    fn peer(&self, peer: usize) -> io::Result<&Peer> {
        self.peers
            .get(peer)
            .and_then(|p| p.as_ref())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("no connection to rank {peer}"),
                )
            })
    }

    /// How long the peer's host has said nothing on any of its connections:
    /// no data, and no ACK of our data or of our keepalive probes (TCP_INFO's
    /// `tcpi_last_data_recv` / `tcpi_last_ack_recv`). A live host answers
    /// keepalive probes of an idle connection every ~2 s, even when the peer
    /// process is stopped, so a long silence means the host is unreachable
    /// (or gone without a FIN). `None` when no connection can be asked.
    ///
    /// The least silence over all connections, because one connection alone
    /// may legitimately be quiet for long: one we are sending on while the
    /// peer does not read gets only zero-window probes, which back off
    /// exponentially. A single broken connection (reset, or dropped by the
    /// kernel's keepalive after ~7 s without answers) fails its next read or
    /// write instead, which is reported as the peer lost.
    pub fn silent_for(&self, peer: usize) -> Option<Duration> {
        let p = self.peer(peer).ok()?;
        p.tx.iter()
            .chain(&p.rx)
            .filter_map(|s| {
                let i = tcp_info(s)?;
                Some(i.tcpi_last_data_recv.min(i.tcpi_last_ack_recv))
            })
            .min()
            .map(|ms| Duration::from_millis(ms as u64))
    }

    /// After the connection from `peer` failed (closed mid-frame, reset): did
    /// the peer abort and say why on the back channel? [`Transport::abort_all`]
    /// writes its abort frame, besides on its own sending connection, back up
    /// the connection this rank dials to it (our `tx[0]`). That connection
    /// carries nothing else toward us, except the peer's small frames when
    /// this rank is the lower ([`DUPLEX`]); those are skipped. Waits at most
    /// `wait`; `None` when nothing (or not an abort of this job) arrives, or
    /// when a small frame on it is partly read.
    pub fn back_abort(&self, peer: usize, wait: Duration) -> Option<String> {
        let p = self.peer(peer).ok()?;
        if p.in_mid[MINE] {
            return None;
        }
        let deadline = Instant::now() + wait;
        let mut s = &p.tx[0];
        let nap = Duration::from_millis(1);
        loop {
            let mut raw = [0u8; HEADER_LEN];
            let got = read_until(|b| s.read(b), &mut raw, deadline, nap);
            let h = match Header::decode(&raw) {
                Ok(h) if got == HEADER_LEN && h.comm_id == self.comm_id => h,
                _ => return None,
            };
            if h.kind == Kind::Abort {
                let mut text = vec![0u8; (h.len as usize).min(frame::MAX_ABORT_LEN as usize)];
                let got = read_until(|b| s.read(b), &mut text, deadline, nap);
                let text = String::from_utf8_lossy(&text[..got]).into_owned();
                self.heard.borrow_mut().push((peer, text.clone()));
                return Some(text);
            }
            // The peer's small data frame, which this failed collective no
            // longer needs.
            if h.len as usize > DUPLEX_MAX {
                return None;
            }
            let mut skip = vec![0u8; h.len as usize];
            if read_until(|b| s.read(b), &mut skip, deadline, nap) < skip.len() {
                return None;
            }
        }
    }

    /// Every abort that has fully arrived on a back channel (see
    /// [`Transport::back_abort`]), as (peer, text), without waiting. Small
    /// data frames ahead of it are consumed: only a failed rank asks.
    pub fn poll_back_aborts(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (j, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            if p.in_mid[MINE] {
                continue;
            }
            loop {
                let mut raw = [0u8; HEADER_LEN];
                let h = match p.tx[0].peek(&mut raw) {
                    Ok(HEADER_LEN) => match Header::decode(&raw) {
                        Ok(h) if h.comm_id == self.comm_id => h,
                        _ => break,
                    },
                    _ => break,
                };
                let abort = h.kind == Kind::Abort;
                let len = if abort {
                    (h.len as usize).min(frame::MAX_ABORT_LEN as usize)
                } else if h.len as usize <= DUPLEX_MAX {
                    h.len as usize
                } else {
                    break;
                };
                let mut buf = vec![0u8; HEADER_LEN + len];
                if p.tx[0].peek(&mut buf).ok() != Some(buf.len()) {
                    break; // the rest is still on its way
                }
                let mut s = &p.tx[0];
                if s.read_exact(&mut buf).is_err() {
                    break;
                }
                if abort {
                    let text = String::from_utf8_lossy(&buf[HEADER_LEN..]).into_owned();
                    self.heard.borrow_mut().push((j, text.clone()));
                    out.push((j, text));
                    break;
                }
            }
        }
        out
    }

    /// Take every abort text this transport has read (by any reader, on any
    /// connection) since the last call, as (peer, text), oldest first.
    pub fn aborts_heard(&self) -> Vec<(usize, String)> {
        std::mem::take(&mut *self.heard.borrow_mut())
    }

    /// Which lane-0 connection ([`MINE`] or [`THEIRS`]) a frame on `lane` to
    /// (`outgoing`) or from `peer` uses; `None` for the striping lanes.
    fn link(&self, peer: usize, lane: usize, outgoing: bool) -> Option<usize> {
        match lane {
            DUPLEX if self.rank < peer => Some(MINE),
            DUPLEX => Some(THEIRS),
            0 if outgoing => Some(MINE),
            0 => Some(THEIRS),
            _ => None,
        }
    }

    /// The connection a frame on `lane` to (`outgoing`) or from `peer` uses.
    fn stream(&self, peer: usize, lane: usize, outgoing: bool) -> io::Result<&TcpStream> {
        let p = self.peer(peer)?;
        match self.link(peer, lane, outgoing) {
            Some(MINE) => lane_of(&p.tx, 0),
            Some(_) => lane_of(&p.rx, 0),
            None if outgoing => lane_of(&p.tx, lane),
            None => lane_of(&p.rx, lane),
        }
    }

    /// Record whether our frame on `lane` to `peer` is partly written.
    fn set_out_mid(&mut self, peer: usize, lane: usize, mid: bool) {
        if let Some(k) = self.link(peer, lane, true) {
            if let Some(Some(p)) = self.peers.get_mut(peer) {
                p.out_mid[k] = mid;
            }
        }
    }

    /// Record whether a frame from `peer` on `lane` is partly read.
    fn set_in_mid(&mut self, peer: usize, lane: usize, mid: bool) {
        if let Some(k) = self.link(peer, lane, false) {
            if let Some(Some(p)) = self.peers.get_mut(peer) {
                p.in_mid[k] = mid;
            }
        }
    }

    /// Whether a frame from `peer` on `lane` is partly read (so the next
    /// bytes there are not a header). False for the striping lanes.
    pub fn in_mid(&self, peer: usize, lane: usize) -> bool {
        match (self.link(peer, lane, false), self.peer(peer)) {
            (Some(k), Ok(p)) => p.in_mid[k],
            _ => false,
        }
    }

    /// Whether `lane` from `peer` is a different connection than lane 0:
    /// [`DUPLEX`] when this rank is the lower of the two.
    pub fn duplex_apart(&self, peer: usize) -> bool {
        self.rank < peer
    }

    /// Non-blocking vectored send on lane 0 (MSG_NOSIGNAL: a dead peer is an
    /// error, not SIGPIPE).
    pub fn send(&mut self, peer: usize, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send_on(peer, 0, bufs)
    }

    /// [`Transport::send`] on connection `lane` to `peer`.
    pub fn send_on(&mut self, peer: usize, lane: usize, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let s = self.stream(peer, lane, true)?;
        let n = SockRef::from(s).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)?;
        self.bytes_sent += n as u64;
        Ok(n)
    }

    /// Non-blocking receive on lane 0.
    pub fn recv(&mut self, peer: usize, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_on(peer, 0, buf)
    }

    /// [`Transport::recv`] on connection `lane` from `peer`.
    pub fn recv_on(&mut self, peer: usize, lane: usize, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.stream(peer, lane, false)?;
        let n = s.read(buf)?;
        self.bytes_received += n as u64;
        Ok(n)
    }

    /// [`Transport::recv_on`] into several buffers in turn (one `readv`).
    pub fn recv_vectored_on(
        &mut self,
        peer: usize,
        lane: usize,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> io::Result<usize> {
        let mut s = self.stream(peer, lane, false)?;
        let n = s.read_vectored(bufs)?;
        self.bytes_received += n as u64;
        Ok(n)
    }

    /// Sleep until some connection becomes readable or writable, or `deadline`.
    /// Returns false when the deadline passed.
    pub fn wait(&mut self, deadline: Instant) -> Result<bool> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        match self.poll.poll(&mut self.events, Some(deadline - now)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(io_err("epoll wait", e)),
        }
    }

    /// A handle other threads use to cut a [`Transport::wait_incoming`] short.
    pub fn waker(&mut self) -> Result<std::sync::Arc<mio::Waker>> {
        if self.waker.is_none() {
            let w = mio::Waker::new(self.poll.registry(), WAKER)
                .map_err(|e| io_err("epoll waker", e))?;
            self.waker = Some(std::sync::Arc::new(w));
        }
        Ok(self.waker.clone().expect("set above"))
    }

    /// A switch another thread pulls to make this transport's owner give up
    /// (see [`AbortSwitch`]).
    pub fn abort_switch(&mut self) -> Result<AbortSwitch> {
        Ok(AbortSwitch {
            flag: self.abort.clone(),
            waker: self.waker()?,
        })
    }

    /// Judge the peers by their heartbeats from now on.
    pub fn attach_heartbeat(&mut self, hb: heartbeat::Heartbeat) {
        self.heartbeat = Some(hb);
    }

    /// The peer whose heartbeats stopped longest ago, if more than `limit`
    /// ago: its process is frozen. `None` without heartbeats.
    pub fn frozen_peer(&self, limit: Duration) -> Option<(usize, Duration)> {
        let me = self.rank;
        self.heartbeat
            .as_ref()?
            .silent((0..self.size).filter(|&p| p != me), limit)
    }

    /// Whether this transport's [`AbortSwitch`] was pulled.
    pub fn abort_requested(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// Sleep until a peer has sent something (or closed its connection), the
    /// [`Transport::waker`] fires, or `deadline` passes. Nothing is consumed:
    /// readiness edges may have been used up earlier, so every connection is
    /// peeked before sleeping.
    pub fn wait_incoming(&mut self, deadline: Instant) -> Result<Activity> {
        loop {
            for (j, p) in self.peers.iter().enumerate() {
                let Some(p) = p else { continue };
                // Small frames from a higher rank come on our own connection.
                let streams = if self.rank < j {
                    &[&p.rx[0], &p.tx[0]][..]
                } else {
                    &[&p.rx[0]][..]
                };
                for s in streams {
                    match s.peek(&mut [0u8; 1]) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // Data, end of stream or an error: the next collective finds out which.
                        _ => return Ok(Activity::Peer(j)),
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Activity::Deadline);
            }
            match self.poll.poll(&mut self.events, Some(deadline - now)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("epoll wait", e)),
            }
            if self.events.iter().any(|e| e.token() == WAKER) {
                return Ok(Activity::Woken);
            }
        }
    }

    /// Look at the next frame header from `peer` on `lane` (0 or
    /// [`DUPLEX`]) without consuming it; `None` when a whole header has not
    /// arrived. Only meaningful at a frame boundary ([`Transport::in_mid`]).
    pub fn peek_header(
        &self,
        peer: usize,
        lane: usize,
    ) -> Option<std::result::Result<Header, String>> {
        let s = self.stream(peer, lane, false).ok()?;
        let mut raw = [0u8; HEADER_LEN];
        match s.peek(&mut raw) {
            Ok(HEADER_LEN) => Some(Header::decode(&raw)),
            _ => None,
        }
    }

    /// Consume an abort frame whose header was peeked on `lane`, returning its text.
    pub fn take_abort(&mut self, peer: usize, lane: usize, h: &Header) -> String {
        let mut raw = [0u8; HEADER_LEN];
        match self.recv_on(peer, lane, &mut raw) {
            Ok(HEADER_LEN) => read_abort_text(self, peer, lane, &[], h.len),
            _ => String::from("(abort text lost)"),
        }
    }

    /// After a send to `peer` failed: if the peer left an abort frame on its
    /// connection to us before closing, return its text. `None` when a frame
    /// from `peer` on that connection is partly read.
    pub fn pending_abort(&mut self, peer: usize) -> Option<String> {
        if self.in_mid(peer, 0) {
            return None;
        }
        let mut raw = [0u8; HEADER_LEN];
        let deadline = Instant::now() + Duration::from_millis(200);
        let got = read_until(|b| self.recv(peer, b), &mut raw, deadline, Duration::ZERO);
        match Header::decode(&raw) {
            Ok(h) if got == HEADER_LEN && h.kind == Kind::Abort && h.comm_id == self.comm_id => {
                Some(read_abort_text(self, peer, 0, &[], h.len))
            }
            _ => None,
        }
    }

    /// Best effort: tell every peer why this rank gives up, then close every
    /// connection so nobody waits on us. A connection in the middle of a frame
    /// cannot take the abort frame; closing it is the message.
    pub fn abort_all(&mut self, desc: Desc, seq: u64, why: &str) {
        self.send_aborts(desc, seq, why);
        self.close_all();
    }

    /// The sending half of [`Transport::abort_all`]: the connections stay
    /// open, so an answer (a peer's own abort) can still be read. The abort
    /// goes on both lane-0 connections to each peer, wherever our last frame
    /// there is complete: first back up the connection the peer dialed (which
    /// carries at most our small frames, so even a peer whose frame from us is
    /// cut off learns why), then on our own.
    pub fn send_aborts(&mut self, desc: Desc, seq: u64, why: &str) {
        let text = why.as_bytes();
        let text = &text[..text.len().min(frame::MAX_ABORT_LEN as usize)];
        let hdr = Header {
            kind: Kind::Abort,
            desc,
            comm_id: self.comm_id,
            seq,
            len: text.len() as u64,
        }
        .encode();
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut msg = hdr.to_vec();
        msg.extend_from_slice(text);
        for k in [THEIRS, MINE] {
            for p in self.peers.iter().flatten() {
                if p.out_mid[k] {
                    continue;
                }
                let s = SockRef::from(if k == MINE { &p.tx[0] } else { &p.rx[0] });
                let mut done = 0;
                while done < msg.len() && Instant::now() < deadline {
                    match s.send_with_flags(&msg[done..], libc::MSG_NOSIGNAL) {
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        }
    }

    /// Close every connection (after [`Transport::send_aborts`]), so nobody waits on us.
    pub fn close_all(&mut self) {
        for p in self.peers.iter_mut().flatten() {
            for s in p.tx.iter().chain(&p.rx) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The most connections per peer (`KOLO_NSOCKS`) a job may ask for.
pub const MAX_LANES: usize = 8;

fn lane_of(streams: &[TcpStream], lane: usize) -> io::Result<&TcpStream> {
    streams.get(lane).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!("no connection on lane {lane}"),
        )
    })
}

/// TCP_INFO of a connected socket (None if the kernel refuses).
fn tcp_info(s: &TcpStream) -> Option<libc::tcp_info> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

fn connect_retry(addr: SocketAddr, deadline: Instant) -> io::Result<std::net::TcpStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("could not connect to {addr} before the start timeout"),
            ));
        }
        match std::net::TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
                ) =>
            {
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Dial every peer `lanes` times and authenticate each connection; the
/// sending connections to each peer, lane 0 first.
#[allow(clippy::too_many_arguments)]
fn dial_all(
    rank: usize,
    size: usize,
    comm_id: u64,
    addrs: &[SocketAddr],
    deadline: Instant,
    sockbuf: usize,
    secret: Option<&Secret>,
    lanes: usize,
) -> Result<Vec<Vec<std::net::TcpStream>>> {
    let mut tx: Vec<Vec<std::net::TcpStream>> = (0..size).map(|_| Vec::new()).collect();
    let dials = addrs
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != rank)
        .flat_map(|(j, a)| (0..lanes).map(move |l| (j, a, l)));
    for (j, addr, lane) in dials {
        let lost = |detail: String| Error::PeerLost {
            rank,
            peer: j,
            host: addr.to_string(),
            op: "connect".into(),
            detail,
        };
        let stream = connect_retry(*addr, deadline).map_err(|e| lost(e.to_string()))?;
        tune(&stream, sockbuf).map_err(|e| io_err("socket options", e))?;
        let hello = auth::Hello {
            purpose: auth::Purpose::Data,
            has_key: false,
            comm_id,
            from: rank as u32,
            to: j as u32,
            size: size as u32,
            lane: lane as u8,
            lanes: lanes as u8,
            nonce: [0; auth::NONCE_LEN],
        };
        // The peer's acceptor may be busy with other ranks (or strangers):
        // wait for it until the start deadline.
        let peer = format!("rank {j} at {addr}");
        let mut timed = auth::Timed::new(&stream, deadline);
        auth::client(&mut timed, secret, hello, &peer).map_err(|f| match f {
            auth::Failure::Io(_) => lost(f.to_string()),
            _ => Error::Protocol {
                rank,
                peer: j,
                detail: format!("connecting to {peer}: {f}"),
            },
        })?;
        stream
            .set_read_timeout(None)
            .and_then(|_| stream.set_write_timeout(None))
            .and_then(|_| stream.set_nonblocking(true))
            .map_err(|e| io_err("nonblocking", e))?;
        tx[j].push(stream);
    }
    Ok(tx)
}

/// Accept and authenticate `lanes` connections from every peer (until
/// `deadline`, or until `stop` is set because dialing failed); the receiving
/// connections from each peer, lane 0 first, with their addresses.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn accept_all(
    rank: usize,
    size: usize,
    comm_id: u64,
    listener: std::net::TcpListener,
    deadline: Instant,
    sockbuf: usize,
    secret: Option<&Secret>,
    lanes: usize,
    stop: &AtomicBool,
) -> Result<Vec<Vec<(std::net::TcpStream, SocketAddr)>>> {
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("listener", e))?;
    let mut lst = TcpListener::from_std(listener);
    let mut poll = Poll::new().map_err(|e| io_err("epoll", e))?;
    poll.registry()
        .register(&mut lst, Token(usize::MAX), Interest::READABLE)
        .map_err(|e| io_err("epoll register", e))?;
    let job = Acceptor {
        rank,
        size,
        comm_id,
        deadline,
        sockbuf,
        secret,
        lanes,
    };
    // Each connection is authenticated on a thread of its own, so silent or
    // slow strangers (each held at most HANDSHAKE_LIMIT) delay no rank.
    std::thread::scope(|sc| job.run(sc, &mut lst, &mut poll, stop))
}

/// What [`accept_all`]'s handshakes check a connection against.
struct Acceptor<'a> {
    rank: usize,
    size: usize,
    comm_id: u64,
    deadline: Instant,
    sockbuf: usize,
    secret: Option<&'a Secret>,
    lanes: usize,
}

/// A finished handshake: the peer's rank, connection and stream, or why not.
type Shook = (
    SocketAddr,
    std::result::Result<(usize, usize, std::net::TcpStream), String>,
);

/// Most handshakes in flight at once on one data listener; connections
/// beyond it are closed at once.
const MAX_HANDSHAKES: usize = 1024;

impl<'a> Acceptor<'a> {
    fn run<'s>(
        &'s self,
        sc: &'s std::thread::Scope<'s, '_>,
        lst: &mut TcpListener,
        poll: &mut Poll,
        stop: &AtomicBool,
    ) -> Result<Vec<Vec<(std::net::TcpStream, SocketAddr)>>> {
        let (rank, size, lanes) = (self.rank, self.size, self.lanes);
        let mut rx: Vec<Vec<Option<(std::net::TcpStream, SocketAddr)>>> = (0..size)
            .map(|_| (0..lanes).map(|_| None).collect())
            .collect();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Shook>();
        let mut events = Events::with_capacity(64);
        let mut missing = (size - 1) * lanes;
        let mut in_flight = 0usize;
        while missing > 0 {
            while let Ok((from, res)) = done_rx.try_recv() {
                in_flight -= 1;
                match res {
                    Ok((j, lane, stream)) if rx[j][lane].is_none() => {
                        rx[j][lane] = Some((stream, from));
                        missing -= 1;
                    }
                    Ok((j, lane, _)) => eprintln!(
                        "kolo: rank {rank}: dropped connection from {from}: a second claim \
                         of rank {j} (connection {lane})"
                    ),
                    Err(e) => eprintln!("kolo: rank {rank}: dropped connection from {from}: {e}"),
                }
            }
            if missing == 0 {
                break;
            }
            match lst.accept() {
                Ok((s, from)) if in_flight >= MAX_HANDSHAKES => {
                    drop(s);
                    eprintln!(
                        "kolo: rank {rank}: dropped connection from {from}: {MAX_HANDSHAKES} \
                         handshakes already in progress"
                    );
                }
                Ok((s, from)) => {
                    let taken: Vec<Vec<bool>> = rx
                        .iter()
                        .map(|r| r.iter().map(Option::is_some).collect())
                        .collect();
                    let tx = done_tx.clone();
                    in_flight += 1;
                    let spawned = std::thread::Builder::new()
                        .name("kolo-handshake".into())
                        .spawn_scoped(sc, move || {
                            let _ = tx.send((from, self.hello(s, &taken)));
                        });
                    if let Err(e) = spawned {
                        in_flight -= 1;
                        eprintln!("kolo: rank {rank}: dropped connection from {from}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.nap(poll, &mut events, stop, &rx)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("accept", e)),
            }
        }
        Ok(rx
            .into_iter()
            .map(|r| r.into_iter().flatten().collect())
            .collect())
    }

    fn hello(
        &self,
        s: TcpStream,
        taken: &[Vec<bool>],
    ) -> std::result::Result<(usize, usize, std::net::TcpStream), String> {
        accept_hello(
            s,
            self.rank,
            self.comm_id,
            self.size,
            taken,
            self.deadline,
            self.sockbuf,
            self.secret,
            self.lanes,
        )
    }

    /// Sleep until the listener is ready or 20 ms pass (finished handshakes
    /// and `stop` are looked at that often); an error at the deadline.
    fn nap(
        &self,
        poll: &mut Poll,
        events: &mut Events,
        stop: &AtomicBool,
        rx: &[Vec<Option<(std::net::TcpStream, SocketAddr)>>],
    ) -> Result<()> {
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) {
            return Err(Error::Io(format!("rank {}: stopped accepting", self.rank)));
        }
        if now >= self.deadline {
            let waiting: Vec<String> = (0..self.size)
                .filter(|&j| j != self.rank && rx[j].iter().any(Option::is_none))
                .map(|j| j.to_string())
                .collect();
            return Err(Error::Timeout {
                rank: self.rank,
                op: "connect".into(),
                waited: Duration::ZERO,
                detail: format!("ranks {} never connected", waiting.join(", ")),
                hung: None,
            });
        }
        let nap = (self.deadline - now).min(Duration::from_millis(20));
        match poll.poll(events, Some(nap)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(io_err("epoll wait", e)),
        }
    }
}

/// The longest one incoming connection may take to authenticate: a silent or
/// slow stranger holds the acceptor at most this long.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(2);

/// Run the server side of the handshake on an accepted connection; the
/// caller's rank once it has proved it shares the secret and names this job.
#[allow(clippy::too_many_arguments)]
fn accept_hello(
    s: TcpStream,
    rank: usize,
    comm_id: u64,
    size: usize,
    taken: &[Vec<bool>],
    deadline: Instant,
    sockbuf: usize,
    secret: Option<&Secret>,
    lanes: usize,
) -> std::result::Result<(usize, usize, std::net::TcpStream), String> {
    let s: std::net::TcpStream = s.into();
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    let until = deadline.min(Instant::now() + HANDSHAKE_LIMIT);
    let hello = auth::server(&mut auth::Timed::new(&s, until), secret, |h| {
        if h.purpose != auth::Purpose::Data {
            return Err("a rendezvous-store client, not a rank".into());
        }
        if h.comm_id != comm_id || h.size as usize != size {
            return Err(format!(
                "hello for job {:#x} of size {}, this job is {comm_id:#x} of size {size}",
                h.comm_id, h.size
            ));
        }
        if h.to as usize != rank {
            return Err(format!("hello for rank {}, this is rank {rank}", h.to));
        }
        let theirs = (h.lanes as usize).max(1);
        if theirs != lanes {
            return Err(format!(
                "rank {} uses KOLO_NSOCKS={theirs} connections per peer, this rank uses {lanes}",
                h.from
            ));
        }
        let from = h.from as usize;
        let lane = h.lane as usize;
        if from >= size || from == rank || lane >= lanes || taken[from][lane] {
            return Err(format!(
                "claims rank {from} (connection {lane}), which is taken or invalid"
            ));
        }
        Ok(())
    })
    .map_err(|f| f.to_string())?;
    s.set_read_timeout(None)
        .and_then(|_| s.set_write_timeout(None))
        .and_then(|_| tune(&s, sockbuf))
        .and_then(|_| s.set_nonblocking(true))
        .map_err(|e| e.to_string())?;
    Ok((hello.from as usize, hello.lane as usize, s))
}

/// An outgoing message: header then payload, written as far as the socket takes.
pub struct Outgoing {
    peer: usize,
    lane: usize,
    header: [u8; HEADER_LEN],
    done: usize,
    /// Whether the payload went through the peer's ring (decided at the
    /// first call, `None` before): then only the header is sent.
    shm: Option<bool>,
}

impl Outgoing {
    /// A message to `peer` with this encoded header.
    pub fn new(peer: usize, header: [u8; HEADER_LEN]) -> Outgoing {
        Outgoing {
            peer,
            lane: 0,
            header,
            done: 0,
            shm: None,
        }
    }
    /// The same message on connection `lane` (a stripe, see [`crate::exec`]).
    pub fn on_lane(mut self, lane: usize) -> Outgoing {
        self.lane = lane;
        self
    }
    /// The destination rank.
    pub fn peer(&self) -> usize {
        self.peer
    }
    /// The connection it goes on.
    pub fn lane(&self) -> usize {
        self.lane
    }
    /// Bytes (of the header and a payload of `len` bytes) still to send.
    pub fn remaining(&self, len: usize) -> usize {
        let len = if self.shm == Some(true) { 0 } else { len };
        HEADER_LEN + len - self.done
    }

    /// At the first call: put the payload in the peer's ring if it has one
    /// with room, and mark the header so. Whether the payload goes inline.
    fn inline(&mut self, t: &mut Transport, parts: &[&[u8]]) -> bool {
        let shm = *self
            .shm
            .get_or_insert_with(|| t.push_ring(self.peer, self.lane, parts));
        if shm && self.done == 0 {
            self.header[KIND_AT] = Kind::Shm as u8;
        }
        !shm
    }

    /// Write as much as the socket takes; true once everything is sent.
    pub fn progress(&mut self, t: &mut Transport, payload: &[u8]) -> io::Result<bool> {
        let payload = if self.inline(t, &[payload]) {
            payload
        } else {
            &[]
        };
        let total = HEADER_LEN + payload.len();
        while self.done < total {
            let n = if self.done < HEADER_LEN {
                t.send_on(
                    self.peer,
                    self.lane,
                    &[
                        IoSlice::new(&self.header[self.done..]),
                        IoSlice::new(payload),
                    ],
                )
            } else {
                t.send_on(
                    self.peer,
                    self.lane,
                    &[IoSlice::new(&payload[self.done - HEADER_LEN..])],
                )
            };
            match n {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "connection closed",
                    ))
                }
                Ok(n) => {
                    self.done += n;
                    t.set_out_mid(self.peer, self.lane, self.done < total);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Outgoing {
    /// [`Outgoing::progress`] for a payload in several parts (a fused
    /// allreduce sending from the tensors' own memory): one `writev` takes
    /// the header and up to [`MAX_PARTS`] parts.
    pub fn progress_parts(&mut self, t: &mut Transport, parts: &[&[u8]]) -> io::Result<bool> {
        let parts = if self.inline(t, parts) {
            parts
        } else {
            &[][..]
        };
        let total = HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut bufs: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_PARTS + 1);
        while self.done < total {
            bufs.clear();
            if self.done < HEADER_LEN {
                bufs.push(IoSlice::new(&self.header[self.done..]));
            }
            let mut skip = self.done.saturating_sub(HEADER_LEN);
            for p in parts {
                if bufs.len() > MAX_PARTS {
                    break;
                }
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                bufs.push(IoSlice::new(&p[skip..]));
                skip = 0;
            }
            match t.send_on(self.peer, self.lane, &bufs) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "connection closed",
                    ))
                }
                Ok(n) => {
                    self.done += n;
                    t.set_out_mid(self.peer, self.lane, self.done < total);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Most buffers one vectored send or receive of parts passes to the kernel
/// (well under the kernel's 1024).
pub const MAX_PARTS: usize = 256;

/// Why a receive failed, before the executor adds rank/op context.
#[derive(Debug)]
pub enum RecvError {
    /// The socket failed or closed.
    Io(io::Error),
    /// The peer sent a valid abort frame with this text.
    Aborted(String),
    /// The header does not match what this rank expects (`expected`, `got`).
    Mismatch(Header, Header),
    /// Not a kolo frame, or from another job.
    Protocol(String),
}

/// Payload bytes read in the same system call as the header: a small
/// message then costs one `readv` instead of a read for the header and
/// another for the payload (latency-bound collectives are all such calls).
/// They wait here until the header has been checked, so nothing from a
/// mismatched or aborting peer reaches the caller's buffer.
const STASH: usize = 256;

/// An incoming message: the header is read and checked against the
/// expected one, then the payload is handed out piece by piece.
pub struct Incoming {
    peer: usize,
    lane: usize,
    expect: Header,
    header: [u8; HEADER_LEN],
    got_header: usize,
    got: u64,
    stash: [u8; STASH],
    /// Bytes in `stash` (payload read along with the header), and how many
    /// of them were handed out.
    stash_len: usize,
    stash_out: usize,
    /// The header said [`Kind::Shm`]: the payload comes out of the ring.
    shm: bool,
}

impl Incoming {
    /// Expect a message from `peer` with exactly this header.
    pub fn new(peer: usize, expect: Header) -> Incoming {
        Incoming {
            peer,
            lane: 0,
            expect,
            header: [0; HEADER_LEN],
            got_header: 0,
            got: 0,
            stash: [0; STASH],
            stash_len: 0,
            stash_out: 0,
            shm: false,
        }
    }
    /// The same message, expected on connection `lane` (a stripe).
    pub fn on_lane(mut self, lane: usize) -> Incoming {
        self.lane = lane;
        self
    }
    /// The source rank.
    pub fn peer(&self) -> usize {
        self.peer
    }
    /// The connection it comes on.
    pub fn lane(&self) -> usize {
        self.lane
    }
    /// Payload bytes still expected.
    pub fn remaining(&self) -> usize {
        (self.expect.len - self.got) as usize
    }
    /// Whether the whole header has been read.
    pub fn has_header(&self) -> bool {
        self.got_header == HEADER_LEN
    }
    /// Whether any byte of this message has been read.
    pub fn started(&self) -> bool {
        self.got_header > 0
    }
    /// Whether the header is in and the whole payload delivered.
    pub fn is_done(&self) -> bool {
        self.got_header == HEADER_LEN && self.got == self.expect.len
    }

    /// Read the header if it is not complete; Ok(true) once it is in and valid.
    fn header(&mut self, t: &mut Transport) -> std::result::Result<bool, RecvError> {
        while self.got_header < HEADER_LEN {
            // Never more than the expected frame, so no byte of the next
            // frame is taken; nothing where the payload may be in a ring
            // (the bytes after the header are then the next frame's).
            let ahead = if t.has_ring(self.peer, self.lane, false) {
                0
            } else {
                (self.expect.len as usize).min(STASH)
            };
            let mut bufs = [
                io::IoSliceMut::new(&mut self.header[self.got_header..]),
                io::IoSliceMut::new(&mut self.stash[..ahead]),
            ];
            match t.recv_vectored_on(self.peer, self.lane, &mut bufs) {
                Ok(0) => {
                    return Err(RecvError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by peer",
                    )))
                }
                Ok(n) => {
                    let h = n.min(HEADER_LEN - self.got_header);
                    self.got_header += h;
                    self.stash_len = n - h;
                    t.set_in_mid(self.peer, self.lane, true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
        let h = Header::decode(&self.header).map_err(RecvError::Protocol)?;
        if h.comm_id != self.expect.comm_id {
            return Err(RecvError::Protocol(format!(
                "frame for communicator {:#x}, this one is {:#x}",
                h.comm_id, self.expect.comm_id
            )));
        }
        if h.kind == Kind::Abort {
            // The text's first bytes may have come with the header.
            let had = self.stash_len.min(h.len as usize);
            let text = read_abort_text(t, self.peer, self.lane, &self.stash[..had], h.len);
            return Err(RecvError::Aborted(text));
        }
        if h.seq != self.expect.seq || h.desc != self.expect.desc || h.len != self.expect.len {
            return Err(RecvError::Mismatch(self.expect, h));
        }
        if h.kind == Kind::Shm {
            if !t.has_ring(self.peer, self.lane, false) {
                return Err(RecvError::Protocol(
                    "a shared-memory frame, but this rank made no ring for that connection".into(),
                ));
            }
            // The frame on the connection ends with its header; its payload
            // starts on the ring's next line.
            self.shm = true;
            t.ring_frame_start(self.peer, self.lane);
            t.set_in_mid(self.peer, self.lane, false);
        }
        Ok(true)
    }

    /// Receive up to `dst.len()` payload bytes into `dst` (which the caller
    /// points at the next unreceived part). Returns how many arrived (0 when
    /// the socket has nothing now).
    pub fn progress(
        &mut self,
        t: &mut Transport,
        dst: &mut [u8],
    ) -> std::result::Result<usize, RecvError> {
        if self.got_header < HEADER_LEN && !self.header(t)? {
            return Ok(0);
        }
        let want = dst.len().min(self.remaining());
        if self.shm {
            t.pop_ring(self.peer, self.lane, &mut dst[..want])?;
            self.got += want as u64;
            return Ok(want);
        }
        let stashed = (self.stash_len - self.stash_out).min(want);
        dst[..stashed].copy_from_slice(&self.stash[self.stash_out..self.stash_out + stashed]);
        self.stash_out += stashed;
        let mut filled = stashed;
        while filled < want {
            match t.recv_on(self.peer, self.lane, &mut dst[filled..want]) {
                Ok(0) => {
                    return Err(RecvError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by peer",
                    )))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
        self.got += filled as u64;
        if self.is_done() {
            t.set_in_mid(self.peer, self.lane, false);
        }
        Ok(filled)
    }
}

impl Incoming {
    /// Consume the next `len` payload bytes by handing them to `f` where
    /// they lie, with their offset among the `len`, when the payload is in a
    /// shared-memory ring in pieces aligned to `align` (one, or two where
    /// the ring wraps; a reduction reads them there instead of from a
    /// copy). False, with nothing consumed, otherwise: the caller receives
    /// them the usual way.
    pub fn take_in_place(
        &mut self,
        t: &mut Transport,
        len: usize,
        align: usize,
        f: impl FnMut(&[u8], usize),
    ) -> std::result::Result<bool, RecvError> {
        if self.got_header < HEADER_LEN && !self.header(t)? {
            return Ok(false);
        }
        if !self.shm || len == 0 || len > self.remaining() {
            return Ok(false);
        }
        let taken = t.use_ring(self.peer, self.lane, len, align, f)?;
        if taken {
            self.got += len as u64;
        }
        Ok(taken)
    }

    /// [`Incoming::progress`] into several parts in order (a fused allreduce
    /// receiving into the tensors' own memory), at most the payload still
    /// expected; one `readv` per call. Returns how many bytes arrived.
    pub fn progress_parts(
        &mut self,
        t: &mut Transport,
        parts: &mut [&mut [u8]],
    ) -> std::result::Result<usize, RecvError> {
        if self.got_header < HEADER_LEN && !self.header(t)? {
            return Ok(0);
        }
        let want: usize = parts.iter().map(|p| p.len()).sum();
        assert!(want <= self.remaining(), "receive parts exceed the message");
        if self.shm {
            for p in parts.iter_mut() {
                t.pop_ring(self.peer, self.lane, p)?;
            }
            self.got += want as u64;
            return Ok(want);
        }
        // Bytes that came with the header first.
        let mut filled = 0;
        let mut stashed = self.stash_len - self.stash_out;
        for p in parts.iter_mut() {
            if stashed == 0 {
                break;
            }
            let k = stashed.min(p.len());
            p[..k].copy_from_slice(&self.stash[self.stash_out..self.stash_out + k]);
            self.stash_out += k;
            stashed -= k;
            filled += k;
        }
        if filled == 0 && want > 0 {
            let mut bufs: Vec<io::IoSliceMut<'_>> =
                parts.iter_mut().map(|p| io::IoSliceMut::new(p)).collect();
            loop {
                match t.recv_vectored_on(self.peer, self.lane, &mut bufs) {
                    Ok(0) => {
                        return Err(RecvError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed by peer",
                        )))
                    }
                    Ok(n) => filled = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(RecvError::Io(e)),
                }
                break;
            }
        }
        self.got += filled as u64;
        if self.is_done() {
            t.set_in_mid(self.peer, self.lane, false);
        }
        Ok(filled)
    }
}

/// Read an abort frame's text of `len` bytes from connection `lane`, of
/// which `had` came with the header, waiting at most a moment for the rest.
fn read_abort_text(t: &mut Transport, peer: usize, lane: usize, had: &[u8], len: u64) -> String {
    let mut buf = vec![0u8; len as usize];
    buf[..had.len()].copy_from_slice(had);
    let deadline = Instant::now() + Duration::from_millis(500);
    let got = read_until(
        |b| t.recv_on(peer, lane, b),
        &mut buf[had.len()..],
        deadline,
        Duration::ZERO,
    );
    let text = String::from_utf8_lossy(&buf[..had.len() + got]).into_owned();
    t.heard.borrow_mut().push((peer, text.clone()));
    text
}

/// Fill `buf` from a non-blocking `read` until it is full, the stream ends or
/// fails, or `deadline` passes, napping `nap` (zero: yielding) while nothing
/// has arrived; the bytes read. For the short abort messages read outside a
/// collective, where waiting a moment is fine and an epoll set is not at hand.
fn read_until(
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    buf: &mut [u8],
    deadline: Instant,
    nap: Duration,
) -> usize {
    let mut got = 0;
    while got < buf.len() && Instant::now() < deadline {
        match read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if nap.is_zero() {
                    std::thread::yield_now()
                } else {
                    std::thread::sleep(nap)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;
    use frame::Desc;

    /// Ranks 0 and 1 connected in-process over loopback.
    fn pair() -> (Transport, Transport) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let l0 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let a = addrs.clone();
        let t1 = std::thread::spawn(move || {
            Transport::establish(1, 2, 7, l1, &a, deadline, 0, None).unwrap()
        });
        let t0 = Transport::establish(0, 2, 7, l0, &addrs, deadline, 0, None).unwrap();
        (t0, t1.join().unwrap())
    }

    fn header(len: usize) -> Header {
        Header {
            kind: Kind::Data,
            desc: Desc {
                count: len as u64,
                ..Desc::default()
            },
            comm_id: 7,
            seq: 1,
            len: len as u64,
        }
    }

    fn send(t: &mut Transport, peer: usize, lane: usize, payload: &[u8]) {
        let mut out = Outgoing::new(peer, header(payload.len()).encode()).on_lane(lane);
        while !out.progress(t, payload).unwrap() {
            std::thread::yield_now();
        }
    }

    /// Wait until a whole header from `peer` is there on `lane`.
    fn arrived(t: &Transport, peer: usize, lane: usize) -> Option<Header> {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Some(h) = t.peek_header(peer, lane) {
                return Some(h.unwrap());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn small_frames_share_the_lower_ranks_connection_both_ways() {
        let (mut t0, mut t1) = pair();
        assert!(t0.duplex_apart(1) && !t1.duplex_apart(0));
        // The higher rank's small frame comes on the connection rank 0 dialed...
        send(&mut t1, 0, DUPLEX, &[1; 8]);
        assert_eq!(arrived(&t0, 1, DUPLEX).map(|h| h.len), Some(8));
        // ...not on the one rank 1 dialed, which only bulk data uses.
        assert!(t0.peek_header(1, 0).is_none());
        send(&mut t1, 0, 0, &[2; 16]);
        assert_eq!(arrived(&t0, 1, 0).map(|h| h.len), Some(16));
        // Partly read, then complete: the connection is mid-frame in between.
        let mut inc = Incoming::new(1, header(8)).on_lane(DUPLEX);
        let mut one = [0u8; 1];
        assert_eq!(inc.progress(&mut t0, &mut one).unwrap(), 1);
        assert!(t0.in_mid(1, DUPLEX) && !t0.in_mid(1, 0));
        let mut rest = [0u8; 7];
        let until = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        while got < 7 && Instant::now() < until {
            got += inc.progress(&mut t0, &mut rest[got..]).unwrap();
        }
        assert_eq!((one[0], rest), (1, [1; 7]));
        assert!(!t0.in_mid(1, DUPLEX));
        // The lower rank's small frame goes the same way back.
        send(&mut t0, 1, DUPLEX, &[3; 8]);
        assert_eq!(arrived(&t1, 0, DUPLEX).map(|h| h.len), Some(8));
        assert_eq!(
            arrived(&t1, 0, 0).map(|h| h.len),
            Some(8),
            "one connection for rank 1"
        );
    }

    #[test]
    fn a_back_channel_abort_behind_small_frames_is_found() {
        let (mut t0, mut t1) = pair();
        // Rank 1 sends two small frames rank 0 never reads, then gives up.
        send(&mut t1, 0, DUPLEX, &[1; 8]);
        send(&mut t1, 0, DUPLEX, &[2; 300]);
        t1.send_aborts(Desc::default(), 1, "rank 1 gave up");
        let text = t0.back_abort(1, Duration::from_secs(5));
        assert_eq!(text.as_deref(), Some("rank 1 gave up"));
        // And on the one-way connection, behind nothing, the same text.
        assert_eq!(t0.pending_abort(1).as_deref(), Some("rank 1 gave up"));
    }

    #[test]
    fn polled_back_aborts_skip_small_frames_but_not_a_partly_read_one() {
        let (mut t0, mut t1) = pair();
        // A small frame whose payload, past what a header read takes along,
        // looks like an abort frame.
        let fake = Header {
            kind: Kind::Abort,
            len: 4,
            ..header(0)
        };
        let mut payload = vec![0u8; STASH];
        payload.extend_from_slice(&fake.encode());
        payload.extend_from_slice(b"fake");
        send(&mut t1, 0, DUPLEX, &payload);
        let mut inc = Incoming::new(1, header(payload.len())).on_lane(DUPLEX);
        let mut got = vec![0u8; payload.len()];
        let until = Instant::now() + Duration::from_secs(5);
        while inc.progress(&mut t0, &mut got[..1]).unwrap() == 0 {
            assert!(Instant::now() < until);
        }
        t1.send_aborts(Desc::default(), 1, "stop");
        std::thread::sleep(Duration::from_millis(50));
        // Mid-frame: the next bytes are payload, whatever they look like.
        assert!(t0.poll_back_aborts().is_empty());
        let mut at = 1;
        while at < got.len() {
            at += inc.progress(&mut t0, &mut got[at..]).unwrap();
            assert!(Instant::now() < until);
        }
        assert_eq!(got, payload);
        assert_eq!(t0.poll_back_aborts(), vec![(1, "stop".to_string())]);
    }

    #[test]
    fn an_abort_read_by_a_receive_is_remembered_for_the_chain_of_waits() {
        let (mut t0, mut t1) = pair();
        t1.send_aborts(Desc::default(), 1, "rank 1: waits on rank 2");
        // Rank 0 expects a small frame on DUPLEX (its back channel to rank 1)
        // and reads the abort there; the other copy is then still on lane 0.
        let mut inc = Incoming::new(1, header(8)).on_lane(DUPLEX);
        let mut got = [0u8; 8];
        let until = Instant::now() + Duration::from_secs(5);
        let text = loop {
            match inc.progress(&mut t0, &mut got) {
                Err(RecvError::Aborted(text)) => break text,
                Ok(0) => assert!(Instant::now() < until),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(text, "rank 1: waits on rank 2");
        // The back channel has nothing left, but the text is not lost.
        assert!(t0.poll_back_aborts().is_empty());
        assert_eq!(t0.aborts_heard(), vec![(1, text)]);
        assert!(t0.aborts_heard().is_empty());
    }
}
