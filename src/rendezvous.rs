//! Rendezvous: a small TCP key-value store that rank 0 (or the launcher) serves.
//!
//! Ranks use it once at start-up to publish their listen addresses and learn
//! everyone else's, so it favours robustness over speed: every connection
//! starts with the authenticated handshake of [`crate::auth`] (nothing is read
//! from a client before it has proved it holds the job secret), every frame is
//! length-prefixed and checked (magic, version, per-command size caps), a bad
//! frame or failed handshake closes only that connection (with one logged
//! line), and every client-side wait is bounded by a deadline.
//!
//! # Wire format
//!
//! After the handshake ([`crate::auth`]: hello, challenge, proof, verdict),
//! request and reply frames share a 10-byte header, all integers big-endian:
//!
//! ```text
//! magic "KRDV" (4) | version 1 (1) | command or status (1) | body length u32 (4) | body
//! ```
//!
//! Strings and blobs inside a body are `u32 length | bytes`.
//!
//! | command | request body                              | OK reply body              |
//! |---------|-------------------------------------------|----------------------------|
//! | SET 1   | key, value                                | empty                      |
//! | GET 2   | key, timeout_ms u64                       | value (raw, whole body)    |
//! | ADD 3   | key, delta i64                            | new value i64              |
//! | WAIT 4  | timeout_ms u64, count u32, count × key, [abort key] | count × value    |
//!
//! Reply statuses: 0 OK, 1 NOT FOUND (GET: empty body; WAIT: count u32 and the
//! missing keys), 2 ERROR (body is a UTF-8 message), 3 ABORTED (WAIT with an
//! abort key only: that key exists, and the body is its value, raw).
//!
//! A WAIT naming an abort key returns as soon as that key exists, whether or
//! not the awaited keys do: rendezvous uses it so that the rank serving the
//! store can tell every waiting rank why start-up failed before it exits.
//!
//! ```
//! use kolo::rendezvous::{StoreClient, StoreServer};
//! use std::time::{Duration, Instant};
//! let server = StoreServer::bind("127.0.0.1:0")?;
//! let deadline = Instant::now() + Duration::from_secs(5);
//! let mut c = StoreClient::connect(&server.local_addr().to_string(), 0, deadline)?;
//! c.set("greeting", b"hello")?;
//! assert_eq!(c.get("greeting", deadline)?, b"hello");
//! assert_eq!(c.add("counter", 2)?, 2);
//! # Ok::<(), kolo::Error>(())
//! ```
use crate::auth::{self, Secret};
use crate::error::{Error, Result};
use bytes::{Buf, BufMut, BytesMut};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First bytes of every frame; anything else is not a kolo store peer.
const MAGIC: &[u8; 4] = b"KRDV";
/// Protocol version; bumped on any incompatible change.
const VERSION: u8 = 1;
const HEADER_LEN: usize = 10;

const CMD_SET: u8 = 1;
const CMD_GET: u8 = 2;
const CMD_ADD: u8 = 3;
const CMD_WAIT: u8 = 4;

const ST_OK: u8 = 0;
const ST_NOT_FOUND: u8 = 1;
const ST_ERROR: u8 = 2;
const ST_ABORTED: u8 = 3;

/// Longest key the store accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value the store accepts, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most keys one WAIT may name; [`StoreClient::wait_all`] splits longer lists.
pub const MAX_WAIT_KEYS: usize = 65536;

/// Largest reply the client will read (values are capped, so this only guards
/// against a confused peer).
const MAX_REPLY_BYTES: usize = 1 << 30;
/// Most bytes (keys and values) the store holds, and so the largest reply it
/// builds: a job's rendezvous needs kilobytes per rank, and an authenticated
/// but hostile client must not make the server grow without bound.
pub const MAX_STORE_BYTES: usize = 64 << 20;
/// Server-side cap on GET/WAIT timeouts so `Instant + timeout` cannot overflow.
const MAX_SERVER_WAIT: Duration = Duration::from_secs(24 * 3600);
/// How long a new connection has to complete the handshake, in all.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections that may be in their handshake at once; more are closed
/// at once, so strangers cannot make the store start unbounded threads.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Most clients connected at once (a thread each): far more than ranks of
/// any job, far fewer than would exhaust the server's threads.
const MAX_CLIENTS: usize = 16384;
/// How long the server gives a client to finish a frame it has started, or
/// to take a reply.
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bodies are read in chunks of at most this size, so a length prefix alone
/// never makes anyone allocate more than this.
const READ_CHUNK: usize = 64 * 1024;
/// Extra time a client waits for a reply beyond the timeout it gave the server.
const REPLY_GRACE: Duration = Duration::from_secs(2);
/// After a rendezvous times out on the rank serving the store, the longest it
/// keeps the store up for the other ranks to read the verdict and disconnect.
const VERDICT_LINGER: Duration = Duration::from_secs(2);

fn max_body(cmd: u8) -> Option<usize> {
    let key = 4 + MAX_KEY_BYTES;
    match cmd {
        CMD_SET => Some(key + 4 + MAX_VALUE_BYTES),
        CMD_GET | CMD_ADD => Some(key + 8),
        CMD_WAIT => Some(8 + 4 + MAX_WAIT_KEYS * key + key),
        _ => None,
    }
}

fn error_reply(m: &str) -> BytesMut {
    let mut b = header(ST_ERROR, m.len());
    b.put_slice(m.as_bytes());
    b
}

/// A reply header. Bodies are bounded by [`MAX_STORE_BYTES`] plus the keys
/// of one request, far below the 32-bit length field.
fn header(code: u8, body_len: usize) -> BytesMut {
    debug_assert!(body_len <= u32::MAX as usize);
    let mut b = BytesMut::with_capacity(HEADER_LEN + body_len);
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(code);
    b.put_u32(body_len as u32);
    b
}

fn put_blob(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

/// Parse a header; returns (code, body length).
fn parse_header(h: &[u8; HEADER_LEN]) -> std::result::Result<(u8, usize), String> {
    if &h[..4] != MAGIC {
        return Err(format!(
            "bad magic {:02x?} (not a kolo store client?)",
            &h[..4]
        ));
    }
    if h[4] != VERSION {
        return Err(format!(
            "protocol version {} (this store speaks {VERSION})",
            h[4]
        ));
    }
    let len = u32::from_be_bytes([h[6], h[7], h[8], h[9]]) as usize;
    Ok((h[5], len))
}

/// Read exactly `len` bytes, growing the buffer only as data arrives.
fn read_body(r: &mut impl Read, len: usize) -> io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len.min(READ_CHUNK));
    let mut chunk = [0u8; 8192];
    while buf.len() < len {
        let want = (len - buf.len()).min(chunk.len());
        let n = r.read(&mut chunk[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-frame",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

fn get_blob(b: &mut BytesMut, max: usize, what: &str) -> std::result::Result<Vec<u8>, String> {
    if b.remaining() < 4 {
        return Err(format!("truncated {what} length"));
    }
    let n = b.get_u32() as usize;
    if n > max {
        return Err(format!("{what} of {n} bytes exceeds the limit of {max}"));
    }
    if b.remaining() < n {
        return Err(format!("truncated {what}"));
    }
    Ok(b.split_to(n).to_vec())
}

fn get_key(b: &mut BytesMut) -> std::result::Result<String, String> {
    let k = get_blob(b, MAX_KEY_BYTES, "key")?;
    String::from_utf8(k).map_err(|_| "key is not UTF-8".to_string())
}

fn get_u64(b: &mut BytesMut, what: &str) -> std::result::Result<u64, String> {
    if b.remaining() < 8 {
        return Err(format!("truncated {what}"));
    }
    Ok(b.get_u64())
}

/// A decoded request.
enum Request {
    Set(String, Vec<u8>),
    Get(String, Duration),
    Add(String, i64),
    /// Keys, timeout, and an optional abort key that ends the wait early.
    Wait(Vec<String>, Duration, Option<String>),
}

fn decode_request(cmd: u8, mut b: BytesMut) -> std::result::Result<Request, String> {
    let ms = |v: u64| Duration::from_millis(v).min(MAX_SERVER_WAIT);
    let req = match cmd {
        CMD_SET => {
            let k = get_key(&mut b)?;
            let v = get_blob(&mut b, MAX_VALUE_BYTES, "value")?;
            Request::Set(k, v)
        }
        CMD_GET => {
            let k = get_key(&mut b)?;
            Request::Get(k, ms(get_u64(&mut b, "timeout")?))
        }
        CMD_ADD => {
            let k = get_key(&mut b)?;
            Request::Add(k, get_u64(&mut b, "delta")? as i64)
        }
        CMD_WAIT => {
            let t = ms(get_u64(&mut b, "timeout")?);
            if b.remaining() < 4 {
                return Err("truncated key count".into());
            }
            let n = b.get_u32() as usize;
            if n > MAX_WAIT_KEYS {
                return Err(format!(
                    "WAIT for {n} keys exceeds the limit of {MAX_WAIT_KEYS}"
                ));
            }
            let mut keys = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                keys.push(get_key(&mut b)?);
            }
            let abort = if b.has_remaining() {
                Some(get_key(&mut b)?)
            } else {
                None
            };
            Request::Wait(keys, t, abort)
        }
        other => return Err(format!("unknown command {other}")),
    };
    if b.has_remaining() {
        return Err(format!(
            "{} trailing bytes after command {cmd}",
            b.remaining()
        ));
    }
    Ok(req)
}

/// State shared by the server's threads.
struct Shared {
    data: Mutex<HashMap<String, Vec<u8>>>,
    /// Bytes of keys and values in `data`, kept within [`MAX_STORE_BYTES`].
    held: AtomicUsize,
    changed: Condvar,
    shutdown: AtomicBool,
    /// Clones of every open client socket, so `Drop` can unblock their readers.
    conns: Mutex<HashMap<u64, TcpStream>>,
    /// Signalled whenever a connection is removed from `conns`.
    conns_changed: Condvar,
    handlers: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    /// The job secret every client must prove it holds.
    secret: Option<Secret>,
    /// Connections accepted whose handshake has not finished.
    pending: AtomicUsize,
    /// Of `pending`, per source address.
    pending_from: Mutex<HashMap<std::net::IpAddr, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler must not take the whole store down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Block until `ready` returns Some, the timeout passes, or shutdown.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&HashMap<String, Vec<u8>>) -> std::result::Result<T, ()>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut data = lock(&self.data);
        loop {
            if let Ok(v) = ready(&data) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline || self.shutdown.load(Ordering::SeqCst) {
                return None;
            }
            data = self
                .changed
                .wait_timeout(data, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Account for `key` taking a value of `len` bytes (replacing its old
    /// one), or say why the store has no room for it.
    fn make_room(
        &self,
        data: &HashMap<String, Vec<u8>>,
        key: &str,
        len: usize,
    ) -> std::result::Result<(), String> {
        let old = data.get(key).map_or(0, |v| key.len() + v.len());
        let held = self.held.load(Ordering::Relaxed) - old;
        let want = held + key.len() + len;
        if want > MAX_STORE_BYTES {
            return Err(format!(
                "store full: {key:?} would bring it to {want} bytes (limit {MAX_STORE_BYTES})"
            ));
        }
        self.held.store(want, Ordering::Relaxed);
        Ok(())
    }

    fn execute(&self, req: Request) -> BytesMut {
        match req {
            Request::Set(k, v) => {
                let mut data = lock(&self.data);
                if let Err(m) = self.make_room(&data, &k, v.len()) {
                    return error_reply(&m);
                }
                data.insert(k, v);
                drop(data);
                self.changed.notify_all();
                header(ST_OK, 0)
            }
            Request::Get(k, t) => match self.wait_for(t, |d| d.get(&k).cloned().ok_or(())) {
                Some(v) => {
                    let mut b = header(ST_OK, v.len());
                    b.put_slice(&v);
                    b
                }
                None => header(ST_NOT_FOUND, 0),
            },
            Request::Add(k, delta) => {
                let mut data = lock(&self.data);
                let old = match data.get(&k) {
                    None => Ok(0i64),
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                        .ok_or_else(|| format!("ADD {k:?}: the stored value is not an integer")),
                };
                let new = old.and_then(|o| {
                    o.checked_add(delta)
                        .ok_or_else(|| format!("ADD {k:?}: {o} + {delta} overflows i64"))
                });
                let new = new.and_then(|n| {
                    let v = n.to_string().into_bytes();
                    self.make_room(&data, &k, v.len()).map(|()| v)
                });
                match new {
                    Ok(v) => {
                        let n = std::str::from_utf8(&v).ok().and_then(|t| t.parse().ok());
                        data.insert(k, v);
                        drop(data);
                        self.changed.notify_all();
                        let mut b = header(ST_OK, 8);
                        b.put_i64(n.unwrap_or(0));
                        b
                    }
                    Err(m) => error_reply(&m),
                }
            }
            Request::Wait(keys, t, abort) => {
                // One value repeated in the reply is the cheapest amplification.
                let mut seen = std::collections::HashSet::with_capacity(keys.len());
                if let Some(k) = keys.iter().find(|k| !seen.insert(k.as_str())) {
                    return error_reply(&format!("WAIT names key {k:?} more than once"));
                }
                let got = self.wait_for(t, |d| {
                    // The abort key wins: once it is set the job is failing,
                    // even if the awaited keys appear as well.
                    if let Some(v) = abort.as_ref().and_then(|a| d.get(a)) {
                        return Ok(Err(v.clone()));
                    }
                    keys.iter()
                        .map(|k| d.get(k).cloned().ok_or(()))
                        .collect::<std::result::Result<Vec<_>, ()>>()
                        .map(Ok)
                });
                match got {
                    Some(Err(v)) => {
                        let mut b = header(ST_ABORTED, v.len());
                        b.put_slice(&v);
                        b
                    }
                    Some(Ok(values)) => {
                        let len = values.iter().map(|v| 4 + v.len()).sum();
                        let mut b = header(ST_OK, len);
                        for v in &values {
                            put_blob(&mut b, v);
                        }
                        b
                    }
                    None => {
                        let data = lock(&self.data);
                        let missing: Vec<&String> =
                            keys.iter().filter(|k| !data.contains_key(*k)).collect();
                        let len = 4 + missing.iter().map(|k| 4 + k.len()).sum::<usize>();
                        let mut b = header(ST_NOT_FOUND, len);
                        b.put_u32(missing.len() as u32);
                        for k in missing {
                            put_blob(&mut b, k.as_bytes());
                        }
                        b
                    }
                }
            }
        }
    }
}

/// Why a connection ended.
enum ConnEnd {
    /// Peer closed cleanly between frames, or the server is shutting down.
    Closed,
    /// I/O error (reset, timeout mid-frame).
    Io(io::Error),
    /// The peer sent something that is not a valid frame.
    Bad(String),
}

fn serve_conn(shared: &Shared, mut stream: TcpStream) -> ConnEnd {
    loop {
        let mut h = [0u8; HEADER_LEN];
        // Between frames a client may idle as long as it likes (it holds the
        // connection for the whole job); shutdown unblocks this read.
        if let Err(e) = stream.set_read_timeout(None) {
            return ConnEnd::Io(e);
        }
        match stream.read(&mut h[..1]) {
            Ok(0) => return ConnEnd::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return ConnEnd::Io(e),
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return ConnEnd::Closed;
        }
        // Once a frame has started, the whole of it must follow within one
        // deadline (not per read: a client trickling a byte at a time would
        // hold its thread for ever).
        let mut timed = auth::Timed::new(&stream, Instant::now() + FRAME_BODY_TIMEOUT);
        if let Err(e) = timed.read_exact(&mut h[1..]) {
            return ConnEnd::Io(e);
        }
        let (cmd, len) = match parse_header(&h) {
            Ok(x) => x,
            Err(m) => return ConnEnd::Bad(m),
        };
        match max_body(cmd) {
            None => return ConnEnd::Bad(format!("unknown command {cmd}")),
            Some(max) if len > max => {
                return ConnEnd::Bad(format!(
                    "frame of {len} bytes exceeds the limit of {max} for command {cmd}"
                ))
            }
            Some(_) => {}
        }
        let body = match read_body(&mut timed, len) {
            Ok(b) => b,
            Err(e) => return ConnEnd::Io(e),
        };
        let req = match decode_request(cmd, body) {
            Ok(r) => r,
            Err(m) => return ConnEnd::Bad(m),
        };
        let reply = shared.execute(req);
        if shared.shutdown.load(Ordering::SeqCst) {
            return ConnEnd::Closed;
        }
        // A client that does not read its reply is not waited for either.
        let mut timed = auth::Timed::new(&stream, Instant::now() + FRAME_BODY_TIMEOUT);
        if let Err(e) = timed.write_all(&reply) {
            return ConnEnd::Io(e);
        }
    }
}

/// Serves the store on a background thread until dropped.
///
/// One thread accepts connections (woken by a [`mio::Waker`] on drop), and
/// one thread per client serves its requests against a shared map. Dropping
/// the server wakes every waiter, closes every client connection and joins
/// all threads.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    waker: Arc<mio::Waker>,
    acceptor: Option<JoinHandle<()>>,
}

const LISTENER: mio::Token = mio::Token(0);
const WAKER: mio::Token = mio::Token(1);

impl StoreServer {
    /// Bind and start serving (`addr` like "0.0.0.0:29500" or "127.0.0.1:0")
    /// without a secret: clients are not authenticated (see [`StoreServer::bind_with`]).
    pub fn bind(addr: &str) -> Result<StoreServer> {
        StoreServer::bind_with(addr, None)
    }

    /// Bind and start serving; every client must prove it holds `secret`
    /// (the job's `KOLO_SECRET`) before any request is read.
    ///
    /// ```
    /// use kolo::auth::Secret;
    /// use kolo::rendezvous::{StoreClient, StoreServer};
    /// use std::time::{Duration, Instant};
    /// let server = StoreServer::bind_with("127.0.0.1:0", Secret::new("job-42"))?;
    /// let addr = server.local_addr().to_string();
    /// let deadline = Instant::now() + Duration::from_secs(5);
    /// let mut c = StoreClient::connect_with(&addr, 0, Secret::new("job-42").as_ref(), deadline)?;
    /// c.set("k", b"v")?;
    /// let wrong = StoreClient::connect_with(&addr, 1, Secret::new("guess").as_ref(), deadline);
    /// assert!(wrong.err().unwrap().to_string().contains("authentication failed"));
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn bind_with(addr: &str, secret: Option<Secret>) -> Result<StoreServer> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::Io(format!("cannot bind the rendezvous store to {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Io(format!("store listener on {addr}: {e}")))?;
        let io_err = |e: io::Error| Error::Io(format!("store on {local}: {e}"));
        listener.set_nonblocking(true).map_err(io_err)?;
        let mut listener = mio::net::TcpListener::from_std(listener);
        let poll = mio::Poll::new().map_err(io_err)?;
        poll.registry()
            .register(&mut listener, LISTENER, mio::Interest::READABLE)
            .map_err(io_err)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).map_err(io_err)?);
        let shared = Arc::new(Shared {
            data: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            conns_changed: Condvar::new(),
            handlers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            secret,
            pending: AtomicUsize::new(0),
            pending_from: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("kolo-store-accept".into())
            .spawn(move || accept_loop(poll, listener, sh))
            .map_err(io_err)?;
        Ok(StoreServer {
            addr: local,
            shared,
            waker,
            acceptor: Some(acceptor),
        })
    }
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Set `key` directly, waking every GET/WAIT that waits on it.
    /// The value of `key` as this server holds it, without a client: the
    /// launcher reads the ranks' diagnoses ([`crate::report`]) this way.
    ///
    /// ```
    /// let s = kolo::rendezvous::StoreServer::bind("127.0.0.1:0")?;
    /// assert_eq!(s.peek("kolo/diag/0"), None);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn peek(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.shared.data).get(key).cloned()
    }

    /// The server's own entries (verdicts, the abort key): always stored,
    /// and counted like a client's.
    fn put(&self, key: &str, value: &[u8]) {
        let mut data = lock(&self.shared.data);
        let old = data.get(key).map_or(0, |v| key.len() + v.len());
        let held = self.shared.held.load(Ordering::Relaxed) - old;
        self.shared
            .held
            .store(held + key.len() + value.len(), Ordering::Relaxed);
        data.insert(key.to_string(), value.to_vec());
        drop(data);
        self.shared.changed.notify_all();
    }

    /// Block until every client connection except those from `except` (a
    /// client's local address) has closed, or until `until`.
    fn wait_for_clients_to_leave(&self, except: Option<SocketAddr>, until: Instant) {
        let mut conns = lock(&self.shared.conns);
        loop {
            let others = conns
                .values()
                .filter(|s| except.is_none() || s.peer_addr().ok() != except)
                .count();
            let now = Instant::now();
            if others == 0 || now >= until {
                return;
            }
            conns = self
                .shared
                .conns_changed
                .wait_timeout(conns, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Handshakes in flight from which new strangers start to be turned away at
/// random, more of them the fuller the table (OpenSSH's MaxStartups): a
/// flood of silent connections cannot take every slot, and a real client,
/// which retries, still gets through.
const EARLY_DROP_FROM: usize = 64;
/// Most handshakes in flight from one address.
const MAX_PENDING_PER_SOURCE: usize = 128;

/// Why a new connection is turned away before its handshake, given the
/// handshakes in flight in all and from its address; `None` to take it.
fn refuse_handshake(pending: usize, from_there: usize) -> Option<String> {
    if pending >= MAX_PENDING_HANDSHAKES {
        return Some(format!(
            "{MAX_PENDING_HANDSHAKES} connections are already in their handshake"
        ));
    }
    if from_there >= MAX_PENDING_PER_SOURCE {
        return Some(format!(
            "{from_there} connections from there are already in their handshake"
        ));
    }
    if pending >= EARLY_DROP_FROM {
        let mut r = [0u8; 2];
        let roll = getrandom::getrandom(&mut r).map_or(0, |()| u16::from_le_bytes(r) as usize);
        let span = MAX_PENDING_HANDSHAKES - EARLY_DROP_FROM;
        if roll % span < pending - EARLY_DROP_FROM {
            return Some(format!(
                "{pending} handshakes in flight: dropped early, at random"
            ));
        }
    }
    None
}

impl Shared {
    /// A connection's handshake ended (either way): free its slot.
    fn handshake_over(&self, ip: std::net::IpAddr) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let mut from = lock(&self.pending_from);
        if let Some(n) = from.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                from.remove(&ip);
            }
        }
    }
}

fn accept_loop(mut poll: mio::Poll, listener: mio::net::TcpListener, shared: Arc<Shared>) {
    let mut events = mio::Events::with_capacity(16);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("kolo store: poll failed, no longer accepting: {e}");
            return;
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: report, and try again on the next event
                    // rather than spinning.
                    eprintln!("kolo store: accept failed: {e}");
                    break;
                }
            };
            let stream = TcpStream::from(stream);
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let from_there = lock(&shared.pending_from)
                .get(&peer.ip())
                .copied()
                .unwrap_or(0);
            if let Some(why) = refuse_handshake(shared.pending.load(Ordering::SeqCst), from_there) {
                eprintln!("kolo store: closing connection from {peer}: {why}");
                continue;
            }
            if lock(&shared.conns).len() >= MAX_CLIENTS {
                eprintln!(
                    "kolo store: closing connection from {peer}: {MAX_CLIENTS} clients are \
                     already connected"
                );
                continue;
            }
            let _ = stream.set_nodelay(true);
            // Before the slot is taken: a failure here (out of descriptors)
            // must not leak one.
            let Ok(clone) = stream.try_clone() else {
                eprintln!("kolo store: closing connection from {peer}: cannot clone its socket");
                continue;
            };
            shared.pending.fetch_add(1, Ordering::SeqCst);
            *lock(&shared.pending_from).entry(peer.ip()).or_insert(0) += 1;
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            lock(&shared.conns).insert(id, clone);
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("kolo-store-conn".into())
                .spawn(move || {
                    let until = Instant::now() + HANDSHAKE_TIMEOUT;
                    let shook = auth::server(&mut auth::Timed::new(&stream, until), sh.secret.as_ref(), |h| {
                        if h.purpose == auth::Purpose::Store {
                            Ok(())
                        } else {
                            Err(format!("a data connection from rank {} (wrong port?)", h.from))
                        }
                    });
                    sh.handshake_over(peer.ip());
                    let end = match shook {
                        Ok(_) => serve_conn(&sh, stream),
                        // A closed or silent connection ends quietly at shutdown.
                        Err(_) if sh.shutdown.load(Ordering::SeqCst) => ConnEnd::Closed,
                        Err(f) => ConnEnd::Bad(f.to_string()),
                    };
                    match end {
                        ConnEnd::Bad(m) => eprintln!("kolo store: closing connection from {peer}: {m}"),
                        ConnEnd::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                            eprintln!(
                                "kolo store: closing connection from {peer}: frame not completed within {}s",
                                FRAME_BODY_TIMEOUT.as_secs()
                            )
                        }
                        ConnEnd::Io(_) | ConnEnd::Closed => {}
                    }
                    if let Some(s) = lock(&sh.conns).remove(&id) {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    sh.conns_changed.notify_all();
                });
            match spawned {
                Ok(h) => {
                    let mut hs = lock(&shared.handlers);
                    hs.retain(|h| !h.is_finished());
                    hs.push(h);
                }
                Err(e) => {
                    shared.handshake_over(peer.ip());
                    eprintln!("kolo store: cannot start a thread for {peer}: {e}");
                    if let Some(s) = lock(&shared.conns).remove(&id) {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // Wake GET/WAIT waiters (take the lock so none is between check and wait).
        drop(lock(&self.shared.data));
        self.shared.changed.notify_all();
        for (_, s) in lock(&self.shared.conns).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let handlers = std::mem::take(&mut *lock(&self.shared.handlers));
        for h in handlers {
            let _ = h.join();
        }
    }
}

/// A connection to the store.
///
/// Every request is bounded: `get` and [`StoreClient::wait_all`] by their
/// deadline, `set` and `add` by the operation timeout (the time the connect
/// deadline allowed, at least 10 s). After an I/O error the connection is
/// unusable and every later call fails naming the first error.
pub struct StoreClient {
    rank: usize,
    stream: TcpStream,
    addr: String,
    op_timeout: Duration,
    broken: Option<String>,
    /// Who serves the store ("rank 0"), for errors when it goes away.
    served_by: Option<String>,
}

/// Result of a WAIT.
#[derive(Debug)]
enum WaitOutcome {
    /// Every key's value, in order.
    Values(Vec<Vec<u8>>),
    /// The keys still missing at the deadline.
    Missing(Vec<String>),
    /// The abort key's value: it was set before every key was.
    Aborted(Vec<u8>),
}

impl StoreClient {
    /// Connect without a secret, retrying until `deadline` (the store may
    /// start after us); see [`StoreClient::connect_with`].
    pub fn connect(addr: &str, rank: usize, deadline: Instant) -> Result<StoreClient> {
        StoreClient::connect_with(addr, rank, None, deadline)
    }

    /// Connect, retrying until `deadline`, and prove to the store that this
    /// rank holds `secret` (and check that the store does). A store that does
    /// not share the secret fails at once with "authentication failed".
    pub fn connect_with(
        addr: &str,
        rank: usize,
        secret: Option<&Secret>,
        deadline: Instant,
    ) -> Result<StoreClient> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let last_err: String;
        loop {
            let attempt = match addr.to_socket_addrs() {
                Err(e) => Err(format!("cannot resolve: {e}")),
                Ok(addrs) => {
                    let mut err = "resolved to no address".to_string();
                    let mut ok = None;
                    for a in addrs {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let t = left.clamp(Duration::from_millis(10), Duration::from_secs(2));
                        let s = match TcpStream::connect_timeout(&a, t) {
                            Ok(s) => s,
                            Err(e) => {
                                err = format!("{a}: {e}");
                                continue;
                            }
                        };
                        let until = deadline.max(Instant::now() + HANDSHAKE_TIMEOUT);
                        let hello = auth::Hello {
                            purpose: auth::Purpose::Store,
                            has_key: false,
                            comm_id: 0,
                            from: rank as u32,
                            to: u32::MAX,
                            size: 0,
                            lane: 0,
                            lanes: 0,
                            nonce: [0; auth::NONCE_LEN],
                        };
                        let peer = format!("the store at {addr}");
                        match auth::client(&mut auth::Timed::new(&s, until), secret, hello, &peer) {
                            Ok(()) => {
                                ok = Some(s);
                                break;
                            }
                            // Try again: a store starting up or restarting.
                            Err(auth::Failure::Io(e)) => err = format!("{a}: handshake: {e}"),
                            Err(f) => {
                                return Err(Error::Rendezvous {
                                    rank,
                                    detail: f.to_string(),
                                })
                            }
                        }
                    }
                    ok.ok_or(err)
                }
            };
            match attempt {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let op_timeout = deadline
                        .saturating_duration_since(start)
                        .max(Duration::from_secs(10));
                    return Ok(StoreClient {
                        rank,
                        stream,
                        addr: addr.to_string(),
                        op_timeout,
                        broken: None,
                        served_by: None,
                    });
                }
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        last_err = e;
                        break;
                    }
                    std::thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
        Err(Error::Rendezvous {
            rank,
            detail: format!(
                "could not connect to the store at {addr} within {:.1}s (last error: {last_err}); \
                 is the launcher or rank 0 running and is KOLO_MASTER_ADDR/KOLO_MASTER_PORT right?",
                start.elapsed().as_secs_f64()
            ),
        })
    }

    /// The address this client connected to, as given to [`StoreClient::connect`].
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Name who serves the store (e.g. "rank 0"), so that an error after the
    /// store goes away can say whose failure it probably was.
    pub fn set_served_by(&mut self, who: &str) {
        self.served_by = Some(who.to_string());
    }

    fn err(&self, detail: String) -> Error {
        Error::Rendezvous {
            rank: self.rank,
            detail,
        }
    }

    /// Send one request and read its reply, all before `deadline`.
    fn request(&mut self, what: &str, frame: &[u8], deadline: Instant) -> Result<(u8, BytesMut)> {
        if let Some(b) = &self.broken {
            return Err(self.err(format!(
                "{what}: connection to the store at {} is unusable after: {b}",
                self.addr
            )));
        }
        match self.request_io(frame, deadline) {
            Ok(x) => Ok(x),
            Err(e) => {
                let gone = |why: &str| match &self.served_by {
                    Some(who) => format!(
                        "{what}: the store (served by {who} at {}) went away ({why}); \
                         {who} probably failed or timed out",
                        self.addr
                    ),
                    None => format!(
                        "{what}: the store at {} went away ({why}); the process serving it \
                         (the launcher or rank 0) probably failed or exited",
                        self.addr
                    ),
                };
                let detail = match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        format!(
                            "{what}: store at {}: no reply before the deadline",
                            self.addr
                        )
                    }
                    io::ErrorKind::UnexpectedEof => gone("connection closed"),
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe => gone(&e.to_string()),
                    _ => format!("{what}: store at {}: {e}", self.addr),
                };
                self.broken = Some(detail.clone());
                let _ = self.stream.shutdown(Shutdown::Both);
                Err(self.err(detail))
            }
        }
    }

    fn request_io(&mut self, frame: &[u8], deadline: Instant) -> io::Result<(u8, BytesMut)> {
        let left = || {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() {
                Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
            } else {
                Ok(d)
            }
        };
        self.stream.set_write_timeout(Some(left()?))?;
        self.stream.write_all(frame)?;
        self.stream.set_read_timeout(Some(left()?))?;
        let mut h = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut h)?;
        let (code, len) =
            parse_header(&h).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
        if len > MAX_REPLY_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply of {len} bytes exceeds the limit of {MAX_REPLY_BYTES}"),
            ));
        }
        self.stream.set_read_timeout(Some(left()?))?;
        let body = read_body(&mut self.stream, len)?;
        Ok((code, body))
    }

    fn check_key(&self, key: &str) -> Result<()> {
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::InvalidArgument(format!(
                "store key of {} bytes exceeds the limit of {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        Ok(())
    }

    fn status_error(&self, what: &str, code: u8, body: &[u8]) -> Error {
        if code == ST_ERROR {
            self.err(format!(
                "{what}: store at {}: {}",
                self.addr,
                String::from_utf8_lossy(body)
            ))
        } else {
            self.err(format!(
                "{what}: store at {} replied with unexpected status {code}",
                self.addr
            ))
        }
    }

    /// Set `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "store value of {} bytes exceeds the limit of {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let mut f = header(CMD_SET, 8 + key.len() + value.len());
        put_blob(&mut f, key.as_bytes());
        put_blob(&mut f, value);
        let what = format!("SET {key:?}");
        let (code, body) = self.request(&what, &f, Instant::now() + self.op_timeout)?;
        match code {
            ST_OK => Ok(()),
            c => Err(self.status_error(&what, c, &body)),
        }
    }
    /// Wait until `key` exists (or `deadline`) and return its value.
    pub fn get(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        self.check_key(key)?;
        let start = Instant::now();
        let wait = deadline.saturating_duration_since(start);
        let mut f = header(CMD_GET, 12 + key.len());
        put_blob(&mut f, key.as_bytes());
        f.put_u64(wait.as_millis() as u64);
        let what = format!("GET {key:?}");
        let (code, body) = self.request(&what, &f, start + wait + REPLY_GRACE)?;
        match code {
            ST_OK => Ok(body.to_vec()),
            ST_NOT_FOUND => Err(self.err(format!(
                "key {key:?} did not appear within {:.1}s (store at {})",
                wait.as_secs_f64(),
                self.addr
            ))),
            c => Err(self.status_error(&what, c, &body)),
        }
    }
    /// Atomically add `delta` to the integer at `key` (absent = 0); returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        self.check_key(key)?;
        let mut f = header(CMD_ADD, 12 + key.len());
        put_blob(&mut f, key.as_bytes());
        f.put_i64(delta);
        let what = format!("ADD {key:?}");
        let (code, mut body) = self.request(&what, &f, Instant::now() + self.op_timeout)?;
        match code {
            ST_OK if body.len() == 8 => Ok(body.get_i64()),
            c => Err(self.status_error(&what, c, &body)),
        }
    }

    /// One WAIT round trip for at most [`MAX_WAIT_KEYS`] keys, ended early
    /// when `abort` exists.
    fn wait_once(
        &mut self,
        keys: &[String],
        abort: Option<&str>,
        deadline: Instant,
    ) -> Result<WaitOutcome> {
        let start = Instant::now();
        let wait = deadline.saturating_duration_since(start);
        let len =
            12 + keys.iter().map(|k| 4 + k.len()).sum::<usize>() + abort.map_or(0, |a| 4 + a.len());
        let mut f = header(CMD_WAIT, len);
        f.put_u64(wait.as_millis() as u64);
        f.put_u32(keys.len() as u32);
        for k in keys {
            put_blob(&mut f, k.as_bytes());
        }
        if let Some(a) = abort {
            put_blob(&mut f, a.as_bytes());
        }
        let what = format!("WAIT for {} keys", keys.len());
        let (code, mut body) = self.request(&what, &f, start + wait + REPLY_GRACE)?;
        let bad = |s: &Self, m: String| {
            s.err(format!(
                "{what}: malformed reply from the store at {}: {m}",
                s.addr
            ))
        };
        match code {
            ST_OK => {
                let mut values = Vec::with_capacity(keys.len());
                for _ in keys {
                    values.push(
                        get_blob(&mut body, MAX_VALUE_BYTES, "value").map_err(|m| bad(self, m))?,
                    );
                }
                Ok(WaitOutcome::Values(values))
            }
            ST_ABORTED if abort.is_some() => Ok(WaitOutcome::Aborted(body.to_vec())),
            ST_NOT_FOUND => {
                if body.remaining() < 4 {
                    return Err(bad(self, "truncated count".into()));
                }
                let n = (body.get_u32() as usize).min(keys.len());
                let mut missing = Vec::with_capacity(n);
                for _ in 0..n {
                    missing.push(get_key(&mut body).map_err(|m| bad(self, m))?);
                }
                Ok(WaitOutcome::Missing(missing))
            }
            c => Err(self.status_error(&what, c, &body)),
        }
    }

    /// Wait for every key; the values, the keys still missing at `deadline`,
    /// or the value of `abort` as soon as that key exists.
    fn wait_outcome(
        &mut self,
        keys: &[String],
        abort: Option<&str>,
        deadline: Instant,
    ) -> Result<WaitOutcome> {
        for k in keys.iter().map(String::as_str).chain(abort) {
            self.check_key(k)?;
        }
        let mut values = Vec::with_capacity(keys.len());
        for (i, chunk) in keys.chunks(MAX_WAIT_KEYS).enumerate() {
            match self.wait_once(chunk, abort, deadline)? {
                WaitOutcome::Values(v) => values.extend(v),
                WaitOutcome::Aborted(v) => return Ok(WaitOutcome::Aborted(v)),
                WaitOutcome::Missing(mut missing) => {
                    // Report everything still missing, not just this chunk's.
                    let rest = &keys[((i + 1) * MAX_WAIT_KEYS).min(keys.len())..];
                    for c in rest.chunks(MAX_WAIT_KEYS) {
                        match self.wait_once(c, abort, Instant::now())? {
                            WaitOutcome::Values(_) => {}
                            WaitOutcome::Aborted(v) => return Ok(WaitOutcome::Aborted(v)),
                            WaitOutcome::Missing(m) => missing.extend(m),
                        }
                    }
                    return Ok(WaitOutcome::Missing(missing));
                }
            }
        }
        Ok(WaitOutcome::Values(values))
    }

    /// Wait until every key in `keys` exists and return their values in order.
    ///
    /// This is the barrier rendezvous is built on: each rank sets its own key
    /// and waits for all of them. On `deadline` the error names the missing
    /// keys, so a hung start-up says who is absent.
    ///
    /// ```
    /// # use kolo::rendezvous::{StoreClient, StoreServer};
    /// # use std::time::{Duration, Instant};
    /// # let server = StoreServer::bind("127.0.0.1:0")?;
    /// let deadline = Instant::now() + Duration::from_millis(200);
    /// let mut c = StoreClient::connect(&server.local_addr().to_string(), 0, deadline)?;
    /// c.set("a", b"1")?;
    /// let err = c.wait_all(&["a".into(), "b".into()], deadline).unwrap_err();
    /// assert!(err.to_string().contains("\"b\""));
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn wait_all(&mut self, keys: &[String], deadline: Instant) -> Result<Vec<Vec<u8>>> {
        let start = Instant::now();
        match self.wait_outcome(keys, None, deadline)? {
            WaitOutcome::Values(v) => Ok(v),
            WaitOutcome::Aborted(_) => unreachable!("no abort key given"),
            WaitOutcome::Missing(missing) => {
                const SHOWN: usize = 20;
                let mut list: Vec<String> = missing
                    .iter()
                    .take(SHOWN)
                    .map(|k| format!("{k:?}"))
                    .collect();
                if missing.len() > SHOWN {
                    list.push(format!("and {} more", missing.len() - SHOWN));
                }
                Err(self.err(format!(
                    "{} of {} keys missing after {:.1}s (store at {}): {}",
                    missing.len(),
                    keys.len(),
                    deadline.saturating_duration_since(start).as_secs_f64(),
                    self.addr,
                    list.join(", ")
                )))
            }
        }
    }
}

/// Decode `data` as one request frame the way the server does after the
/// handshake (header checks, size caps, body read, request decode); whether
/// it is valid. For the fuzz targets.
pub(crate) fn fuzz_request(data: &[u8]) -> bool {
    let Some(h) = data.get(..HEADER_LEN) else {
        return false;
    };
    let Ok((cmd, len)) = parse_header(h.try_into().expect("sliced to length")) else {
        return false;
    };
    match max_body(cmd) {
        Some(max) if len <= max => {}
        _ => return false,
    }
    let mut rest = &data[HEADER_LEN..];
    match read_body(&mut rest, len) {
        Ok(body) => decode_request(cmd, body).is_ok(),
        Err(_) => false,
    }
}

/// One valid request frame of each command, named, for fuzzing seeds.
pub(crate) fn sample_requests() -> Vec<(&'static str, Vec<u8>)> {
    let mut set = header(CMD_SET, 8 + 11 + 15);
    put_blob(&mut set, b"kolo/addr/0");
    put_blob(&mut set, b"127.0.0.1:40000");
    let mut get = header(CMD_GET, 12 + 12);
    put_blob(&mut get, b"kolo/comm_id");
    get.put_u64(60_000);
    let mut add = header(CMD_ADD, 12 + 5);
    put_blob(&mut add, b"count");
    add.put_i64(-3);
    let keys: [&[u8]; 2] = [b"kolo/addr/0", b"kolo/addr/1"];
    let mut wait = header(CMD_WAIT, 12 + 2 * 15);
    wait.put_u64(1000);
    wait.put_u32(2);
    for k in keys {
        put_blob(&mut wait, k);
    }
    let mut wait_abort = header(CMD_WAIT, 12 + 2 * 15 + 4 + 11);
    wait_abort.put_u64(1000);
    wait_abort.put_u32(2);
    for k in keys {
        put_blob(&mut wait_abort, k);
    }
    put_blob(&mut wait_abort, b"kolo/failed");
    vec![
        ("set", set.to_vec()),
        ("get", get.to_vec()),
        ("add", add.to_vec()),
        ("wait", wait.to_vec()),
        ("wait-abort", wait_abort.to_vec()),
    ]
}

/// Format a list of ranks compactly: "3, 5, 7-12".
fn rank_list(ranks: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        if j >= i + 2 {
            out.push(format!("{}-{}", ranks[i], ranks[j]));
        } else {
            out.extend(ranks[i..=j].iter().map(|r| r.to_string()));
        }
        i = j + 1;
    }
    out.join(", ")
}

/// Publish this rank's listen address under `prefix` and fetch every rank's;
/// on deadline the error lists the ranks that never arrived.
///
/// The wait also ends early, with the same verdict, when the rank serving the
/// store gave up first (see [`exchange_addresses_serving`]).
pub fn exchange_addresses(
    client: &mut StoreClient,
    prefix: &str,
    rank: usize,
    size: usize,
    mine: SocketAddr,
    deadline: Instant,
) -> Result<Vec<SocketAddr>> {
    exchange(client, None, prefix, rank, size, mine, deadline)
}

/// [`exchange_addresses`] for the rank that serves the store itself.
///
/// When the wait times out, the verdict (which ranks never arrived) is stored
/// under `{prefix}/failed`, which wakes every rank still waiting with that
/// verdict, and the store is kept up until they have disconnected (at most
/// 2 s) before the error is returned, so they do not merely see it vanish.
pub fn exchange_addresses_serving(
    client: &mut StoreClient,
    server: &StoreServer,
    prefix: &str,
    rank: usize,
    size: usize,
    mine: SocketAddr,
    deadline: Instant,
) -> Result<Vec<SocketAddr>> {
    exchange(client, Some(server), prefix, rank, size, mine, deadline)
}

fn exchange(
    client: &mut StoreClient,
    server: Option<&StoreServer>,
    prefix: &str,
    rank: usize,
    size: usize,
    mine: SocketAddr,
    deadline: Instant,
) -> Result<Vec<SocketAddr>> {
    if rank >= size {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} is not below size {size}"
        )));
    }
    let start = Instant::now();
    let key = |r: usize| format!("{prefix}/addr/{r}");
    client.set(&key(rank), mine.to_string().as_bytes())?;
    let keys: Vec<String> = (0..size).map(key).collect();
    let failed_key = format!("{prefix}/failed");
    match client.wait_outcome(&keys, Some(&failed_key), deadline)? {
        // Another rank's verdict, already phrased for the whole job.
        WaitOutcome::Aborted(verdict) => Err(Error::Rendezvous {
            rank,
            detail: String::from_utf8_lossy(&verdict).into_owned(),
        }),
        WaitOutcome::Values(values) => values
            .iter()
            .enumerate()
            .map(|(r, v)| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .ok_or_else(|| Error::Rendezvous {
                        rank,
                        detail: format!(
                            "rank {r} published {:?} under {}, which is not an address \
                             (two jobs sharing one store and prefix?)",
                            String::from_utf8_lossy(v),
                            key(r)
                        ),
                    })
            })
            .collect(),
        WaitOutcome::Missing(missing) => {
            let mut ranks: Vec<usize> = missing
                .iter()
                .filter_map(|k| k.rsplit('/').next().and_then(|r| r.parse().ok()))
                .collect();
            ranks.sort_unstable();
            let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
            let detail = format!(
                "{noun} {} of {size} never arrived within {:.1}s (store at {})",
                rank_list(&ranks),
                deadline.saturating_duration_since(start).as_secs_f64(),
                client.addr
            );
            if let Some(server) = server {
                // Tell the ranks still waiting why, and keep the store up
                // until they have read it (bounded).
                server.put(&failed_key, detail.as_bytes());
                let me = client.stream.local_addr().ok();
                server.wait_for_clients_to_leave(me, Instant::now() + VERDICT_LINGER);
            }
            Err(Error::Rendezvous { rank, detail })
        }
    }
}

/// Check that every rank has the same value of a setting that all ranks must
/// share (`name`, e.g. `KOLO_NSOCKS`): publish ours under `{prefix}/{name}/{rank}`
/// and read everyone's. Run after the address exchange, so every rank is
/// there and the wait is short. On a difference every rank returns the same
/// error, naming the values and the ranks holding each, at once: each would
/// otherwise wait for connections the others never make. `server`: this
/// rank serves the store, and keeps it up (at most 2 s) until the others
/// have read the values and left.
#[allow(clippy::too_many_arguments)]
pub fn agree(
    client: &mut StoreClient,
    server: Option<&StoreServer>,
    prefix: &str,
    name: &str,
    rank: usize,
    size: usize,
    value: u64,
    deadline: Instant,
) -> Result<()> {
    let key = |r: usize| format!("{prefix}/{name}/{r}");
    client.set(&key(rank), value.to_string().as_bytes())?;
    let keys: Vec<String> = (0..size).map(key).collect();
    let values = client.wait_all(&keys, deadline)?;
    // value -> ranks, in order of first appearance.
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (r, v) in values.iter().enumerate() {
        let v = String::from_utf8_lossy(v).into_owned();
        match groups.iter_mut().find(|(g, _)| *g == v) {
            Some((_, ranks)) => ranks.push(r),
            None => groups.push((v, vec![r])),
        }
    }
    if groups.len() == 1 {
        return Ok(());
    }
    let detail = groups
        .iter()
        .map(|(v, ranks)| {
            let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
            format!("{v} on {noun} {}", rank_list(ranks))
        })
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(server) = server {
        let me = client.stream.local_addr().ok();
        server.wait_for_clients_to_leave(me, Instant::now() + VERDICT_LINGER);
    }
    Err(Error::Config(format!(
        "rank {rank}: ranks disagree on {name}: {detail} (every rank must use the same)"
    )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn handshakes_are_refused_early_at_random_and_always_when_full() {
        use super::{refuse_handshake as refuse, *};
        assert!(refuse(0, 0).is_none());
        assert!(
            refuse(EARLY_DROP_FROM - 1, 0).is_none(),
            "below the threshold: all taken"
        );
        assert!(refuse(MAX_PENDING_HANDSHAKES, 0).is_some());
        assert!(
            refuse(10, MAX_PENDING_PER_SOURCE).is_some(),
            "one source's share is full"
        );
        // Halfway between the threshold and full, about half are dropped.
        let mid = (EARLY_DROP_FROM + MAX_PENDING_HANDSHAKES) / 2;
        let dropped = (0..2000).filter(|_| refuse(mid, 0).is_some()).count();
        assert!(
            (700..1300).contains(&dropped),
            "{dropped} of 2000 dropped at {mid}"
        );
        let near_full = (0..2000)
            .filter(|_| refuse(MAX_PENDING_HANDSHAKES - 2, 0).is_some())
            .count();
        assert!(near_full > 1900, "{near_full} of 2000 dropped near full");
    }

    use super::*;

    fn secs(s: f64) -> Instant {
        Instant::now() + Duration::from_secs_f64(s)
    }

    fn client(server: &StoreServer, rank: usize) -> StoreClient {
        StoreClient::connect(&server.local_addr().to_string(), rank, secs(5.0)).unwrap()
    }

    #[test]
    fn set_get_add_wait_across_threads() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let n = 6;
        let threads: Vec<_> = (0..n)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = StoreClient::connect(&addr, r, secs(5.0)).unwrap();
                    c.add("count", 1).unwrap();
                    c.set(&format!("k/{r}"), format!("v{r}").as_bytes())
                        .unwrap();
                    let keys: Vec<String> = (0..n).map(|i| format!("k/{i}")).collect();
                    let vals = c.wait_all(&keys, secs(5.0)).unwrap();
                    for (i, v) in vals.iter().enumerate() {
                        assert_eq!(v, format!("v{i}").as_bytes());
                    }
                    c.get(&format!("k/{}", (r + 1) % n), secs(5.0)).unwrap()
                })
            })
            .collect();
        for (r, t) in threads.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), format!("v{}", (r + 1) % n).as_bytes());
        }
        let mut c = client(&server, 0);
        assert_eq!(c.add("count", 0).unwrap(), n as i64);
        assert_eq!(c.add("count", -10).unwrap(), n as i64 - 10);
        assert_eq!(
            c.get("count", secs(1.0)).unwrap(),
            (n as i64 - 10).to_string().as_bytes()
        );
        // ADD on a non-integer is an error, and the connection stays usable.
        c.set("text", b"abc").unwrap();
        let e = c.add("text", 1).unwrap_err().to_string();
        assert!(e.contains("not an integer"), "{e}");
        assert_eq!(c.get("text", secs(1.0)).unwrap(), b"abc");
    }

    #[test]
    fn get_blocks_until_set() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let mut a = client(&server, 0);
        let mut b = client(&server, 1);
        let t = std::thread::spawn(move || b.get("late", secs(5.0)).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        a.set("late", b"here").unwrap();
        assert_eq!(t.join().unwrap(), b"here");
    }

    #[test]
    fn get_times_out_with_error() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let mut c = client(&server, 3);
        let t0 = Instant::now();
        let e = c.get("never", secs(0.3)).unwrap_err();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(matches!(e, Error::Rendezvous { rank: 3, .. }), "{e:?}");
        assert!(e.to_string().contains("never"), "{e}");
        // Still usable afterwards.
        c.set("never", b"x").unwrap();
        assert_eq!(c.get("never", secs(1.0)).unwrap(), b"x");
    }

    #[test]
    fn connect_retries_until_store_starts_and_fails_by_deadline() {
        // Find a free port, release it, start the server a little later.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let a2 = addr.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            StoreServer::bind(&a2).unwrap()
        });
        let mut c = StoreClient::connect(&addr, 0, secs(5.0)).unwrap();
        let server = t.join().unwrap();
        c.set("x", b"1").unwrap();
        drop(server);

        let t0 = Instant::now();
        let e = StoreClient::connect(&addr, 7, secs(0.3)).err().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2));
        let s = e.to_string();
        assert!(s.contains(&addr) && s.contains("rank 7"), "{s}");
    }

    #[test]
    fn exchange_names_missing_rank() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let size = 4;
        let threads: Vec<_> = (0..size)
            .filter(|&r| r != 2)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = StoreClient::connect(&addr, r, secs(5.0)).unwrap();
                    let mine: SocketAddr = format!("127.0.0.1:{}", 4000 + r).parse().unwrap();
                    exchange_addresses(&mut c, "job", r, size, mine, secs(0.4))
                })
            })
            .collect();
        for t in threads {
            let e = t.join().unwrap().unwrap_err();
            let s = e.to_string();
            assert!(s.contains("rank 2 of 4 never arrived within"), "{s}");
            assert!(s.contains(&addr), "{s}");
        }
    }

    #[test]
    fn exchange_returns_all_addresses() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let size = 3;
        let threads: Vec<_> = (0..size)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = StoreClient::connect(&addr, r, secs(5.0)).unwrap();
                    let mine: SocketAddr = format!("127.0.0.1:{}", 4000 + r).parse().unwrap();
                    exchange_addresses(&mut c, "p", r, size, mine, secs(5.0)).unwrap()
                })
            })
            .collect();
        for t in threads {
            let got = t.join().unwrap();
            let want: Vec<SocketAddr> = (0..size)
                .map(|r| format!("127.0.0.1:{}", 4000 + r).parse().unwrap())
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn wait_returns_early_when_the_abort_key_appears() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let mut a = client(&server, 1);
        let mut b = client(&server, 0);
        let keys: Vec<String> = vec!["k/0".into(), "k/1".into()];
        let t0 = Instant::now();
        let t = std::thread::spawn(move || {
            let got = a.wait_outcome(&keys, Some("job/failed"), secs(10.0));
            (got, a)
        });
        std::thread::sleep(Duration::from_millis(100));
        b.set("k/0", b"x").unwrap();
        b.set("job/failed", b"rank 1 never came").unwrap();
        let (got, mut a) = t.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        match got.unwrap() {
            WaitOutcome::Aborted(v) => assert_eq!(v, b"rank 1 never came"),
            other => panic!("{other:?}"),
        }
        // Already set: returns at once, even when every key is there too.
        b.set("k/1", b"y").unwrap();
        let keys: Vec<String> = vec!["k/0".into(), "k/1".into()];
        match a
            .wait_outcome(&keys, Some("job/failed"), secs(5.0))
            .unwrap()
        {
            WaitOutcome::Aborted(v) => assert_eq!(v, b"rank 1 never came"),
            other => panic!("{other:?}"),
        }
        // Without the abort key the same wait succeeds, and an absent abort
        // key does not stop a wait from succeeding or timing out as before.
        assert_eq!(
            a.wait_all(&keys, secs(5.0)).unwrap(),
            vec![b"x".to_vec(), b"y".to_vec()]
        );
        match a
            .wait_outcome(&keys, Some("other/failed"), secs(5.0))
            .unwrap()
        {
            WaitOutcome::Values(v) => assert_eq!(v.len(), 2),
            other => panic!("{other:?}"),
        }
        let t0 = Instant::now();
        let never = vec!["never".to_string()];
        match a
            .wait_outcome(&never, Some("other/failed"), secs(0.3))
            .unwrap()
        {
            WaitOutcome::Missing(m) => assert_eq!(m, never),
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn serving_rank_tells_waiting_ranks_who_is_missing() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let size = 3;
        // Rank 1 started later, so its own deadline is far off; rank 0, which
        // serves the store, gives up first.
        let a2 = addr.clone();
        let t1 = std::thread::spawn(move || {
            let mut c = StoreClient::connect(&a2, 1, secs(5.0)).unwrap();
            c.set_served_by("rank 0");
            let mine: SocketAddr = "127.0.0.1:4001".parse().unwrap();
            let t0 = Instant::now();
            let r = exchange_addresses(&mut c, "job", 1, size, mine, secs(10.0));
            (r, t0.elapsed())
        });
        let mut c0 = client(&server, 0);
        let mine: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let t0 = Instant::now();
        let e0 = exchange_addresses_serving(&mut c0, &server, "job", 0, size, mine, secs(0.5))
            .unwrap_err();
        // Rank 0 returned once rank 1 had read the verdict and gone, well
        // before the linger bound.
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        let (r1, took1) = t1.join().unwrap();
        let e1 = r1.unwrap_err();
        assert!(took1 < Duration::from_secs(3), "{took1:?}");
        let want = format!("rank 2 of 3 never arrived within 0.5s (store at {addr})");
        assert_eq!(e0.to_string(), format!("rank 0: rendezvous: {want}"));
        assert_eq!(e1.to_string(), format!("rank 1: rendezvous: {want}"));
    }

    #[test]
    fn serving_rank_linger_is_bounded() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        // A client that stays connected without waiting.
        let _idle = client(&server, 1);
        let mut c0 = client(&server, 0);
        let mine: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let t0 = Instant::now();
        let e =
            exchange_addresses_serving(&mut c0, &server, "job", 0, 2, mine, secs(0.2)).unwrap_err();
        let took = t0.elapsed();
        assert!(
            took >= VERDICT_LINGER && took < VERDICT_LINGER + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(e.to_string().contains("rank 1 of 2 never arrived"), "{e}");
    }

    #[test]
    fn store_going_away_is_named() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let mut c = client(&server, 1);
        c.set_served_by("rank 0");
        let t = std::thread::spawn(move || {
            let r = c.wait_all(&["never".into()], secs(30.0));
            (r, c)
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(server);
        let (r, mut c) = t.join().unwrap();
        let s = r.unwrap_err().to_string();
        assert!(
            s.contains(&format!("the store (served by rank 0 at {addr}) went away"))
                && s.contains("rank 0 probably failed or timed out")
                && !s.contains("fill whole buffer"),
            "{s}"
        );
        // Later calls repeat the cause.
        let s = c.set("x", b"1").unwrap_err().to_string();
        assert!(s.contains("went away"), "{s}");
    }

    #[test]
    fn rank_lists_are_compact() {
        assert_eq!(rank_list(&[3]), "3");
        assert_eq!(rank_list(&[3, 5]), "3, 5");
        assert_eq!(rank_list(&[1, 2, 5, 6, 7, 8, 10]), "1, 2, 5-8, 10");
    }

    /// Send raw bytes and report whether the server closed the connection.
    fn send_raw(addr: SocketAddr, bytes: &[u8]) -> bool {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    }

    #[test]
    fn hostile_input_is_rejected_and_server_keeps_serving() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr();
        // Garbage.
        assert!(send_raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        // Huge length prefix on a valid header.
        let mut f = header(CMD_SET, 0);
        f[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(send_raw(addr, &f));
        // Wrong version.
        let mut f = header(CMD_GET, 0);
        f[4] = 99;
        assert!(send_raw(addr, &f));
        // A key length inside the body that exceeds the cap.
        let mut f = header(CMD_GET, 12);
        f.put_u32(u32::MAX);
        f.put_u64(0);
        assert!(send_raw(addr, &f));
        // WAIT claiming too many keys.
        let mut f = header(CMD_WAIT, 12);
        f.put_u64(0);
        f.put_u32(u32::MAX);
        assert!(send_raw(addr, &f));
        // Unknown command.
        assert!(send_raw(addr, &header(77, 0)));
        // A normal client is unaffected.
        let mut c = client(&server, 0);
        c.set("ok", b"yes").unwrap();
        assert_eq!(c.get("ok", secs(1.0)).unwrap(), b"yes");
    }

    #[test]
    fn oversized_arguments_are_refused_client_side() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let mut c = client(&server, 0);
        assert!(c.set(&"k".repeat(MAX_KEY_BYTES + 1), b"").is_err());
        assert!(c.set("k", &vec![0u8; MAX_VALUE_BYTES + 1]).is_err());
        c.set("k", &vec![7u8; MAX_VALUE_BYTES]).unwrap();
        assert_eq!(c.get("k", secs(2.0)).unwrap().len(), MAX_VALUE_BYTES);
    }

    #[test]
    fn drop_is_prompt_with_blocked_clients() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let mut waiting = client(&server, 0);
        let _idle = client(&server, 1);
        let t = std::thread::spawn(move || waiting.get("never", secs(30.0)));
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        drop(server);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        // The waiting client sees its connection closed rather than hanging 30 s.
        let e = t.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::Rendezvous { .. }), "{e:?}");
    }
}
