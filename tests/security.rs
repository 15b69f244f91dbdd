//! Hostile clients against a live 4-rank job's rendezvous store: a wrong
//! secret, no secret, garbage, a valid prefix followed by garbage, a bare
//! request without a handshake, and a replay of a recorded legitimate session.
//! Each is refused (the connection is closed, and nothing it asked for
//! happens), the job's allreduces stay exact, and the store keeps serving.

mod common;

use kolo::auth::Secret;
use kolo::rendezvous::{StoreClient, StoreServer};
use kolo::{Communicator, ReduceOp};
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
