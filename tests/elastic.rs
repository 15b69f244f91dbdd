//! Elastic training: membership changes with real processes under
//! `kolorun --min-np/--max-np`, in-process membership agreement, and the
//! refusal of frames from an older epoch.
//!
//! The process tests run this test binary itself as the rank program
//! (`worker_entry` with `KOLO_ELASTIC_TEST_WORKER=1`): an allreduce loop over
//! i64 contributions that depend on the step and the member id, committed
//! every step. Every rank prints which members took part in each committed
//! step, so the test recomputes the final sums serially from those lines and
//! compares them with what every rank ends with.
mod common;

use common::send_all;
use kolo::elastic::{self, Options, State};
use kolo::rendezvous::{StoreClient, StoreServer};
use kolo::ReduceOp;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KOLORUN: &str = env!("CARGO_BIN_EXE_kolorun");

/// A member's contribution to element `i` at `step`: integers, so sums are
/// exact and any lost or doubled contribution shows.
fn contribution(step: i64, member: u64, i: usize) -> i64 {
    ((step * 31 + member as i64 * 17 + i as i64) % 1009) - 500
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn env_num(k: &str, d: i64) -> i64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The training loop every member runs.
fn train(opts: &Options, steps: i64, len: usize, pause: Duration) -> kolo::Result<Vec<i64>> {
    let mut state = State::new();
    state.put("acc", &vec![0i64; len]);
    elastic::run_with(opts, &mut state, |comm, st| {
        let ids: Vec<String> = comm.members().iter().map(|m| m.id.to_string()).collect();
        let ids = ids.join(",");
        println!(
            "ENTRY epoch {} member {} serial {} hash {:016x} members {ids}",
            comm.epoch(),
            comm.member_id(),
            st.serial(),
            fnv(&st.encode_committed())
        );
        if let Some(s) = st.last_sync() {
            println!(
                "SYNC epoch {} member {} received {} bytes {} sources {}",
                comm.epoch(),
                comm.member_id(),
                s.received,
                s.bytes,
                s.sources.len()
            );
        }
        while st.counter("step") < steps {
            let step = st.counter("step");
            let me = comm.member_id();
            let mut v: Vec<i64> = (0..len).map(|i| contribution(step, me, i)).collect();
            comm.allreduce(&mut v, ReduceOp::Sum)?;
            let mut acc = st.get::<i64>("acc").expect("acc");
            for (a, x) in acc.iter_mut().zip(&v) {
                *a += x;
            }
            st.put("acc", &acc);
            st.set_counter("step", step + 1);
            st.commit_local();
            println!("STEP {step} epoch {} members {ids}", comm.epoch());
            comm.check_membership()?;
            std::thread::sleep(pause);
        }
        Ok(st.get::<i64>("acc").expect("acc"))
    })
}

/// The rank program of the process tests (a no-op in a normal test run).
#[test]
fn worker_entry() {
    if std::env::var("KOLO_ELASTIC_TEST_WORKER").is_err() {
        return;
    }
    let opts = Options::from_env().expect("options");
    println!("PID {} member {}", std::process::id(), opts.member_id);
    let steps = env_num("TEST_STEPS", 200);
    let len = env_num("TEST_LEN", 1 << 16) as usize;
    let pause = Duration::from_millis(env_num("TEST_PAUSE_MS", 10) as u64);
    match train(&opts, steps, len, pause) {
        Ok(acc) => {
            let bytes: Vec<u8> = acc.iter().flat_map(|x| x.to_le_bytes()).collect();
            println!(
                "FINAL member {} hash {:016x} first {}",
                opts.member_id,
                fnv(&bytes),
                acc[0]
            );
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("WORKER ERROR member {}: {e}", opts.member_id);
            std::process::exit(3);
        }
    }
}

/// The pid in a worker's "PID <pid> member <id>" line (libtest may print
/// "test worker_entry ... " before it).
fn pid_in(line: &str) -> Option<i32> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "PID")?;
    w.get(i + 1)?.parse().ok()
}

/// kolorun with collected, timestamped output lines.
struct Job {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    dir: std::path::PathBuf,
}

impl Job {
    fn start(args: &[&str], steps: i64, len: usize, tag: &str) -> Job {
        let dir = std::env::temp_dir().join(format!("kolo-elastic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(KOLORUN);
        cmd.args(args)
            .arg("--")
            .arg(exe)
            .args(["worker_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env("KOLO_ELASTIC_TEST_WORKER", "1")
            .env("TEST_STEPS", steps.to_string())
            .env("TEST_LEN", len.to_string())
            .env("KOLO_ELASTIC_TIMEOUT", "10")
            .env("KOLO_ELASTIC_CONNECT_TIMEOUT", "3")
            .env("KOLO_TIMEOUT", "10")
            .env("HOSTS_FILE", dir.join("hosts"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("start kolorun");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), l));
                }
            });
        }
        Job { child, lines, dir }
    }

    fn text(&self) -> String {
        let g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait until a line satisfies `pred`; its time.
    fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> Instant {
        let until = Instant::now() + timeout;
        loop {
            if let Some((t, _)) = self
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|(_, l)| pred(l))
            {
                return *t;
            }
            if Instant::now() > until || self.child.try_wait().unwrap().is_some() {
                let out = self.text();
                self.kill_all();
                panic!("waiting for {what}: not seen\n--- output ---\n{out}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid_of(&self, member: u64) -> i32 {
        let suffix = format!(" member {member}");
        let found = {
            let g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            g.iter()
                .map(|(_, l)| l)
                .find(|l| l.contains(" PID ") && l.ends_with(&suffix))
                .cloned()
        };
        let l = found.unwrap_or_else(|| panic!("no PID line for member {member}\n{}", self.text()));
        pid_in(&l).expect("pid")
    }

    fn kill_member(&self, member: u64) {
        // SAFETY: plain syscall on a pid this test's job started.
        unsafe { libc::kill(self.pid_of(member), libc::SIGKILL) };
    }

    fn kill_all(&mut self) {
        // SAFETY: plain syscalls on processes this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_secs(1));
        let g = self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (_, l) in g.iter().filter(|(_, l)| l.contains(" PID ")) {
            if let Some(pid) = pid_in(l) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for kolorun to exit; its status code.
    fn finish(&mut self, timeout: Duration) -> i32 {
        let until = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // last lines
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let out = self.text();
                self.kill_all();
                panic!("kolorun did not exit within {timeout:?}\n--- output ---\n{out}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_all();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Recompute the sums from the STEP lines (for each step, the members of the
/// newest epoch that committed it) and check every FINAL line against them.
/// Returns the per-epoch ENTRY hashes for further checks.
fn check_results(out: &str, steps: i64, len: usize) -> BTreeMap<u64, Vec<(u64, String)>> {
    let mut by_step: HashMap<i64, (u64, Vec<u64>)> = HashMap::new();
    let mut entries: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    let mut finals = Vec::new();
    for l in out.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.get(1).copied() {
            Some("STEP") => {
                let step: i64 = w[2].parse().unwrap();
                let epoch: u64 = w[4].parse().unwrap();
                let members: Vec<u64> = w[6].split(',').map(|x| x.parse().unwrap()).collect();
                let e = by_step.entry(step).or_insert((epoch, members.clone()));
                if epoch > e.0 {
                    *e = (epoch, members);
                } else if epoch == e.0 {
                    assert_eq!(
                        e.1, members,
                        "step {step}: members disagree within epoch {epoch}"
                    );
                }
            }
            Some("ENTRY") => {
                let epoch: u64 = w[3].parse().unwrap();
                entries
                    .entry(epoch)
                    .or_default()
                    .push((w[5].parse().unwrap(), w[9].to_string()));
            }
            Some("FINAL") => finals.push((w[3].to_string(), w[5].to_string())),
            _ => {}
        }
    }
    let mut acc = vec![0i64; len];
    for step in 0..steps {
        let (_, members) = by_step
            .get(&step)
            .unwrap_or_else(|| panic!("step {step} was never committed\n{out}"));
        for &m in members {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += contribution(step, m, i);
            }
        }
    }
    let bytes: Vec<u8> = acc.iter().flat_map(|x| x.to_le_bytes()).collect();
    let want = format!("{:016x}", fnv(&bytes));
    assert!(!finals.is_empty(), "no rank finished\n{out}");
    for (m, h) in &finals {
        assert_eq!(
            h, &want,
            "member {m}: final sums differ from the serial reference\n{out}"
        );
    }
    // After each change every member entered the body with the same state.
    for (epoch, es) in &entries {
        let first = &es[0].1;
        assert!(
            es.iter().all(|(_, h)| h == first),
            "epoch {epoch}: members entered with different states: {es:?}\n{out}"
        );
    }
    entries
}

fn epoch_members(out: &str, epoch: u64) -> Option<String> {
    out.lines()
        .find(|l| l.contains(" STEP ") && l.contains(&format!(" epoch {epoch} members ")))
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
}

/// N=4: one rank killed mid-run, the 3 survivors re-form and go on; then the
/// discovery script reports a fourth slot again, a new member joins and
/// receives the committed state from several survivors; the sums match the
/// serial reference throughout.
#[test]
fn kill_one_then_join() {
    let (steps, len) = (400, 1 << 16);
    let mut job = Job::start(
        &[
            "-np",
            "4",
            "--min-np",
            "2",
            "--max-np",
            "4",
            "--max-host-failures",
            "5",
            "--discovery-interval",
            "0.5",
            "--host-discovery-script",
            "cat \"$HOSTS_FILE\" 2>/dev/null || echo localhost:4",
        ],
        steps,
        len,
        "kj",
    );
    let hosts = job.dir.join("hosts");
    std::fs::write(&hosts, "localhost:4\n").unwrap();
    job.wait_line("step 30", Duration::from_secs(60), |l| {
        l.contains("STEP 30 ")
    });
    // No slot for a replacement while the survivors go on alone.
    std::fs::write(&hosts, "localhost:3\n").unwrap();
    // Long enough for kolorun's discovery (every 0.5 s) to have read it.
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    job.kill_member(2);
    let resumed = job.wait_line("3 survivors", Duration::from_secs(60), |l| {
        l.contains(" STEP ") && l.ends_with(" members 0,1,3")
    });
    eprintln!(
        "kill -> first step committed by the 3 survivors: {:.3}s",
        (resumed - killed).as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&hosts, "localhost:4\n").unwrap();
    job.wait_line("the new member", Duration::from_secs(60), |l| {
        l.contains(" STEP ") && l.ends_with(" members 0,1,3,4")
    });
    let code = job.finish(Duration::from_secs(120));
    let out = job.text();
    assert_eq!(code, 0, "{out}");
    let entries = check_results(&out, steps, len);
    // Member 4 entered with the survivors' exact state, sent by several of them.
    let (epoch, _) = entries
        .iter()
        .find(|(_, es)| es.iter().any(|(m, _)| *m == 4))
        .expect("member 4 entered");
    let sync = out
        .lines()
        .find(|l| l.contains(&format!("SYNC epoch {epoch} member 4 ")))
        .unwrap_or_else(|| panic!("no SYNC line for member 4\n{out}"));
    let w: Vec<&str> = sync.split_whitespace().collect();
    assert_eq!(w[7], "true", "{sync}");
    assert!(
        w[11].parse::<usize>().unwrap() >= 2,
        "state from one source only: {sync}"
    );
    assert!(
        epoch_members(&out, 0).as_deref() == Some("0,1,2,3"),
        "{out}"
    );
}

/// Two ranks lost at once, rank 0 among them: the other two go on with
/// correct sums, the oldest survivor (member 1) as rank 0.
#[test]
fn two_lost_at_once() {
    let (steps, len) = (250, 4096);
    let mut job = Job::start(
        &["-np", "4", "--min-np", "2", "--max-np", "4"],
        steps,
        len,
        "two",
    );
    job.wait_line("step 30", Duration::from_secs(60), |l| {
        l.contains("STEP 30 ")
    });
    job.kill_member(0);
    job.kill_member(2);
    job.wait_line("2 survivors", Duration::from_secs(60), |l| {
        l.contains(" STEP ") && l.ends_with(" members 1,3")
    });
    let code = job.finish(Duration::from_secs(120));
    let out = job.text();
    assert_eq!(code, 0, "{out}");
    check_results(&out, steps, len);
}

/// Falling below --min-np ends the job with a clear message, no deadlock.
#[test]
fn below_min_np_ends_the_job() {
    let mut job = Job::start(
        &["-np", "3", "--min-np", "3", "--max-np", "3"],
        100_000,
        1024,
        "min",
    );
    job.wait_line("step 10", Duration::from_secs(60), |l| {
        l.contains("STEP 10 ")
    });
    let killed = Instant::now();
    job.kill_member(1);
    let code = job.finish(Duration::from_secs(60));
    let out = job.text();
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("below --min-np 3"), "{out}");
    eprintln!(
        "below min-np: job ended {:.2}s after the kill",
        killed.elapsed().as_secs_f64()
    );
}

/// Options of in-process member `m` against the store at `port`.
fn inproc_opts(m: u64, port: u16, min_np: usize) -> Options {
    let vars: HashMap<&str, String> = HashMap::from([
        ("KOLO_RANK", m.to_string()),
        ("KOLO_SIZE", "3".into()),
        ("KOLO_MASTER_PORT", port.to_string()),
        ("KOLO_STORE", "external".into()),
        ("KOLO_MIN_NP", min_np.to_string()),
        ("KOLO_ELASTIC_TIMEOUT", "5".into()),
        ("KOLO_ELASTIC_CONNECT_TIMEOUT", "1.5".into()),
        ("KOLO_TIMEOUT", "10".into()),
    ]);
    Options::from_vars(|k| vars.get(k).cloned()).unwrap()
}

/// A store for in-process members 0, 1 and 2, listed as alive as kolorun
/// would; the server (keep it) and its port.
fn inproc_store() -> (StoreServer, u16) {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let port = store.local_addr().port();
    set_alive(port, b"0,1,2").unwrap();
    (store, port)
}

/// Replace the live member list in the store at `port`, as kolorun does when
/// a member exits; the client, for more of what a launcher would write.
fn set_alive(port: u16, ids: &[u8]) -> kolo::Result<StoreClient> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = StoreClient::connect(&format!("127.0.0.1:{port}"), 99, deadline)?;
    c.set(elastic::membership::ALIVE_KEY, ids)?;
    Ok(c)
}

/// In-process, without kolorun: when the launcher's live list falls below
/// min-np, every survivor's run ends at once with an error that says so.
#[test]
fn survivors_below_min_np_fail_clearly() {
    let (_store, port) = inproc_store();
    let start = Instant::now();
    let res: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3u64)
            .map(|m| {
                let o = inproc_opts(m, port, 3);
                s.spawn(move || {
                    let mut state = State::new();
                    elastic::run_with(&o, &mut state, |comm, st| {
                        for step in 0.. {
                            if m == 2 && step == 5 {
                                set_alive(port, b"0,1")?;
                                return Err(kolo::Error::Config("member 2 dies".into()));
                            }
                            comm.barrier()?;
                            st.commit(comm)?;
                        }
                        Ok(())
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, r) in res.iter().enumerate().take(2) {
        let e = r.as_ref().unwrap_err().to_string();
        assert!(e.contains("below the minimum of 3"), "member {m}: {e}");
    }
    // Well before the 5 s registration window: the live list decides.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

/// In-process: a member registers for the next epoch and dies before it
/// connects (the store lists it, the mesh never forms); the others give up
/// on that epoch within the connect timeout and form the one after.
#[test]
fn member_lost_during_the_change() {
    let (_store, port) = inproc_store();
    let addr = format!("127.0.0.1:{port}");
    let opts = |m: u64| inproc_opts(m, port, 2);
    let (steps, len) = (60i64, 512usize);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..3u64)
            .map(|m| {
                let o = opts(m);
                s.spawn(move || {
                    let mut state = State::new();
                    state.put("acc", &vec![0i64; len]);
                    let mut epochs = Vec::new();
                    let r = elastic::run_with(&o, &mut state, |comm, st| {
                        epochs.push((comm.epoch(), comm.members().len()));
                        while st.counter("step") < steps {
                            let step = st.counter("step");
                            if m == 2 && step == 20 {
                                // This member "dies": its sockets close when
                                // run_with returns, and the launcher drops it.
                                // A phantom member 7 registers for epoch 1 and never connects.
                                let mut c = set_alive(port, b"0,1,7")?;
                                let k = c.add("kolo/e1/count", 1)?;
                                c.set(
                                    &format!("kolo/e1/reg/{k}"),
                                    b"7,1,18446744073709551615,ghost",
                                )?;
                                return Err(kolo::Error::Config("member 2 dies".into()));
                            }
                            let mut v: Vec<i64> = (0..len)
                                .map(|i| contribution(step, comm.member_id(), i))
                                .collect();
                            comm.allreduce(&mut v, ReduceOp::Sum)?;
                            let mut acc = st.get::<i64>("acc").unwrap();
                            acc.iter_mut().zip(&v).for_each(|(a, x)| *a += x);
                            st.put("acc", &acc);
                            st.set_counter("step", step + 1);
                            st.commit(comm)?;
                        }
                        Ok(st.get::<i64>("acc").unwrap())
                    });
                    (r, epochs)
                })
            })
            .collect();
        // Once epoch 1 is closed (with the phantom), the launcher notices it is gone.
        let mut watcher =
            StoreClient::connect(&addr, 98, Instant::now() + Duration::from_secs(5)).unwrap();
        watcher
            .get("kolo/e1/members", Instant::now() + Duration::from_secs(30))
            .expect("epoch 1 closed");
        set_alive(port, b"0,1").unwrap();
        let res: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        // Serial reference: steps 0..20 by members 0,1,2, the rest by 0,1.
        let mut want = vec![0i64; len];
        for step in 0..steps {
            let members: &[u64] = if step < 20 { &[0, 1, 2] } else { &[0, 1] };
            for &m in members {
                want.iter_mut()
                    .enumerate()
                    .for_each(|(i, a)| *a += contribution(step, m, i));
            }
        }
        for (m, (r, epochs)) in res.into_iter().enumerate() {
            if m == 2 {
                assert!(r.unwrap_err().to_string().contains("member 2 dies"));
                continue;
            }
            let acc = r.unwrap_or_else(|e| panic!("member {m}: {e}"));
            assert_eq!(acc, want, "member {m}");
            // Epoch 0 with 3, epoch 1 never formed (phantom), epoch 2 with 2.
            assert_eq!(epochs, vec![(0, 3), (2, 2)], "member {m}");
        }
    });
}

/// A frame from an older epoch is refused: the hello of a connection from an
/// epoch-0 member to an epoch-1 mesh is dropped, and a data frame carrying
/// the epoch-0 id on an epoch-1 connection fails the collective with an
/// error that names both epochs.
#[test]
fn old_epoch_frame_is_refused() {
    use kolo::transport::frame::{Desc, Header, Kind};
    use kolo::transport::{Incoming, Transport};
    let job = 0x1234_5678_0000_0000u64;
    let (old, new) = (elastic::comm_id(job, 0), elastic::comm_id(job, 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    let l0 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    // A stale epoch-0 connection to rank 0's epoch-1 listener is dropped.
    let mut stale = std::net::TcpStream::connect(addrs[0]).unwrap();
    std::io::Write::write_all(&mut stale, &kolo::fuzzing::data_hello(old, 1, 0, 2)).unwrap();
    let a2 = addrs.clone();
    let t = std::thread::spawn(move || {
        Transport::establish(1, 2, new, l1, &a2, deadline, 0, None).unwrap()
    });
    let mut t0 = Transport::establish(0, 2, new, l0, &addrs, deadline, 0, None).unwrap();
    let mut t1 = t.join().unwrap();
    // The stale connection was closed without a reply.
    stale
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // It gets at most a refusal, then the connection is closed.
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut stale, &mut got).expect("closed, not timed out");
    assert!(
        got.len() <= 80,
        "the epoch-0 hello was not refused: {got:?}"
    );
    // Rank 1 sends a frame stamped with the old epoch's id.
    let desc = Desc {
        coll: 1,
        dtype: 6,
        op: 1,
        root: 0,
        count: 2,
    };
    let h = Header {
        kind: Kind::Data,
        desc,
        comm_id: old,
        seq: 1,
        len: 8,
    };
    let enc = h.encode();
    send_all(&mut t1, 0, &enc);
    let mut inc = Incoming::new(1, Header { comm_id: new, ..h });
    let mut buf = [0u8; 8];
    let until = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match inc.progress(&mut t0, &mut buf) {
            Err(kolo::transport::RecvError::Protocol(m)) => break m,
            Err(e) => panic!("expected a protocol error, got {e:?}"),
            Ok(_) => {
                assert!(Instant::now() < until, "the old frame was not refused");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let text = elastic::explain_foreign(&err);
    assert!(
        text.contains("epoch 0") && text.contains("epoch 1") && text.contains("refused"),
        "{text}"
    );
}
