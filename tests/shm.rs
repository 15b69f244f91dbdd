//! Shared memory between ranks of one host (`KOLO_SHM_BYTES`): bulk payloads
//! go through a ring per connection when it has room and inline on the
//! socket when it does not. With rings small enough that both happen in one
//! job (frames under 200 KB fit, 512 KiB segments do not), every algorithm
//! equals the serial reference on every rank and gives the same bits as a
//! job without rings (the rings move
//! bytes, they never change an order of operations); the payloads did go
//! through shared memory; and no ring is left in `/dev/shm` once the
//! communicators are gone.

mod common;

use common::*;
use kolo::algo::cost::Algo;
use kolo::Communicator;
use std::time::Duration;

/// Fingerprints of every algorithm at several counts, an allgather and a
/// broadcast; and the payload bytes this rank sent through rings.
fn run(n: usize, shm_bytes: usize, nsocks: usize) -> Vec<(Vec<u64>, u64)> {
    // Empty, one element, a prime, just over one small frame, 2^20.
    let counts = [0, 1, 1009, 20_000, 1 << 20];
    run_ranks_with(
        n,
        |cfg| {
            cfg.shm_bytes = shm_bytes;
            cfg.nsocks = nsocks;
            cfg.calibrate = false;
            cfg.timeout = Duration::from_secs(60);
        },
        |c: Communicator| {
            let (r, n) = (c.rank(), c.size());
            let mut prints = Vec::new();
            for algo in Algo::ALL {
                for (k, &count) in counts.iter().enumerate() {
                    let label = format!("shm={shm_bytes} nsocks={nsocks}");
                    let x = sum_exact_then_inexact(&c, algo, count, 5 + k as u64, &label);
                    prints.push(fingerprint(&x));
                }
            }
            let mut all = vec![0i32; 100_000 * n];
            c.allgather(&vec![r as i32; 100_000], &mut all).unwrap();
            let want: Vec<i32> = (0..n).flat_map(|q| vec![q as i32; 100_000]).collect();
            assert_eq!(all, want, "allgather shm={shm_bytes}");
            let mut b = vec![r as u8; 300_001];
            c.broadcast(&mut b, n - 1).unwrap();
            assert!(
                b.iter().all(|&v| v as usize == n - 1),
                "broadcast shm={shm_bytes}"
            );
            // Rank q gives q + i: slice r of the sum is n * i + n(n-1)/2.
            let m = 70_001;
            let send: Vec<i64> = (0..n * m).map(|i| (r + i) as i64).collect();
            let mut mine = vec![0i64; m];
            c.reduce_scatter(&send, &mut mine, kolo::ReduceOp::Sum)
                .unwrap();
            let tri = (n * (n - 1) / 2) as i64;
            let want: Vec<i64> = (r * m..(r + 1) * m).map(|i| (n * i) as i64 + tri).collect();
            assert_eq!(mine, want, "reduce_scatter shm={shm_bytes}");
            // Block q of rank r's input is r * n + q; block q of the output is q * n + r.
            let send: Vec<i32> = (0..n).flat_map(|q| vec![(r * n + q) as i32; m]).collect();
            let mut got = vec![0i32; n * m];
            c.alltoall(&send, &mut got).unwrap();
            let want: Vec<i32> = (0..n).flat_map(|q| vec![(q * n + r) as i32; m]).collect();
            assert_eq!(got, want, "alltoall shm={shm_bytes}");
            c.barrier().unwrap();
            (prints, c.bytes_through_shm())
        },
    )
}

/// Rings of this process still named in `/dev/shm`.
fn ours_left() -> Vec<String> {
    let pid = std::process::id() as u64;
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("kolo-"))
                .filter(|e| {
                    use std::os::unix::fs::FileExt;
                    let mut raw = [0u8; 8];
                    std::fs::File::open(e.path())
                        .and_then(|f| f.read_exact_at(&mut raw, 16))
                        .is_ok()
                        && u64::from_le_bytes(raw) == pid
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_rank_without_rings_sends_over_tcp_to_peers_that_have_them() {
    // Rank 1 asks for no rings; the others do and make rings for it.
    let got = run_ranks_with(
        3,
        |cfg| cfg.shm_bytes = if cfg.rank == 1 { 0 } else { 1 << 20 },
        |c: Communicator| {
            let n = c.size();
            let mut v = vec![c.rank() as f32; 300_000];
            c.allreduce(&mut v, kolo::ReduceOp::Sum).unwrap();
            assert!(v.iter().all(|&x| x == (n * (n - 1) / 2) as f32));
            (c.rank(), c.bytes_through_shm())
        },
    );
    for (r, shm) in got {
        if r == 1 {
            assert_eq!(shm, 0, "rank 1 asked for everything over TCP");
        }
    }
}

#[test]
fn rings_and_inline_frames_give_the_reference_and_the_bits_of_tcp() {
    assert!(
        std::path::Path::new("/dev/shm").is_dir(),
        "this test needs /dev/shm"
    );
    for n in 1..=6 {
        let tcp = run(n, 0, 1);
        assert!(
            tcp.iter().all(|(_, shm)| *shm == 0),
            "n={n}: no rings asked for"
        );
        // 200 KB rings: a 64 KiB-plus frame fits, a 512 KiB segment does not.
        for (shm_bytes, nsocks) in [(200_000, 1), (1 << 20, 1), (200_000, 2)] {
            let got = run(n, shm_bytes, nsocks);
            for (r, ((p, shm), (q, _))) in got.iter().zip(&tcp).enumerate() {
                assert_eq!(
                    p, q,
                    "n={n} rank {r} shm={shm_bytes} nsocks={nsocks}: bits differ from TCP"
                );
                if n > 1 {
                    assert!(
                        *shm > 0,
                        "n={n} rank {r} shm={shm_bytes}: nothing went through a ring"
                    );
                }
            }
            let first = &got[0].0;
            assert!(got.iter().all(|(p, _)| p == first), "n={n}: ranks differ");
        }
    }
    assert_eq!(ours_left(), Vec::<String>::new(), "rings left in /dev/shm");
}

#[test]
fn rings_lose_their_names_once_every_rank_is_connected() {
    let got = run_ranks_with(
        3,
        |cfg| cfg.shm_bytes = 1 << 20,
        |c: Communicator| {
            // Every rank has passed the first barrier here.
            c.barrier().unwrap();
            let left = ours_left();
            c.barrier().unwrap();
            // The rings exist all the same: a bulk payload goes through them.
            let mut v = vec![1.0f32; 100_000];
            c.broadcast(&mut v, 0).unwrap();
            (left, c.rank(), c.bytes_through_shm())
        },
    );
    for (left, r, shm) in &got {
        assert!(
            left.is_empty(),
            "rank {r}: named rings while running: {left:?}"
        );
        if *r == 0 {
            assert!(*shm > 0, "rank 0 sent its broadcast outside the rings");
        }
    }
}

/// Rank 1 of a two-rank transport pair sends a `Shm` header for a payload of
/// `len` bytes that it never put anywhere; rank 0 (with or without a ring
/// from rank 1) expects that frame as data. Returns rank 0's error text.
fn bogus_shm_frame(ring_on_rank0: bool) -> String {
    use kolo::transport::frame::{Desc, Header, Kind};
    use kolo::transport::{shm, Incoming, RecvError, Transport};
    use std::time::Instant;
    let comm_id = 0x5ead_0000_0000_0000 | u64::from(std::process::id()) << 1 | ring_on_rank0 as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let l0 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let a2 = addrs.clone();
    let t = std::thread::spawn(move || {
        Transport::establish(1, 2, comm_id, l1, &a2, deadline, 0, None).unwrap()
    });
    let mut t0 = Transport::establish(0, 2, comm_id, l0, &addrs, deadline, 0, None).unwrap();
    let mut t1 = t.join().unwrap();
    if ring_on_rank0 {
        let incoming = shm::create_incoming(comm_id, 0, &[true, true], 1, 1 << 20);
        assert!(incoming[1][0].is_some(), "ring from rank 1 made");
        t0.attach_shm(Vec::new(), incoming);
        t0.unlink_shm();
    }
    let len = 100_000;
    let desc = Desc {
        coll: 1,
        dtype: 6,
        op: 1,
        root: 0,
        count: len / 4,
    };
    let h = Header {
        kind: Kind::Shm,
        desc,
        comm_id,
        seq: 1,
        len,
    };
    let enc = h.encode();
    send_all(&mut t1, 0, &enc);
    let mut inc = Incoming::new(
        1,
        Header {
            kind: Kind::Data,
            ..h
        },
    );
    let mut buf = vec![0u8; len as usize];
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match inc.progress(&mut t0, &mut buf) {
            Err(RecvError::Protocol(m)) => return m,
            Err(e) => panic!("expected a protocol error, got {e:?}"),
            Ok(0) => {
                assert!(Instant::now() < until, "the bogus frame was not refused");
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(n) => panic!("{n} bytes taken from a frame with no payload anywhere"),
        }
    }
}

#[test]
fn a_shm_frame_without_its_payload_is_a_protocol_error() {
    let no_ring = bogus_shm_frame(false);
    assert!(no_ring.contains("made no ring"), "{no_ring}");
    let empty = bogus_shm_frame(true);
    assert!(
        empty.contains("ring holds 0 bytes") && empty.contains("100000"),
        "{empty}"
    );
}

/// Set in the child that runs inside its own mount namespace.
const SMALL_SHM: &str = "KOLO_TEST_SMALL_SHM";

/// Run this test binary's test `name` in a mount namespace whose `/dev/shm`
/// is a fresh tmpfs of `size`, with a FIFO and a symlink planted under
/// kolo's prefix. False (after saying SKIPPED) where namespaces need a root
/// that this process is not.
fn in_small_dev_shm(name: &str, size: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || which("unshare").is_none() {
        eprintln!("SKIPPED: {name} needs root and unshare(1) for a mount namespace");
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && \
         mkfifo /dev/shm/kolo-planted-fifo && ln -s /etc/hostname /dev/shm/kolo-planted-link && \
         exec \"$0\" {name} --exact --nocapture"
    );
    // A hang (a FIFO opened blocking) fails the test after 5 minutes.
    let out = std::process::Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "300",
            "unshare",
            "--mount",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script])
        .arg(&exe)
        .env(SMALL_SHM, size)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "/dev/shm of {size}: {:?}\n{text}",
        out.status
    );
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
    true
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

/// Docker's and Kubernetes' default /dev/shm is 64 MiB, and others use it
/// too: with too little room, rings shrink or give way to TCP, and no rank
/// dies of SIGBUS. A FIFO and a symlink planted under the prefix neither
/// block the start nor get followed.
#[test]
fn a_small_or_full_dev_shm_gives_exact_results_over_tcp() {
    let name = "a_small_or_full_dev_shm_gives_exact_results_over_tcp";
    let Some(size) = std::env::var_os(SMALL_SHM) else {
        // 1 MiB: no room for rings; 8 MiB: rings for 3 ranks, not for 8.
        for size in ["1m", "8m"] {
            in_small_dev_shm(name, size);
        }
        return;
    };
    for n in [3, 8] {
        let tcp = run(n, 0, 1);
        let got = run(n, 1 << 20, 1);
        for (r, ((p, _), (q, _))) in got.iter().zip(&tcp).enumerate() {
            assert_eq!(
                p, q,
                "/dev/shm of {size:?}, n={n} rank {r}: bits differ from TCP"
            );
        }
        // 8 MiB leaves room for the rings of 3 ranks (shrunk to share it).
        if size == "8m" && n == 3 {
            assert!(
                got.iter().all(|(_, shm)| *shm > 0),
                "n=3 in 8 MiB: no rings used"
            );
        }
    }
    assert!(std::path::Path::new("/dev/shm/kolo-planted-fifo").exists());
    assert!(std::path::Path::new("/dev/shm/kolo-planted-link").is_symlink());
}
