//! Hostile clients against a live 4-rank job's rendezvous store: a wrong
//! secret, no secret, garbage, a valid prefix followed by garbage, a bare
//! request without a handshake, and a replay of a recorded legitimate session.
//! Each is refused (the connection is closed, and nothing it asked for
//! happens), the job's allreduces stay exact, and the store keeps serving.
//! The same kinds of strangers against the ranks' data listeners while the
//! mesh is being established: each is dropped and the job still forms.

mod common;

use kolo::auth::Secret;
use kolo::rendezvous::{StoreClient, StoreServer};
use kolo::{Communicator, Config, ReduceOp};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "security-test-job-secret";

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Write `bytes` to the store and wait for it to close the connection;
/// returns what the server sent before closing.
fn send_and_expect_close(store: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(store).expect("connect to the store");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may close before reading everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the store did not close a hostile connection: {e}"),
    }
    got
}

/// A TCP relay from a fresh local port to `to`, recording what the client sends.
fn recording_proxy(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = log.clone();
    std::thread::spawn(move || {
        let (mut client, _) = l.accept().unwrap();
        let mut server = TcpStream::connect(to).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let mut buf = [0u8; 4096];
        loop {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Both);
    });
    (addr, log)
}

#[test]
fn hostile_clients_are_refused_and_the_job_is_undisturbed() {
    let secret = Secret::new(SECRET);
    let server = StoreServer::bind_with("127.0.0.1:0", secret.clone()).unwrap();
    let store = server.local_addr();
    let port = store.port();
    let n = 4;
    let steps = 60;
    let count = 1 << 14;

    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..n)
            .map(|r| {
                let secret = secret.clone();
                s.spawn(move || {
                    let mut cfg = common::config(r, n, port);
                    cfg.secret = secret;
                    let c = Communicator::init(cfg).unwrap_or_else(|e| panic!("rank {r}: {e}"));
                    let mut wrong = 0usize;
                    for step in 0..steps {
                        let mut v: Vec<i64> =
                            (0..count).map(|i| (r * 1000 + i + step) as i64).collect();
                        c.allreduce(&mut v, ReduceOp::Sum).unwrap();
                        // Serial reference: sum over ranks of r*1000 + i + step.
                        let base = (0..n).map(|q| q * 1000).sum::<usize>();
                        wrong += v
                            .iter()
                            .enumerate()
                            .filter(|&(i, &x)| x != (base + n * (i + step)) as i64)
                            .count();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    wrong
                })
            })
            .collect();

        // The attacks, while the ranks run.
        // 1. A wrong secret and no secret: refused, and the client says why.
        let wrong = Secret::new("not-the-job-secret");
        let e = StoreClient::connect_with(&store.to_string(), 90, wrong.as_ref(), soon())
            .err()
            .expect("a wrong secret was accepted");
        assert!(e.to_string().contains("authentication"), "{e}");
        let e = StoreClient::connect_with(&store.to_string(), 91, None, soon())
            .err()
            .expect("a client without a secret was accepted");
        assert!(e.to_string().to_lowercase().contains("secret"), "{e}");

        // 2. Random bytes, a valid request frame with no handshake, and a huge
        //    run of 0xff (any length field in it is enormous): each closed.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        send_and_expect_close(store, &garbage);
        for (_, req) in kolo::fuzzing::valid_store_requests() {
            send_and_expect_close(store, &req);
        }
        let mut huge = kolo::fuzzing::valid_handshake(1, [3; 32]);
        huge.truncate(8); // a hello's valid prefix ...
        huge.resize(huge.len() + (1 << 16), 0xff); // ... then nonsense
        send_and_expect_close(store, &huge);

        // 3. Replay: record a legitimate session that adds 1 to a counter,
        //    then send its bytes again on a new connection.
        let (proxy, log) = recording_proxy(store);
        {
            let mut legit =
                StoreClient::connect_with(&proxy.to_string(), 92, secret.as_ref(), soon()).unwrap();
            assert_eq!(legit.add("security/counter", 1).unwrap(), 1);
        }
        std::thread::sleep(Duration::from_millis(200));
        let recorded = log.lock().unwrap().clone();
        assert!(!recorded.is_empty());
        send_and_expect_close(store, &recorded);
        let mut check =
            StoreClient::connect_with(&store.to_string(), 93, secret.as_ref(), soon()).unwrap();
        assert_eq!(
            check.add("security/counter", 0).unwrap(),
            1,
            "the replayed session's add was executed"
        );

        // The job's results are exact on every rank.
        for (r, h) in ranks.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), 0, "rank {r} got wrong elements");
        }
        // And the store still serves a legitimate client.
        check.set("security/after", b"ok").unwrap();
        assert_eq!(check.get("security/after", soon()).unwrap(), b"ok");
    });
}

/// A deterministic xorshift stream of `len` bytes.
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn strangers_at_the_data_listeners_are_dropped_while_the_job_forms() {
    let secret = Secret::new(SECRET);
    let server = StoreServer::bind_with("127.0.0.1:0", secret.clone()).unwrap();
    let store = server.local_addr();
    let port = store.port();
    let n = 4;
    let count = 4099;

    std::thread::scope(|s| {
        let start_rank = |r: usize| {
            let secret = secret.clone();
            s.spawn(move || {
                let mut cfg = common::config(r, n, port);
                cfg.secret = secret;
                let c = Communicator::init(cfg).unwrap_or_else(|e| panic!("rank {r}: {e}"));
                let mut v: Vec<i64> = (0..count).map(|i| (r * 7919 + i) as i64).collect();
                c.allreduce(&mut v, ReduceOp::Sum).unwrap();
                let base: usize = (0..n).map(|q| q * 7919).sum();
                v.iter()
                    .enumerate()
                    .filter(|&(i, &x)| x != (base + n * i) as i64)
                    .count()
            })
        };
        // Ranks 0..3 publish their listeners and wait for rank 3, which comes
        // late: meanwhile the strangers below queue at those listeners and
        // are the first connections each rank's acceptor handles.
        let mut ranks: Vec<_> = (0..n - 1).map(start_rank).collect();
        let mut look =
            StoreClient::connect_with(&store.to_string(), 94, secret.as_ref(), soon()).unwrap();
        let listeners: Vec<SocketAddr> = (0..n - 1)
            .map(|r| {
                let a = look.get(&format!("kolo/addr/{r}"), soon()).unwrap();
                String::from_utf8(a).unwrap().parse().unwrap()
            })
            .collect();
        let comm_id = u64::from_le_bytes(
            look.get("kolo/comm_id", soon())
                .unwrap()
                .as_slice()
                .try_into()
                .unwrap(),
        );

        // Per listener (rank r): bytes a stranger sends.
        let strangers = |r: usize| -> Vec<(&'static str, Vec<u8>)> {
            let hello = kolo::fuzzing::data_hello(comm_id, 3, r as u32, n as u32);
            let mut huge = hello.clone();
            huge.truncate(8);
            huge.resize(huge.len() + (1 << 16), 0xff);
            vec![
                (
                    "random bytes",
                    noise(4096, 0x2545_f491_4f6c_dd1d ^ r as u64),
                ),
                // A hello naming this very job and rank, without a key.
                ("no secret", hello),
                // A complete client transcript recorded elsewhere (another
                // job, key and server nonce), replayed here.
                (
                    "replayed transcript",
                    kolo::fuzzing::valid_handshake(3, [9; 32]),
                ),
                ("a valid prefix, then 64 KiB of 0xff", huge),
            ]
        };
        let attacks: Vec<_> = listeners
            .iter()
            .enumerate()
            .flat_map(|(r, &l)| strangers(r).into_iter().map(move |(w, b)| (l, w, b)))
            .map(|(l, what, bytes)| {
                let mut c = TcpStream::connect(l).expect("connect to a data listener");
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let _ = c.write_all(&bytes);
                (l, what, c)
            })
            .collect();
        // An impostor "rank 3" with the wrong secret runs the real dialing
        // code against ranks 0..3 (and gives up on its own acceptor).
        let impostor = s.spawn(move || {
            let wrong = Secret::new("not-the-job-secret");
            let mut addrs = listeners.clone();
            let own = TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.push(own.local_addr().unwrap());
            kolo::transport::Transport::establish(
                n - 1,
                n,
                comm_id,
                own,
                &addrs,
                Instant::now() + Duration::from_secs(3),
                0,
                wrong.as_ref(),
            )
            .err()
            .expect("an impostor with the wrong secret formed a mesh")
        });
        // Now the last rank: the acceptors run, meet the strangers first,
        // drop them, and still take every rank's real connection.
        ranks.push(start_rank(n - 1));
        let e = impostor.join().unwrap().to_string();
        assert!(e.contains("KOLO_SECRET"), "impostor: {e}");
        for (l, what, mut c) in attacks {
            let mut got = Vec::new();
            match c.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("the listener at {l} kept a stranger ({what}): {e}"),
            }
            // At most the server's challenge and a refusal, never data.
            assert!(got.len() <= 256, "{what}: {} bytes came back", got.len());
        }
        for (r, h) in ranks.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), 0, "rank {r} got wrong elements");
        }
    });
}

/// The first address of this host that is not loopback, if any.
fn reachable_address() -> Option<std::net::IpAddr> {
    kolo::net::interfaces()
        .ok()?
        .into_iter()
        .map(|(_, ip)| ip)
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
}

#[test]
fn a_job_others_can_reach_refuses_to_start_without_a_secret() {
    let Some(ip) = reachable_address() else {
        eprintln!("SKIPPED: this host has no address but loopback");
        return;
    };
    // Both ranks advertise the host's own address (traffic stays on this host).
    let start = |insecure: bool| {
        let store = StoreServer::bind("127.0.0.1:0").unwrap();
        let port = store.local_addr().port();
        let got: Vec<kolo::Result<i64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    s.spawn(move || {
                        let mut cfg = Config::local(r, 2, port);
                        cfg.serve_store = false;
                        cfg.iface = Some(ip.to_string());
                        cfg.insecure = insecure;
                        cfg.start_timeout = Duration::from_secs(20);
                        let c = Communicator::init(cfg)?;
                        let mut v = [1i64];
                        c.allreduce(&mut v, ReduceOp::Sum)?;
                        Ok(v[0])
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        got
    };
    for (r, res) in start(false).iter().enumerate() {
        match res {
            Err(kolo::Error::Config(m)) => assert!(
                m.contains("KOLO_SECRET") && m.contains(&format!("rank {r}")),
                "rank {r}: {m}"
            ),
            other => panic!("rank {r}: expected a refusal, got {other:?}"),
        }
    }
    for res in start(true) {
        assert_eq!(res.unwrap(), 2, "KOLO_INSECURE=1 runs unauthenticated");
    }
}

/// Peak resident memory of this process (the store runs in it), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn an_amplifying_wait_and_a_flood_of_values_are_refused() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", store.local_addr().port());
    let client = || StoreClient::connect(&addr, 0, soon()).unwrap();
    let mut c = client();
    c.set("big", &vec![7u8; 1 << 20]).unwrap();
    // One 1 MiB value named 65536 times would be a 64 GiB reply.
    let keys = vec!["big".to_string(); 65536];
    let e = client().wait_all(&keys, soon()).unwrap_err().to_string();
    assert!(e.contains("more than once"), "{e}");
    // 1 MiB values until the store is full: refused at its cap, not grown.
    let mut stored = 1;
    let full = loop {
        match c.set(&format!("fill-{stored}"), &vec![1u8; 1 << 20]) {
            Ok(()) => stored += 1,
            Err(e) => break e.to_string(),
        }
        assert!(stored <= 64, "the store took more than 64 MiB");
    };
    assert!(full.contains("store full"), "{full}");
    assert!(stored >= 60, "refused early, after {stored} MiB");
    // Still serving, exact.
    assert_eq!(client().get("big", soon()).unwrap(), vec![7u8; 1 << 20]);
    let peak = peak_rss();
    assert!(peak < 100_000_000, "peak RSS {} MiB", peak >> 20);
    println!("store held {stored} MiB; peak RSS {} MiB", peak >> 20);
}

/// 300 strangers that connect and say nothing, at the store and at a rank's
/// data listener, while a job forms: each holds a handshake slot for at most
/// its deadline, they are authenticated side by side instead of one after
/// another (300 in turn at 2 s each would outlast the start timeout), and the
/// job starts and reduces exactly.
#[test]
fn three_hundred_silent_strangers_do_not_stop_a_job_from_starting() {
    let secret = Secret::new(SECRET);
    let server = StoreServer::bind_with("127.0.0.1:0", secret.clone()).unwrap();
    let store = server.local_addr();
    let n = 4;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let start_rank = |r: usize| {
            let secret = secret.clone();
            s.spawn(move || {
                let mut cfg = common::config(r, n, store.port());
                cfg.secret = secret;
                cfg.start_timeout = Duration::from_secs(60);
                let c = Communicator::init(cfg).unwrap_or_else(|e| panic!("rank {r}: {e}"));
                let mut v = vec![r as i64 + 1; 1000];
                c.allreduce(&mut v, ReduceOp::Sum).unwrap();
                v.iter().all(|&x| x == 10)
            })
        };
        // Ranks 0..3 publish their listeners and wait for rank 3.
        let mut ranks: Vec<_> = (0..n - 1).map(start_rank).collect();
        let mut look =
            StoreClient::connect_with(&store.to_string(), 94, secret.as_ref(), soon()).unwrap();
        let a = look.get("kolo/addr/0", soon()).unwrap();
        let listener: SocketAddr = String::from_utf8(a).unwrap().parse().unwrap();
        let silent: Vec<TcpStream> = (0..300)
            .map(|_| TcpStream::connect(store).expect("a stranger connects"))
            .collect();
        // Rank 0 accepts only once the job forms: until then its backlog
        // holds the strangers (and a connect past it waits in SYN retries).
        let at_listener = s.spawn(move || {
            (0..300)
                .filter_map(|_| TcpStream::connect_timeout(&listener, Duration::from_secs(20)).ok())
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(500));
        ranks.push(start_rank(n - 1));
        for (r, h) in ranks.into_iter().enumerate() {
            assert!(h.join().unwrap(), "rank {r}: wrong sum");
        }
        let queued = at_listener.join().unwrap();
        assert!(
            queued.len() >= 100,
            "only {} strangers reached rank 0",
            queued.len()
        );
        println!(
            "{} silent strangers at the store, {} at rank 0's listener",
            silent.len(),
            queued.len()
        );
        drop(silent);
    });
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the job took {took:?} to start and run"
    );
    println!("job formed and reduced past the strangers in {took:?}");
}
