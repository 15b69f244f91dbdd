//! Heartbeats: how a rank tells a frozen peer (its whole process stopped by
//! SIGSTOP, a paused VM, a swap storm) from one that is only late. A thread
//! of each rank's own sends a small authenticated datagram to every peer
//! each [`PERIOD`] and notes when each peer's last one came. A frozen
//! process's kernel still answers TCP, so the sockets alone cannot tell;
//! but its heartbeat thread is frozen too. A rank busy computing for minutes
//! between collectives keeps beating, so only `KOLO_TIMEOUT` governs it.
//!
//! The datagrams use UDP on the address and port of the rank's TCP data
//! listener (the port spaces are separate), so no address exchange is
//! needed. A peer never heard from is never judged: where UDP cannot pass,
//! detection falls back to `KOLO_TIMEOUT`.

use crate::auth::{self, Secret};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often each rank beats.
pub const PERIOD: Duration = Duration::from_millis(500);
const LABEL: &[u8] = b"kolo heartbeat v1";
const MAGIC: &[u8; 4] = b"KOHB";
/// magic, comm id, sender rank, beat counter, then a 32-byte tag.
const BODY: usize = 4 + 8 + 4 + 8;
const LEN: usize = BODY + 32;
/// "Never heard from" in [`Shared::last_ms`].
const NEVER: u64 = u64::MAX;

struct Shared {
    stop: AtomicBool,
    /// Milliseconds after `epoch` of each peer's last valid heartbeat.
    last_ms: Vec<AtomicU64>,
    epoch: Instant,
}

/// A running heartbeat; stops when dropped.
pub struct Heartbeat {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Start beating to `addrs` (every rank's data listener; this rank's is
    /// `addrs[rank]`) from the same address over UDP. `None` when the port
    /// cannot be had: this rank then neither beats nor judges.
    pub fn start(
        rank: usize,
        comm_id: u64,
        addrs: &[SocketAddr],
        secret: Option<&Secret>,
    ) -> Option<Heartbeat> {
        let sock = UdpSocket::bind(addrs.get(rank)?).ok()?;
        sock.set_read_timeout(Some(PERIOD / 4)).ok()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            last_ms: addrs.iter().map(|_| AtomicU64::new(NEVER)).collect(),
            epoch: Instant::now(),
        });
        let (s, peers, secret) = (shared.clone(), addrs.to_vec(), secret.cloned());
        let thread = std::thread::Builder::new()
            .name(format!("kolo-heartbeat-{rank}"))
            .spawn(move || beat(&sock, rank, comm_id, &peers, secret.as_ref(), &s))
            .ok()?;
        Some(Heartbeat {
            shared,
            thread: Some(thread),
        })
    }

    /// The peer among `peers` whose heartbeats stopped longest ago, if that
    /// is more than `limit`, with how long. Peers never heard from are not
    /// judged.
    pub fn silent(
        &self,
        peers: impl Iterator<Item = usize>,
        limit: Duration,
    ) -> Option<(usize, Duration)> {
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        peers
            .filter_map(|p| {
                let last = self.shared.last_ms.get(p)?.load(Ordering::Relaxed);
                (last != NEVER).then(|| (p, Duration::from_millis(now.saturating_sub(last))))
            })
            .filter(|&(_, age)| age > limit)
            .max_by_key(|&(_, age)| age)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread: send a beat to every peer each [`PERIOD`], and between
/// sends read the peers' beats.
fn beat(
    sock: &UdpSocket,
    rank: usize,
    comm_id: u64,
    peers: &[SocketAddr],
    secret: Option<&Secret>,
    s: &Shared,
) {
    let mut count = 0u64;
    let mut next = Instant::now();
    let mut buf = [0u8; LEN + 1];
    while !s.stop.load(Ordering::SeqCst) {
        if Instant::now() >= next {
            count += 1;
            let pkt = encode(comm_id, rank as u32, count, secret);
            for (p, addr) in peers.iter().enumerate() {
                if p != rank {
                    // Best effort: a lost datagram is the next one's job.
                    let _ = sock.send_to(&pkt, addr);
                }
            }
            next += PERIOD;
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Some(from) = decode(&buf[..n], comm_id, secret) {
                if let Some(slot) = s.last_ms.get(from).filter(|_| from != rank) {
                    slot.store(s.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

fn encode(comm_id: u64, rank: u32, count: u64, secret: Option<&Secret>) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[..4].copy_from_slice(MAGIC);
    p[4..12].copy_from_slice(&comm_id.to_le_bytes());
    p[12..16].copy_from_slice(&rank.to_le_bytes());
    p[16..24].copy_from_slice(&count.to_le_bytes());
    let t = auth::tag(secret, LABEL, &p[..BODY]);
    p[BODY..].copy_from_slice(&t);
    p
}

/// The sender of a valid beat of this communicator; `None` for anything else
/// (a stranger's datagram, another job's, a forged one).
fn decode(p: &[u8], comm_id: u64, secret: Option<&Secret>) -> Option<usize> {
    if p.len() != LEN || &p[..4] != MAGIC || p[4..12] != comm_id.to_le_bytes() {
        return None;
    }
    if !auth::tag_ok(secret, LABEL, &p[..BODY], &p[BODY..]) {
        return None;
    }
    Some(u32::from_le_bytes(p[12..16].try_into().ok()?) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_is_read_back_only_with_its_job_and_secret() {
        let s = Secret::new("k");
        let p = encode(7, 3, 1, s.as_ref());
        assert_eq!(decode(&p, 7, s.as_ref()), Some(3));
        assert_eq!(decode(&p, 8, s.as_ref()), None, "another communicator");
        assert_eq!(
            decode(&p, 7, Secret::new("x").as_ref()),
            None,
            "another secret"
        );
        let mut forged = p;
        forged[12] = 2;
        assert_eq!(decode(&forged, 7, s.as_ref()), None, "a changed sender");
        assert_eq!(decode(&p[..LEN - 1], 7, s.as_ref()), None);
    }

    #[test]
    fn a_silent_peer_is_named_and_an_unheard_one_is_not() {
        let l: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = l.iter().map(|l| l.local_addr().unwrap()).collect();
        let a = Heartbeat::start(0, 9, &addrs, None).unwrap();
        let b = Heartbeat::start(1, 9, &addrs, None).unwrap();
        // Rank 2 never beats.
        std::thread::sleep(PERIOD * 3);
        assert_eq!(
            a.silent(1..3, PERIOD * 2),
            None,
            "rank 1 beats; rank 2 was never heard"
        );
        drop(b);
        std::thread::sleep(PERIOD * 5);
        let (p, age) = a.silent(1..3, PERIOD * 2).expect("rank 1 fell silent");
        assert_eq!(p, 1);
        assert!(age > PERIOD * 2, "{age:?}");
    }
}
