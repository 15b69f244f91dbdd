//! Multi-host tests over network namespaces (`scripts/netns-cluster.sh`): four
//! "hosts" with their own sshd, ranks started by `kolorun -H` over ssh exactly
//! as on a real cluster. Each test makes its own cluster (a distinct
//! namespace prefix), so tests may run in parallel.
//!
//! Needs root (CI runs as root). Without root, or where network namespaces
//! cannot be made, the tests FAIL saying so, unless `KOLO_SKIP_NETNS=1` is set.
//!
//! Faults: a rank on the third host is SIGKILLed, SIGSTOPped or cut off (an
//! nftables drop of all its traffic, on the receiving side of every
//! namespace) in the middle of a loop of 1 MiB allreduces
//! (`examples/fault_loop.rs`); every survivor must fail naming that rank,
//! within the bound (10 s for a dead or unreachable peer, KOLO_TIMEOUT for a
//! hung one), its next call must fail at once with the same error, and kolorun
//! must exit non-zero with one line naming the rank and its host.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KOLORUN: &str = env!("CARGO_BIN_EXE_kolorun");
const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// Path of example `name` next to kolorun, built once if missing or stale.
fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = Path::new(KOLORUN).parent().expect("kolorun has a dir");
    let path = dir.join("examples").join(name);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = |n: &str| {
        let bin = mtime(&dir.join("examples").join(n));
        let src = mtime(&Path::new(MANIFEST).join(format!("examples/{n}.rs")));
        bin.is_none() || bin < src || bin < mtime(Path::new(KOLORUN))
    };
    let built = BUILT.get_or_init(|| {
        if !["fault_loop", "soak", "allreduce"].iter().any(|n| stale(n)) {
            return Ok(());
        }
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "--examples", "--manifest-path"])
            .arg(Path::new(MANIFEST).join("Cargo.toml"));
        if dir.file_name().is_some_and(|d| d == "release") {
            c.arg("--release");
        }
        let out = c.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = built {
        panic!("cargo build --examples failed: {e}");
    }
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// A four-host cluster `{prefix}1..{prefix}4`, removed on drop.
struct Cluster {
    prefix: &'static str,
}

fn script() -> PathBuf {
    Path::new(MANIFEST).join("scripts/netns-cluster.sh")
}

impl Cluster {
    /// `None` when the tests are explicitly skipped (KOLO_SKIP_NETNS=1).
    fn up(prefix: &'static str) -> Option<Cluster> {
        if std::env::var("KOLO_SKIP_NETNS").is_ok_and(|v| v == "1") {
            eprintln!("netns test skipped: KOLO_SKIP_NETNS=1");
            return None;
        }
        // SAFETY: plain syscall.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            uid, 0,
            "tests/netns.rs needs root to create network namespaces and run sshd \
             (CI runs as root); set KOLO_SKIP_NETNS=1 to skip these tests explicitly"
        );
        let out = Command::new(script())
            .arg("up")
            .env("KOLO_NETNS_PREFIX", prefix)
            .output()
            .expect("run scripts/netns-cluster.sh");
        let c = Cluster { prefix };
        assert!(
            out.status.success(),
            "scripts/netns-cluster.sh up failed (network namespaces impossible here? \
             set KOLO_SKIP_NETNS=1 to skip): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(c)
    }

    fn host(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// `cmd` run inside host `i` (1-based).
    fn exec(&self, i: usize, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(i), cmd]);
        c.current_dir(MANIFEST);
        c
    }

    /// Load `table` (nft syntax) into host `i`.
    fn nft(&self, i: usize, table: &str) {
        let mut c = self.exec(i, "nft");
        c.args(["-f", "-"]).stdin(Stdio::piped());
        let mut child = c.spawn().expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        let st = child.wait().unwrap();
        assert!(st.success(), "nft in {}: {table}", self.host(i));
    }

    /// Packets dropped so far by the `kolo_fault` table of host `i`.
    fn dropped(&self, i: usize) -> u64 {
        let out = self
            .exec(i, "nft")
            .args(["list", "table", "inet", "kolo_fault"])
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("counter packets ")
            .skip(1)
            .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("down")
            .env("KOLO_NETNS_PREFIX", self.prefix)
            .output();
    }
}

/// A kolorun job inside host 1, its output lines collected as they come.
struct Job {
    child: Child,
    lines: mpsc::Receiver<(bool, String)>,
    out: Vec<String>,
    err: Vec<String>,
}

impl Job {
    fn start(c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Job {
        let mut cmd = c.exec(1, KOLORUN);
        for (k, v) in env {
            cmd.env(k, v).args(["-x", k]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start kolorun");
        let (tx, rx) = mpsc::channel();
        for (is_err, pipe) in [
            (
                false,
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            ),
            (true, Box::new(child.stderr.take().unwrap())),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send((is_err, l));
                }
            });
        }
        Job {
            child,
            lines: rx,
            out: Vec::new(),
            err: Vec::new(),
        }
    }

    fn pump(&mut self, until: Instant) -> bool {
        let left = until.saturating_duration_since(Instant::now());
        match self
            .lines
            .recv_timeout(left.min(Duration::from_millis(100)))
        {
            Ok((true, l)) => self.err.push(l),
            Ok((false, l)) => self.out.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        true
    }

    /// Wait until `pred` holds for the stdout lines.
    fn wait_out(&mut self, what: &str, limit: Duration, pred: impl Fn(&[String]) -> bool) {
        let until = Instant::now() + limit;
        while !pred(&self.out) {
            assert!(
                Instant::now() < until && self.pump(until),
                "{what} not seen within {limit:?}:\n{}",
                self.dump()
            );
        }
    }

    /// Wait for kolorun to exit (killing it after `limit`); its exit code.
    fn finish(&mut self, limit: Duration) -> Option<i32> {
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while self.pump(Instant::now() + Duration::from_secs(2)) {}
                return st.code();
            }
            if Instant::now() >= until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                while self.pump(Instant::now() + Duration::from_secs(1)) {}
                panic!("kolorun still running after {limit:?}:\n{}", self.dump());
            }
            self.pump(until);
        }
    }

    fn dump(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.out.join("\n"),
            self.err.join("\n")
        )
    }
}

/// The rank named last in `receiving from rank P (`, `sending to rank P (` or
/// `hung peer rank P (`.
fn last_waited(line: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for pat in [
        "receiving from rank ",
        "sending to rank ",
        "hung peer rank ",
    ] {
        if let Some(i) = line.rfind(pat) {
            let rest = &line[i + pat.len()..];
            let num: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if rest[num.len()..].starts_with(" (") && best.map_or(true, |(j, _)| i > j) {
                best = num.parse().ok().map(|r| (i, r));
            }
        }
    }
    best.map(|(_, r)| r)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Stop,
    Cut,
}

/// KOLO_TIMEOUT for the hung-peer runs (a stopped peer is only caught by it).
const STOP_TIMEOUT_S: u64 = 4;

/// Inject `fault` into one rank of an N-rank allreduce loop; check every
/// survivor and kolorun; returns the survivors' detection times (ms).
/// A process's start time (field 22 of /proc/PID/stat), which tells it from
/// a later process given the same pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `born`, and not a
/// zombie (dead, waiting for its parent to reap it).
fn is_victim(pid: i32, born: u64) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true);
    !zombie && start_time(pid) == Some(born)
}

fn fault_run(prefix: &'static str, n: usize, fault: Fault) {
    let Some(c) = Cluster::up(prefix) else { return };
    let ex = example("fault_loop");
    // The victim is alone on the third host, so cutting that host off cuts one rank.
    let (hosts, victim) = match n {
        4 => (format!("{p}1:1,{p}2:1,{p}3:1,{p}4:1", p = prefix), 2),
        8 => (format!("{p}1:3,{p}2:2,{p}3:1,{p}4:2", p = prefix), 5),
        _ => unreachable!(),
    };
    let timeout = if fault == Fault::Stop {
        STOP_TIMEOUT_S.to_string()
    } else {
        // The default: detection must not depend on the inactivity timeout.
        "60".to_string()
    };
    let mut job = Job::start(
        &c,
        &["-H", &hosts, ex.to_str().unwrap()],
        &[("KOLO_TIMEOUT", &timeout)],
    );
    job.wait_out("every rank ready", Duration::from_secs(90), |out| {
        (0..n).all(|r| {
            out.iter()
                .any(|l| l.starts_with(&format!("[{r}] rank {r}: ready")))
        })
    });
    let vtag = format!("[{victim}] rank {victim}: ready pid=");
    let pid: i32 = job
        .out
        .iter()
        .find_map(|l| l.strip_prefix(&vtag))
        .and_then(|p| p.trim().parse().ok())
        .expect("victim pid");
    let born = start_time(pid).expect("victim alive");
    // Let the loop run a moment so the fault lands mid-collective.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = unix_ms();
    match fault {
        // SAFETY: plain syscalls on the victim's pid (same pid namespace).
        Fault::Kill => assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0),
        Fault::Stop => assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0),
        Fault::Cut => {
            // Drop at every receiver: all the victim's host receives, and
            // everything the others receive from it.
            let table = |rule: &str| {
                format!(
                    "table inet kolo_fault {{\n chain in {{\n  type filter hook input priority 0; policy accept;\n  {rule}\n }}\n}}\n"
                )
            };
            c.nft(3, &table("iifname \"eth0\" counter drop"));
            for h in [1, 2, 4] {
                c.nft(
                    h,
                    &table(
                        "ip saddr 10.213.0.3 counter drop\n  ip6 saddr fd00:213::3 counter drop",
                    ),
                );
            }
        }
    }
    let code = job.finish(Duration::from_secs(60));
    let drops: u64 = if fault == Fault::Cut {
        (1..=4).map(|h| c.dropped(h)).sum()
    } else {
        0
    };
    // A stopped remote rank is killed by the watcher kolorun's ssh started
    // beside it, once kolorun is gone. A cut-off host hears nothing, so its
    // rank is left to this test (its sshd would notice only by keepalive).
    // The pid may be reused once the victim is gone: it is the victim only
    // while its start time is the one read at the fault.
    let t_exit = Instant::now();
    while is_victim(pid, born) && t_exit.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = is_victim(pid, born);
    if left {
        // SAFETY: plain syscall on the victim, identified by its start time.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        !(left && fault == Fault::Stop),
        "the stopped rank {victim} (pid {pid}) outlived kolorun by 10 s"
    );
    let log = job.dump();
    assert!(
        matches!(code, Some(c) if c != 0),
        "kolorun exit {code:?}\n{log}"
    );
    let blame: Vec<&String> = job
        .err
        .iter()
        .filter(|l| l.starts_with("kolorun: "))
        .collect();
    assert_eq!(blame.len(), 1, "one kolorun line expected\n{log}");
    let host3 = c.host(3);
    assert!(
        blame[0].starts_with(&format!("kolorun: rank {victim} (host {host3}) ")),
        "kolorun blames another rank: {}\n{log}",
        blame[0]
    );
    let bound_ms: u128 = match fault {
        Fault::Kill | Fault::Cut => 10_000,
        Fault::Stop => STOP_TIMEOUT_S as u128 * 1000 + 3000,
    };
    let mut times = Vec::new();
    for r in (0..n).filter(|&r| r != victim) {
        let mine = |what: &str| {
            let tag = format!("[{r}] rank {r}: {what}");
            job.err
                .iter()
                .find(|l| l.starts_with(&tag))
                .unwrap_or_else(|| panic!("rank {r}: no `{what}` line\n{log}"))
                .clone()
        };
        let error = mine("error: ");
        let fault_line = mine("fault ");
        let next = mine("next: ");
        // The error names the victim: lost it (directly, or as reported by the
        // rank that saw it go), or timed out waiting on it.
        let names = match fault {
            Fault::Kill | Fault::Cut => {
                error.contains(&format!("lost peer rank {victim} (10.213.0.3): "))
                    && fault_line.contains(&format!("kind=PeerLost peer={victim} "))
            }
            // Timed out waiting on it, or on a rank that was itself waiting on
            // it: the rank named last (the head of the chain of waits) is the victim.
            Fault::Stop => last_waited(&error) == Some(victim),
        };
        assert!(
            names,
            "rank {r} does not name rank {victim}: {error}\n{log}"
        );
        let at: u128 = fault_line
            .split("at_ms=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{fault_line}"));
        let took = at.saturating_sub(t0);
        assert!(
            took <= bound_ms,
            "rank {r} took {took} ms (bound {bound_ms} ms): {error}\n{log}"
        );
        assert!(
            next.contains(": next: same in "),
            "rank {r}: the next call must fail the same way: {next}\n{log}"
        );
        times.push(took);
    }
    times.sort_unstable();
    println!(
        "netns fault {fault:?} N={n}: victim rank {victim}; survivors failed after {:?} ms (min {} max {}); kolorun exit {code:?}: {}{}",
        times,
        times[0],
        times[times.len() - 1],
        blame[0],
        if fault == Fault::Cut {
            format!("; nft dropped {drops} packets")
        } else {
            String::new()
        }
    );
}

#[test]
fn netns_kill_rank_n4() {
    fault_run("kk4", 4, Fault::Kill);
}

#[test]
fn netns_kill_rank_n8() {
    fault_run("kk8", 8, Fault::Kill);
}

#[test]
fn netns_stop_rank_n4() {
    fault_run("ks4", 4, Fault::Stop);
}

#[test]
fn netns_stop_rank_n8() {
    fault_run("ks8", 8, Fault::Stop);
}

#[test]
fn netns_cut_rank_n4() {
    fault_run("kc4", 4, Fault::Cut);
}

#[test]
fn netns_cut_rank_n8() {
    fault_run("kc8", 8, Fault::Cut);
}

/// Ranks advertise their own host's veth address (IPv4 by default, IPv6 with
/// an IPv6 master), never loopback, and the job runs.
#[test]
fn netns_ranks_advertise_their_veth_address() {
    let Some(c) = Cluster::up("ki") else { return };
    let ex = example("allreduce");
    let p = c.prefix;
    let hosts = format!("{p}1:1,{p}2:2,{p}3:1,{p}4:1");
    for (extra, env, addr) in [
        (vec![], vec![], "10.213.0."),
        (vec![], vec![("KOLO_IFACE", "eth")], "10.213.0."),
        (vec!["--master-addr", "fd00:213::1"], vec![], "fd00:213::"),
    ] {
        let mut args: Vec<&str> = extra.clone();
        args.extend(["-H", &hosts, ex.to_str().unwrap()]);
        let mut job = Job::start(&c, &args, &env);
        let code = job.finish(Duration::from_secs(60));
        let log = job.dump();
        assert_eq!(code, Some(0), "{log}");
        // Rank r runs on host hosts[r]: 1, 2, 2, 3, 4.
        for (r, h) in [1, 2, 2, 3, 4].into_iter().enumerate() {
            let line = job
                .err
                .iter()
                .find(|l| l.starts_with(&format!("[{r}] kolo: rank {r}: advertising ")))
                .unwrap_or_else(|| panic!("rank {r} logged no address\n{log}"));
            assert!(
                line.contains(&format!("advertising {addr}{h} on eth0 (")),
                "rank {r} on host {h}: {line}\n{log}"
            );
            assert!(
                job.out
                    .iter()
                    .any(|l| l == &format!("[{r}] rank {r} of 5: allreduce ok")),
                "{log}"
            );
        }
        assert!(
            !log.contains("advertising 127.") && !log.contains("advertising ::1 "),
            "{log}"
        );
    }
}

/// A short soak (1000 ops) with 8 ranks over the namespaces and 0.1% loss on
/// one link: every result exact, hashes equal, memory flat (see scripts/soak.sh).
#[test]
fn netns_short_soak() {
    static ONE: Mutex<()> = Mutex::new(());
    let _g = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(_c) = Cluster::up("kz") else { return };
    example("soak");
    let out = Command::new(Path::new(MANIFEST).join("scripts/soak.sh"))
        .arg("1000")
        .env("KOLO_NETNS_PREFIX", "kz")
        .env("SOAK_KEEP_CLUSTER", "1")
        .env("SOAK_BIN_DIR", Path::new(KOLORUN).parent().unwrap())
        .current_dir(MANIFEST)
        .output()
        .expect("scripts/soak.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let ok = text
        .lines()
        .filter(|l| l.contains(": soak ok ops=1000 "))
        .count();
    assert_eq!(ok, 8, "{text}");
    let summary = text.lines().find(|l| l.starts_with("soak: ")).unwrap_or("");
    println!("{summary}");
}
