//! Mutual authentication of every connection (rendezvous store and data) with
//! a shared per-job secret, `KOLO_SECRET`.
//!
//! Before any request or frame is accepted, the two ends run an HMAC-SHA256
//! challenge-response on fresh random nonces:
//!
//! ```text
//! client -> server  HELLO      purpose (store/data), job id, from/to rank, size, client nonce Nc
//! server -> client  CHALLENGE  status, server nonce Ns, Ps = HMAC(K, "server" || HELLO || Ns)
//! client -> server  PROOF      Pc = HMAC(K, "client" || HELLO || Ns)
//! server -> client  VERDICT    accepted / rejected
//! ```
//!
//! Both proofs cover the whole hello (so the purpose, job id and ranks) and
//! both nonces; the role labels differ, so a server's proof reflected back is
//! no client proof; a recorded handshake fails against the fresh `Ns` of a new
//! connection. The server proves itself first, so a client never hands a proof
//! to an impostor. Proofs are compared in constant time. Without a secret the
//! same exchange runs with an empty key (one wire format) and kolo warns once
//! per process that connections are unauthenticated. Nothing is encrypted.
//!
//! ```
//! use kolo::auth::Secret;
//! let s = Secret::new("correct horse battery staple").unwrap();
//! assert!(!format!("{s:?}").contains("horse")); // never printed
//! assert!(Secret::new("").is_none()); // empty means unset
//! ```

use crate::transport::frame::{MAGIC, VERSION};
use bytes::{Buf, BufMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::{self, Read, Write};

type HmacSha256 = Hmac<Sha256>;

/// The shared job secret. Its bytes are the text of `KOLO_SECRET` as given;
/// `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from its text; `None` when empty (empty means unset).
    pub fn new(text: &str) -> Option<Secret> {
        (!text.is_empty()).then(|| Secret(text.as_bytes().to_vec()))
    }
    fn key(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes, redacted>)", self.0.len())
    }
}

/// An HMAC-SHA256 tag of `msg` under the job secret (the empty key without
/// one, as unauthenticated handshakes use), for datagrams that cannot run a
/// handshake: heartbeats.
pub(crate) fn tag(secret: Option<&Secret>, label: &[u8], msg: &[u8]) -> [u8; 32] {
    let key = secret.map_or(&[][..], Secret::key);
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Whether `got` is the [`tag`] of `msg`, compared in constant time.
pub(crate) fn tag_ok(secret: Option<&Secret>, label: &[u8], msg: &[u8], got: &[u8]) -> bool {
    let key = secret.map_or(&[][..], Secret::key);
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(msg);
    m.verify_slice(got).is_ok()
}

/// A fresh random secret for one job: 32 bytes from the OS, as 64 hex digits
/// (what `kolorun` generates when `KOLO_SECRET` is not set).
///
/// ```
/// let s = kolo::auth::generate_secret()?;
/// assert_eq!(s.len(), 64);
/// assert_ne!(s, kolo::auth::generate_secret()?);
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn generate_secret() -> crate::Result<String> {
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw)
        .map_err(|e| crate::Error::Io(format!("cannot generate a job secret: {e}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Warn, once per process, that connections are not authenticated.
pub(crate) fn warn_unauthenticated_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "kolo: warning: KOLO_SECRET is not set: connections are not authenticated, anyone who \
             can reach this job's ports can join it (kolorun sets a per-job secret; without \
             kolorun, set the same KOLO_SECRET on every rank)"
        )
    });
}

/// Nonce length in bytes.
pub(crate) const NONCE_LEN: usize = 32;
/// HMAC-SHA256 output length in bytes.
pub(crate) const MAC_LEN: usize = 32;
/// Encoded [`Hello`] size.
pub(crate) const HELLO_LEN: usize = 64;
/// Encoded challenge size.
pub(crate) const CHALLENGE_LEN: usize = 8 + NONCE_LEN + MAC_LEN;
/// Encoded proof size.
pub(crate) const PROOF_LEN: usize = 8 + MAC_LEN;
/// Encoded verdict size.
pub(crate) const VERDICT_LEN: usize = 8;

const MSG_HELLO: u8 = 1;
const MSG_CHALLENGE: u8 = 2;
const MSG_PROOF: u8 = 3;
const MSG_VERDICT: u8 = 4;

/// Challenge/verdict status codes.
const ST_OK: u8 = 0;
/// The server has no secret but the client has one.
const ST_SERVER_HAS_NONE: u8 = 1;
/// The server has a secret and the client has none.
const ST_CLIENT_HAS_NONE: u8 = 2;
/// The client's proof did not verify.
const ST_PROOF_REJECTED: u8 = 3;
/// The hello names another job, rank or purpose.
const ST_HELLO_REJECTED: u8 = 4;

/// Labels of the two proofs, of equal length, so neither can stand for the other.
const LABEL_SERVER: &[u8; 24] = b"kolo-auth-v2 server mac\0";
const LABEL_CLIENT: &[u8; 24] = b"kolo-auth-v2 client mac\0";

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A client of the rendezvous store.
    Store = 1,
    /// A data connection between two ranks.
    Data = 2,
}

/// The first message on every connection: who calls whom, for what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    /// Store or data connection.
    pub purpose: Purpose,
    /// Whether the client has a secret (so a mismatch can be named).
    pub has_key: bool,
    /// The communicator (job) id; 0 for the store, which comes before it.
    pub comm_id: u64,
    /// The caller's rank.
    pub from: u32,
    /// The rank the caller means to reach (`u32::MAX` for the store).
    pub to: u32,
    /// The number of ranks (0 when the caller does not say).
    pub size: u32,
    /// Which of the connections to the peer this is (`KOLO_NSOCKS`), from 0.
    pub lane: u8,
    /// How many connections per peer the caller makes (0 means 1: the store,
    /// and builds before multi-stream, say nothing).
    pub lanes: u8,
    /// The client's fresh nonce.
    pub nonce: [u8; NONCE_LEN],
}

fn put_prefix(b: &mut &mut [u8], msg: u8, x: u8) {
    b.put_u32_le(MAGIC);
    b.put_u16_le(VERSION);
    b.put_u8(msg);
    b.put_u8(x);
}

/// Check the common 8-byte prefix; returns its last byte.
fn check_prefix(b: &mut &[u8], msg: u8, what: &str) -> Result<u8, String> {
    let magic = b.get_u32_le();
    if magic != MAGIC {
        return Err(format!(
            "bad magic {magic:#010x} in {what} (not a kolo peer)"
        ));
    }
    let version = b.get_u16_le();
    if version != VERSION {
        return Err(format!(
            "{what} with wire version {version}, this build speaks {VERSION}"
        ));
    }
    let m = b.get_u8();
    if m != msg {
        return Err(format!("message type {m} where a {what} belongs"));
    }
    Ok(b.get_u8())
}

impl Hello {
    /// Encode into the fixed wire layout (little endian).
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        let mut b = &mut out[..];
        put_prefix(&mut b, MSG_HELLO, self.has_key as u8);
        b.put_u8(self.purpose as u8);
        b.put_u8(self.lane);
        b.put_u8(self.lanes);
        b.put_u8(0);
        b.put_u64_le(self.comm_id);
        b.put_u32_le(self.from);
        b.put_u32_le(self.to);
        b.put_u32_le(self.size);
        b.put_slice(&self.nonce);
        out
    }

    /// Decode, rejecting anything that is not a hello of this version.
    pub(crate) fn decode(raw: &[u8; HELLO_LEN]) -> Result<Hello, String> {
        let mut b = &raw[..];
        let flags = check_prefix(&mut b, MSG_HELLO, "hello")?;
        if flags > 1 {
            return Err(format!("unknown hello flags {flags:#x}"));
        }
        let purpose = match b.get_u8() {
            1 => Purpose::Store,
            2 => Purpose::Data,
            p => return Err(format!("unknown connection purpose {p}")),
        };
        let lane = b.get_u8();
        let lanes = b.get_u8();
        b.advance(1);
        let comm_id = b.get_u64_le();
        let from = b.get_u32_le();
        let to = b.get_u32_le();
        let size = b.get_u32_le();
        let mut nonce = [0u8; NONCE_LEN];
        b.copy_to_slice(&mut nonce);
        Ok(Hello {
            purpose,
            has_key: flags == 1,
            comm_id,
            from,
            to,
            size,
            lane,
            lanes,
            nonce,
        })
    }
}

fn mac(key: &[u8], label: &[u8], hello: &[u8; HELLO_LEN], server_nonce: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(hello);
    m.update(server_nonce);
    m
}

/// The server's proof for `hello` and its nonce.
fn server_mac(key: &[u8], hello: &[u8; HELLO_LEN], ns: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    mac(key, LABEL_SERVER, hello, ns)
        .finalize()
        .into_bytes()
        .into()
}

/// The client's proof for `hello` and the server's nonce.
fn client_mac(key: &[u8], hello: &[u8; HELLO_LEN], ns: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    mac(key, LABEL_CLIENT, hello, ns)
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time check of a proof.
fn verify(
    key: &[u8],
    label: &[u8],
    hello: &[u8; HELLO_LEN],
    ns: &[u8; NONCE_LEN],
    tag: &[u8],
) -> bool {
    mac(key, label, hello, ns).verify_slice(tag).is_ok()
}

fn encode_challenge(status: u8, ns: &[u8; NONCE_LEN], m: &[u8; MAC_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut out = [0u8; CHALLENGE_LEN];
    let mut b = &mut out[..];
    put_prefix(&mut b, MSG_CHALLENGE, status);
    b.put_slice(ns);
    b.put_slice(m);
    out
}

/// Decode a challenge into (status, server nonce, server proof).
pub(crate) fn decode_challenge(
    raw: &[u8; CHALLENGE_LEN],
) -> Result<(u8, [u8; NONCE_LEN], [u8; MAC_LEN]), String> {
    let mut b = &raw[..];
    let status = check_prefix(&mut b, MSG_CHALLENGE, "challenge")?;
    let mut ns = [0u8; NONCE_LEN];
    b.copy_to_slice(&mut ns);
    let mut m = [0u8; MAC_LEN];
    b.copy_to_slice(&mut m);
    Ok((status, ns, m))
}

fn encode_proof(m: &[u8; MAC_LEN]) -> [u8; PROOF_LEN] {
    let mut out = [0u8; PROOF_LEN];
    let mut b = &mut out[..];
    put_prefix(&mut b, MSG_PROOF, 0);
    b.put_slice(m);
    out
}

/// Decode a proof into the client's MAC.
pub(crate) fn decode_proof(raw: &[u8; PROOF_LEN]) -> Result<[u8; MAC_LEN], String> {
    let mut b = &raw[..];
    let flags = check_prefix(&mut b, MSG_PROOF, "proof")?;
    if flags != 0 {
        // Not covered by the MAC: a byte nobody checks is a byte to smuggle.
        return Err(format!("unknown proof flags {flags:#x}"));
    }
    let mut m = [0u8; MAC_LEN];
    b.copy_to_slice(&mut m);
    Ok(m)
}

fn encode_verdict(status: u8) -> [u8; VERDICT_LEN] {
    let mut out = [0u8; VERDICT_LEN];
    put_prefix(&mut &mut out[..], MSG_VERDICT, status);
    out
}

/// Decode a verdict into its status.
pub(crate) fn decode_verdict(raw: &[u8; VERDICT_LEN]) -> Result<u8, String> {
    check_prefix(&mut &raw[..], MSG_VERDICT, "verdict")
}

fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(n)
}

/// A TCP stream whose reads and writes all end by one deadline, so a peer
/// that trickles bytes cannot stretch a handshake past it (a read timeout
/// alone bounds each read, not their sum).
pub(crate) struct Timed<'a> {
    stream: &'a std::net::TcpStream,
    until: std::time::Instant,
}

impl<'a> Timed<'a> {
    /// `stream` with every operation bounded by `until`.
    pub(crate) fn new(stream: &'a std::net::TcpStream, until: std::time::Instant) -> Timed<'a> {
        Timed { stream, until }
    }
    fn left(&self) -> io::Result<std::time::Duration> {
        let d = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if d.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        } else {
            Ok(d)
        }
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The socket failed, timed out or closed.
    Io(io::Error),
    /// The other side is not a kolo peer of this version, or sent a malformed message.
    Protocol(String),
    /// The secrets differ, one side has none, or the handshake was replayed.
    Auth(String),
    /// The hello names another job, rank or purpose.
    Rejected(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof) => {
                write!(f, "connection closed during the handshake")
            }
            Failure::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                write!(f, "handshake not completed in time")
            }
            Failure::Io(e) => write!(f, "handshake: {e}"),
            Failure::Protocol(m) | Failure::Rejected(m) => write!(f, "{m}"),
            Failure::Auth(m) => write!(f, "authentication failed: {m}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// Run the client side: send `hello` (its nonce and key flag are filled in
/// here), check the server's proof, prove ourselves, read the verdict. The
/// caller bounds the time with socket timeouts. `peer` names the other side
/// in messages ("the store at 10.0.0.1:29500", "rank 3 at ...").
pub(crate) fn client<S: Read + Write>(
    s: &mut S,
    secret: Option<&Secret>,
    mut hello: Hello,
    peer: &str,
) -> Result<(), Failure> {
    let key = secret.map_or(&[][..], Secret::key);
    if key.is_empty() {
        warn_unauthenticated_once();
    }
    hello.has_key = !key.is_empty();
    hello.nonce = nonce()?;
    let raw_hello = hello.encode();
    s.write_all(&raw_hello)?;
    let mut raw = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut raw)?;
    let (status, ns, ps) = decode_challenge(&raw).map_err(Failure::Protocol)?;
    match status {
        ST_OK => {}
        ST_SERVER_HAS_NONE => {
            return Err(Failure::Auth(format!(
                "this process has KOLO_SECRET but {peer} has none (set the same KOLO_SECRET on every rank)"
            )))
        }
        ST_CLIENT_HAS_NONE => {
            return Err(Failure::Auth(format!(
                "{peer} requires KOLO_SECRET and this process has none (set the same KOLO_SECRET on every rank)"
            )))
        }
        ST_HELLO_REJECTED => {
            return Err(Failure::Rejected(format!(
                "{peer} rejected our hello (another job, a rank it does not expect, or a different KOLO_NSOCKS; its log says which)"
            )))
        }
        other => return Err(Failure::Protocol(format!("unknown challenge status {other}"))),
    }
    if !verify(key, LABEL_SERVER, &raw_hello, &ns, &ps) {
        return Err(Failure::Auth(format!(
            "{peer} does not share KOLO_SECRET (its proof does not verify)"
        )));
    }
    s.write_all(&encode_proof(&client_mac(key, &raw_hello, &ns)))?;
    let mut raw = [0u8; VERDICT_LEN];
    s.read_exact(&mut raw).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Failure::Auth(format!(
            "{peer} closed the connection after our proof: it does not share KOLO_SECRET"
        )),
        _ => Failure::Io(e),
    })?;
    match decode_verdict(&raw).map_err(Failure::Protocol)? {
        ST_OK => Ok(()),
        ST_PROOF_REJECTED => Err(Failure::Auth(format!(
            "{peer} rejected our proof: the peer does not share KOLO_SECRET"
        ))),
        other => Err(Failure::Protocol(format!("unknown verdict status {other}"))),
    }
}

/// Run the server side: read the hello, let `check` accept its purpose and
/// fields (an `Err` is sent back as a rejection), prove ourselves, verify the
/// client's proof. Returns the authenticated hello; nothing else is read
/// before it is. The caller bounds the time with socket timeouts.
pub(crate) fn server<S: Read + Write>(
    s: &mut S,
    secret: Option<&Secret>,
    check: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Hello, Failure> {
    server_with_nonce(s, secret, nonce()?, check)
}

/// [`server`] with a given server nonce (fresh randomness in real use; fixed
/// for the fuzzer, so its runs are reproducible).
pub(crate) fn server_with_nonce<S: Read + Write>(
    s: &mut S,
    secret: Option<&Secret>,
    ns: [u8; NONCE_LEN],
    check: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Hello, Failure> {
    let key = secret.map_or(&[][..], Secret::key);
    if key.is_empty() {
        warn_unauthenticated_once();
    }
    let mut raw_hello = [0u8; HELLO_LEN];
    // The prefix first, so that a stranger or an old build is named without
    // waiting for bytes it will never send.
    s.read_exact(&mut raw_hello[..8])?;
    {
        let mut b = &raw_hello[..8];
        check_prefix(&mut b, MSG_HELLO, "hello").map_err(Failure::Protocol)?;
    }
    s.read_exact(&mut raw_hello[8..])?;
    let hello = Hello::decode(&raw_hello).map_err(Failure::Protocol)?;
    let refuse = |s: &mut S, status: u8| {
        let _ = s.write_all(&encode_challenge(status, &[0; NONCE_LEN], &[0; MAC_LEN]));
    };
    if let Err(m) = check(&hello) {
        refuse(s, ST_HELLO_REJECTED);
        return Err(Failure::Rejected(m));
    }
    match (key.is_empty(), hello.has_key) {
        (false, false) => {
            refuse(s, ST_CLIENT_HAS_NONE);
            return Err(Failure::Auth(
                "the peer has no KOLO_SECRET and this job requires one".into(),
            ));
        }
        (true, true) => {
            refuse(s, ST_SERVER_HAS_NONE);
            return Err(Failure::Auth(
                "the peer has a KOLO_SECRET but this process has none".into(),
            ));
        }
        _ => {}
    }
    s.write_all(&encode_challenge(
        ST_OK,
        &ns,
        &server_mac(key, &raw_hello, &ns),
    ))?;
    let mut raw = [0u8; PROOF_LEN];
    s.read_exact(&mut raw)?;
    let pc = decode_proof(&raw).map_err(Failure::Protocol)?;
    if !verify(key, LABEL_CLIENT, &raw_hello, &ns, &pc) {
        let _ = s.write_all(&encode_verdict(ST_PROOF_REJECTED));
        return Err(Failure::Auth(
            "the peer's proof does not verify (a different KOLO_SECRET, or a replayed handshake)"
                .into(),
        ));
    }
    s.write_all(&encode_verdict(ST_OK))?;
    Ok(hello)
}

/// Byte-level pieces the fuzz targets and the corpus replay test drive.
pub(crate) mod fuzzing {
    use super::*;

    /// The key the fuzzing server side uses.
    pub const FUZZ_KEY: &str = "kolo fuzz key";
    /// The fixed server nonce of the fuzzing server side.
    pub const FUZZ_NONCE: [u8; NONCE_LEN] = [0x5a; NONCE_LEN];

    /// A stream that reads `input` and discards writes.
    struct Scripted<'a> {
        input: &'a [u8],
        written: usize,
    }
    impl Read for Scripted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Scripted<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Feed `data` as everything a client sends to a data-connection server
    /// (rank 1 of 4, job 0x1234, key [`FUZZ_KEY`], nonce [`FUZZ_NONCE`]).
    /// Returns whether the handshake was accepted. Also decodes every
    /// 72/40/8-byte prefix as the other messages, which must not panic.
    pub fn handshake(data: &[u8]) -> bool {
        if let Ok(raw) = <&[u8; CHALLENGE_LEN]>::try_from(data.get(..CHALLENGE_LEN).unwrap_or(&[]))
        {
            let _ = decode_challenge(raw);
        }
        if let Ok(raw) = <&[u8; PROOF_LEN]>::try_from(data.get(..PROOF_LEN).unwrap_or(&[])) {
            let _ = decode_proof(raw);
        }
        if let Ok(raw) = <&[u8; VERDICT_LEN]>::try_from(data.get(..VERDICT_LEN).unwrap_or(&[])) {
            let _ = decode_verdict(raw);
        }
        let secret = Secret::new(FUZZ_KEY);
        let mut s = Scripted {
            input: data,
            written: 0,
        };
        let r = server_with_nonce(&mut s, secret.as_ref(), FUZZ_NONCE, |h| {
            if h.purpose != Purpose::Data || h.comm_id != 0x1234 || h.size != 4 || h.to != 1 {
                return Err("not for us".into());
            }
            if h.from >= 4 || h.from == 1 {
                return Err("bad rank".into());
            }
            Ok(())
        });
        assert!(
            s.written <= CHALLENGE_LEN + VERDICT_LEN,
            "server wrote too much"
        );
        r.is_ok()
    }

    /// An unkeyed data-connection hello from rank `from` to rank `to` of a
    /// `size`-rank group `comm_id` (what an old or foreign peer would send).
    pub fn data_hello(comm_id: u64, from: u32, to: u32, size: u32) -> Vec<u8> {
        Hello {
            purpose: Purpose::Data,
            has_key: false,
            comm_id,
            from,
            to,
            size,
            lane: 0,
            lanes: 0,
            nonce: [7; NONCE_LEN],
        }
        .encode()
        .to_vec()
    }

    /// The bytes a legitimate client (rank `from`) sends to the fuzzing
    /// server: hello then proof; a valid seed for [`handshake`].
    pub fn valid_client_transcript(from: u32, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let hello = Hello {
            purpose: Purpose::Data,
            has_key: true,
            comm_id: 0x1234,
            from,
            to: 1,
            size: 4,
            lane: 0,
            lanes: 0,
            nonce,
        }
        .encode();
        let mut out = hello.to_vec();
        out.extend_from_slice(&encode_proof(&client_mac(
            FUZZ_KEY.as_bytes(),
            &hello,
            &FUZZ_NONCE,
        )));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn hello(from: u32, to: u32) -> Hello {
        Hello {
            purpose: Purpose::Data,
            has_key: false,
            comm_id: 42,
            from,
            to,
            size: 4,
            lane: 0,
            lanes: 1,
            nonce: [0; NONCE_LEN],
        }
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (a, b)
    }

    /// Run both sides; the server accepts hellos addressed to rank 1.
    fn run(
        client_key: Option<&str>,
        server_key: Option<&str>,
    ) -> (Result<(), Failure>, Result<Hello, Failure>) {
        let (mut a, mut b) = pair();
        let ck = client_key.and_then(Secret::new);
        let sk = server_key.and_then(Secret::new);
        let t = std::thread::spawn(move || {
            server(&mut b, sk.as_ref(), |h| {
                if h.to == 1 {
                    Ok(())
                } else {
                    Err(format!("hello for rank {}", h.to))
                }
            })
        });
        let c = client(&mut a, ck.as_ref(), hello(0, 1), "rank 1");
        drop(a);
        (c, t.join().unwrap())
    }

    #[test]
    fn right_key_is_accepted_both_ways() {
        let (c, s) = run(Some("k1"), Some("k1"));
        c.unwrap();
        let h = s.unwrap();
        assert_eq!((h.from, h.to, h.comm_id, h.has_key), (0, 1, 42, true));
        // No secret on either side: the same exchange, unauthenticated.
        let (c, s) = run(None, None);
        c.unwrap();
        assert!(!s.unwrap().has_key);
    }

    #[test]
    fn wrong_or_missing_key_is_rejected_on_both_sides() {
        let (c, s) = run(Some("k1"), Some("k2"));
        let (c, s) = (c.unwrap_err().to_string(), s.unwrap_err().to_string());
        // The client checks the server's proof first and stops there.
        assert!(
            c.contains("authentication failed") && c.contains("does not share KOLO_SECRET"),
            "{c}"
        );
        assert!(
            s.contains("authentication failed") || s.contains("closed"),
            "{s}"
        );
        let (c, s) = run(None, Some("k1"));
        assert!(c
            .unwrap_err()
            .to_string()
            .contains("requires KOLO_SECRET and this process has none"),);
        assert!(s.unwrap_err().to_string().contains("has no KOLO_SECRET"));
        let (c, s) = run(Some("k1"), None);
        assert!(c.unwrap_err().to_string().contains("has none"));
        assert!(s.unwrap_err().to_string().contains("this process has none"));
    }

    #[test]
    fn hello_for_another_rank_is_rejected() {
        let (mut a, mut b) = pair();
        let t = std::thread::spawn(move || {
            server(&mut b, Secret::new("k").as_ref(), |h| {
                (h.to == 1).then_some(()).ok_or("wrong rank".to_string())
            })
        });
        let c = client(&mut a, Secret::new("k").as_ref(), hello(0, 2), "rank 2");
        assert!(matches!(c, Err(Failure::Rejected(_))), "{c:?}");
        assert!(matches!(t.join().unwrap(), Err(Failure::Rejected(m)) if m == "wrong rank"));
    }

    /// A client that records what it sends.
    struct Tap<S> {
        inner: S,
        sent: Vec<u8>,
    }
    impl<S: Read> Read for Tap<S> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.inner.read(b)
        }
    }
    impl<S: Write> Write for Tap<S> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(b)?;
            self.sent.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn replayed_transcript_is_rejected() {
        let key = Secret::new("k");
        // Record a legitimate client's bytes.
        let (a, mut b) = pair();
        let k2 = key.clone();
        let t = std::thread::spawn(move || server(&mut b, k2.as_ref(), |_| Ok(())));
        let mut tap = Tap {
            inner: a,
            sent: Vec::new(),
        };
        client(&mut tap, key.as_ref(), hello(0, 1), "rank 1").unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(tap.sent.len(), HELLO_LEN + PROOF_LEN);
        // Replay them to a new connection: the fresh server nonce defeats it.
        let (mut a, mut b) = pair();
        let k2 = key.clone();
        let t = std::thread::spawn(move || server(&mut b, k2.as_ref(), |_| Ok(())));
        a.write_all(&tap.sent).unwrap();
        let mut reply = vec![0u8; CHALLENGE_LEN + VERDICT_LEN];
        a.read_exact(&mut reply).unwrap();
        let verdict: [u8; VERDICT_LEN] = reply[CHALLENGE_LEN..].try_into().unwrap();
        assert_eq!(decode_verdict(&verdict), Ok(ST_PROOF_REJECTED));
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("replayed"), "{e}");
    }

    #[test]
    fn reflected_server_proof_is_no_client_proof() {
        // An attacker without the key opens a connection, receives the server's
        // proof over its hello and sends it back as its own proof.
        let key = Secret::new("k");
        let (mut a, mut b) = pair();
        let t = std::thread::spawn(move || server(&mut b, key.as_ref(), |_| Ok(())));
        let mut h = hello(0, 1);
        h.has_key = true;
        h.nonce = [3; NONCE_LEN];
        a.write_all(&h.encode()).unwrap();
        let mut raw = [0u8; CHALLENGE_LEN];
        a.read_exact(&mut raw).unwrap();
        let (status, _ns, ps) = decode_challenge(&raw).unwrap();
        assert_eq!(status, ST_OK);
        a.write_all(&encode_proof(&ps)).unwrap();
        let e = t.join().unwrap().unwrap_err();
        assert!(matches!(e, Failure::Auth(_)), "{e:?}");
        // Swapped roles the other way: a client proof does not pass as a server's.
        let hb = h.encode();
        let ns = [9u8; NONCE_LEN];
        let pc = client_mac(b"k", &hb, &ns);
        assert!(!verify(b"k", LABEL_SERVER, &hb, &ns, &pc));
        assert!(verify(b"k", LABEL_CLIENT, &hb, &ns, &pc));
        // A proof is bound to every hello field.
        let mut other = h;
        other.comm_id += 1;
        assert!(!verify(b"k", LABEL_CLIENT, &other.encode(), &ns, &pc));
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        for input in [
            &b""[..],
            b"GET / HTTP/1.1\r\n\r\n",
            &[0xff; 200],
            &Hello::decode(&hello(0, 1).encode()).unwrap().encode()[..30],
        ] {
            let (mut a, mut b) = pair();
            a.write_all(input).unwrap();
            drop(a);
            assert!(server(&mut b, Secret::new("k").as_ref(), |_| Ok(())).is_err());
        }
        let mut raw = hello(0, 1).encode();
        raw[8] = 9;
        assert!(Hello::decode(&raw).unwrap_err().contains("purpose"));
        raw[4] = 7;
        assert!(Hello::decode(&raw).unwrap_err().contains("version"));
    }

    #[test]
    fn fuzzing_entry_accepts_only_valid_transcripts() {
        assert!(fuzzing::handshake(&fuzzing::valid_client_transcript(
            0, [1; 32]
        )));
        assert!(!fuzzing::handshake(&fuzzing::valid_client_transcript(
            1, [1; 32]
        )));
        let mut t = fuzzing::valid_client_transcript(2, [1; 32]);
        *t.last_mut().unwrap() ^= 1;
        assert!(!fuzzing::handshake(&t));
        assert!(!fuzzing::handshake(b"garbage"));
    }

    #[test]
    fn secret_is_never_printed() {
        let s = Secret::new("hunter2").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        let mut cfg = crate::Config::local(0, 1, 0);
        cfg.secret = Some(s);
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
