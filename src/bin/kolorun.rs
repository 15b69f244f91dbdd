//! `kolorun`: start a kolo job (like `mpirun`/`horovodrun`).
//!
//! It serves the rendezvous store itself, starts every rank with the `KOLO_*`
//! variables set (locally, or over ssh) and a per-job secret (`KOLO_SECRET`,
//! never on a command line), prefixes each output line with the
//! rank, forwards SIGINT/SIGTERM, and stops the whole job as soon as one rank
//! fails, exiting with that rank's status. Run `kolorun --help` for usage.
use crossbeam_channel::Sender;
use kolo::auth::Secret;
use kolo::net;
use kolo::rendezvous::StoreServer;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest line forwarded in one piece; longer lines are split.
const MAX_LINE: u64 = 1 << 20;
/// After every rank has exited, how long to wait for pipes that a leftover
/// grandchild still holds open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// After the first rank fails, how long to keep collecting exits before
/// stopping the others, so the root cause is blamed: when one rank dies, its
/// peers usually fail within milliseconds, and their exits may be handled first.
const SETTLE_AFTER_FAILURE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    np: Option<usize>,
    hosts: Vec<(String, usize)>,
    hostfile: Option<String>,
    start_timeout: String,
    output_dir: Option<PathBuf>,
    exports: Vec<(String, Option<String>)>,
    master_addr: Option<String>,
    grace: Duration,
    /// `--bind-to core`: pin each local rank to its share of the cores.
    bind: bool,
    cmd: Vec<String>,
    /// Elastic mode (`--min-np`/`--max-np`).
    elastic: Option<Box<Elastic>>,
}

/// Elastic-mode settings.
#[derive(Debug, Clone, PartialEq)]
struct Elastic {
    min_np: usize,
    max_np: usize,
    discovery: Option<String>,
    max_host_failures: usize,
    discovery_interval: Duration,
}

#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum Action {
    Help,
    Version,
    Run(Opts),
}

fn usage() -> String {
    let mut s = String::from(
        "kolorun: start a kolo job, one process per rank.

USAGE:
    kolorun -np N [OPTIONS] [--] CMD [ARGS...]

OPTIONS:
    -np, -n, --np N        number of ranks to start (default: total slots of -H/--hostfile;
                           required without them)
    -H, --host LIST        hosts as host[:slots],... (slots default 1); ranks fill hosts in
                           order. Default: all ranks on this host
    --hostfile F           file with one host per line: `host slots=N` or `host:N` or `host`;
                           `#` starts a comment
    --start-timeout S      seconds ranks wait for each other at rendezvous, passed as
                           KOLO_START_TIMEOUT (default 60)
    --output-dir D         also append each rank's output to D/rank.<r>.log
    -x VAR[=VAL]           pass VAR to every rank, with VAL or its value in kolorun's
                           environment (repeatable; local ranks inherit the environment anyway)
    --master-addr A        address remote hosts use to reach kolorun's store (default: the
                           local address that routes to the first remote host)
    --grace S              seconds between forwarding SIGTERM/SIGINT and SIGKILL (default 5)
    --bind-to core|none    core (default): when this host has at least as many usable cores
                           as local ranks, pin local rank i to the i-th equal share of them
                           (as mpirun binds), so two ranks never share a core while another
                           idles; none: leave placement to the kernel. Not in elastic mode
    --min-np A             elastic mode: keep the job alive while at least A ranks live; a rank
                           that fails no longer stops the others (they re-form the group, see
                           kolo::elastic). Default with --max-np: -np
    --max-np B             elastic mode: start new ranks up to B when the discovery script
                           reports free slots (default: -np)
    --host-discovery-script S
                           elastic mode: run S every few seconds; it prints `host:slots` lines
                           (the hosts usable now). Without it no rank is added or replaced
    --max-host-failures K  elastic mode: a host where ranks failed more than K times gets no
                           new ranks (default 3)
    --discovery-interval S seconds between runs of the discovery script (default 2)
    -h, --help             print this help
    --version              print the version

Local ranks run directly; ranks on other hosts run through
`ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new HOST 'IFS= read -r KOLO_SECRET;
export KOLO_SECRET; cd CWD && exec env ... CMD'`, with the job secret as the first line of
ssh's standard input (so `ps` never shows it).
Each output line is prefixed with `[rank] `. When a rank exits non-zero or is killed,
kolorun stops the others (SIGTERM, then SIGKILL after the grace period) and exits with
that rank's status (128+signal when it was killed by a signal). When several ranks fail
within a moment of each other, it blames the likely cause: a rank killed by a signal
before one that exited non-zero, then the earliest to exit.

ENVIRONMENT (set by kolorun for each rank: KOLO_RANK, KOLO_SIZE, KOLO_LOCAL_RANK,
KOLO_LOCAL_SIZE, KOLO_MASTER_ADDR, KOLO_MASTER_PORT, KOLO_STORE=external,
KOLO_START_TIMEOUT, and KOLO_SECRET: kolorun's own if set, else a fresh random one for
this job, which its store requires too; the others pass through from kolorun's
environment or -x):
",
    );
    let w = kolo::config::ENV_DOC
        .iter()
        .map(|(k, _, _)| k.len())
        .max()
        .unwrap_or(0);
    for (name, default, meaning) in kolo::config::ENV_DOC {
        s.push_str(&format!("    {name:w$}  {meaning} [default: {default}]\n"));
    }
    s
}

fn parse_slots(spec: &str, what: &str) -> Result<(String, usize), String> {
    let spec = spec.trim();
    // host:N, but leave bare IPv6 addresses alone ("[::1]:2" works).
    if let Some((h, n)) = spec.rsplit_once(':') {
        if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) {
            let n: usize = n
                .parse()
                .map_err(|_| format!("{what}: {spec:?}: slots {n:?} is not a number"))?;
            if n == 0 {
                return Err(format!("{what}: {spec:?}: slots must be at least 1"));
            }
            kolo::net::check_host(h).map_err(|e| format!("{what}: {e}"))?;
            return Ok((h.to_string(), n));
        }
    }
    if spec.is_empty() {
        return Err(format!("{what}: empty host name"));
    }
    kolo::net::check_host(spec).map_err(|e| format!("{what}: {e}"))?;
    Ok((spec.to_string(), 1))
}

/// Parse a hostfile: `host slots=N`, `host:N` or `host` per line, `#` comments.
fn parse_hostfile(text: &str, name: &str) -> Result<Vec<(String, usize)>, String> {
    let mut hosts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let where_ = format!("{name}:{}", i + 1);
        let mut words = line.split_whitespace();
        let first = words.next().expect("non-empty line");
        let (host, mut slots) = parse_slots(first, &where_)?;
        for w in words {
            match w.strip_prefix("slots=") {
                Some(n) => {
                    slots = n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        format!("{where_}: {w:?}: slots must be a positive number")
                    })?;
                }
                // mpirun hostfiles may say max_slots=...; ignore what we do not use.
                None if w.contains('=') => {}
                None => {
                    return Err(format!(
                        "{where_}: unexpected {w:?} (expected `host slots=N`)"
                    ))
                }
            }
        }
        hosts.push((host, slots));
    }
    if hosts.is_empty() {
        return Err(format!("{name}: no hosts"));
    }
    Ok(hosts)
}

fn parse_args(args: &[String]) -> Result<Action, String> {
    let mut o = Opts {
        np: None,
        hosts: Vec::new(),
        hostfile: None,
        start_timeout: "60".into(),
        output_dir: None,
        exports: Vec::new(),
        master_addr: None,
        grace: Duration::from_secs(5),
        bind: true,
        cmd: Vec::new(),
        elastic: None,
    };
    let (mut min_np, mut max_np, mut discovery, mut max_host_failures) = (None, None, None, 3);
    let mut discovery_interval = Duration::from_secs(2);
    let mut i = 0;
    let mut saw_host = false;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            o.cmd = args[i + 1..].to_vec();
            break;
        }
        if !a.starts_with('-') || a == "-" {
            o.cmd = args[i..].to_vec();
            break;
        }
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") || f == "-np" => (f, Some(v.to_string())),
            _ => (a, None),
        };
        let value = |i: &mut usize| -> Result<String, String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            *i += 1;
            args.get(*i)
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let secs = |v: &str, flag: &str| -> Result<f64, String> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or_else(|| format!("{flag} {v:?}: expected a positive number of seconds"))
        };
        match flag {
            "-h" | "--help" => return Ok(Action::Help),
            "--version" => return Ok(Action::Version),
            "-np" | "-n" | "--np" => {
                let v = value(&mut i)?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("{flag} {v:?}: not a number"))?;
                if n == 0 {
                    return Err(format!("{flag} 0: need at least one rank"));
                }
                o.np = Some(n);
            }
            "-H" | "--host" | "--hosts" => {
                saw_host = true;
                for h in value(&mut i)?.split(',').filter(|s| !s.trim().is_empty()) {
                    o.hosts.push(parse_slots(h, flag)?);
                }
            }
            "--hostfile" => o.hostfile = Some(value(&mut i)?),
            "--start-timeout" => {
                let v = value(&mut i)?;
                secs(&v, flag)?;
                o.start_timeout = v.trim().to_string();
            }
            "--output-dir" => o.output_dir = Some(PathBuf::from(value(&mut i)?)),
            "-x" => {
                let v = value(&mut i)?;
                let (k, val) = match v.split_once('=') {
                    Some((k, val)) => (k.to_string(), Some(val.to_string())),
                    None => (v.clone(), None),
                };
                let valid = !k.is_empty()
                    && !k.starts_with(|c: char| c.is_ascii_digit())
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(format!("-x {v:?}: {k:?} is not a valid variable name"));
                }
                o.exports.push((k, val));
            }
            "--master-addr" => o.master_addr = Some(value(&mut i)?),
            "--grace" => o.grace = Duration::from_secs_f64(secs(&value(&mut i)?, flag)?),
            "--bind-to" => {
                o.bind = match value(&mut i)?.trim() {
                    "core" => true,
                    "none" => false,
                    v => return Err(format!("{flag} {v:?}: expected core or none")),
                }
            }
            "--min-np" | "--max-np" | "--max-host-failures" => {
                let v = value(&mut i)?;
                let n: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{flag} {v:?}: not a number"))?;
                match flag {
                    "--min-np" => min_np = Some(n),
                    "--max-np" => max_np = Some(n),
                    _ => max_host_failures = n,
                }
            }
            "--host-discovery-script" => discovery = Some(value(&mut i)?),
            "--discovery-interval" => {
                discovery_interval = Duration::from_secs_f64(secs(&value(&mut i)?, flag)?)
            }
            _ => return Err(format!("unknown option {a:?} (see kolorun --help)")),
        }
        i += 1;
    }
    if o.cmd.is_empty() {
        return Err("no command given (see kolorun --help)".into());
    }
    if saw_host && o.hostfile.is_some() {
        return Err("give hosts with -H or --hostfile, not both".into());
    }
    if saw_host && o.hosts.is_empty() {
        return Err("-H: no hosts given".into());
    }
    if o.np.is_none() && !saw_host && o.hostfile.is_none() && discovery.is_none() {
        return Err("-np N is required when no hosts are given".into());
    }
    if min_np.is_some() || max_np.is_some() {
        let np = o.np.or(min_np).unwrap_or(1);
        let (lo, hi) = (
            min_np.unwrap_or(np),
            max_np.unwrap_or(np.max(min_np.unwrap_or(0))),
        );
        if lo == 0 {
            return Err("--min-np 0: need at least one rank".into());
        }
        if lo > hi {
            return Err(format!("--min-np {lo} is above --max-np {hi}"));
        }
        if let Some(n) = o.np {
            if n < lo || n > hi {
                return Err(format!("-np {n} is outside --min-np {lo} .. --max-np {hi}"));
            }
        }
        o.elastic = Some(Box::new(Elastic {
            min_np: lo,
            max_np: hi,
            discovery,
            max_host_failures,
            discovery_interval,
        }));
    } else if discovery.is_some() {
        return Err("--host-discovery-script needs elastic mode (--min-np/--max-np)".into());
    }
    Ok(Action::Run(o))
}

/// Quote `s` for a POSIX shell: safe words stay as they are, anything else is
/// single-quoted with embedded quotes spliced in as `'\''`.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command ssh runs on a remote host for one rank. It reads the job
/// secret from the first line of its standard input (kolorun writes it there),
/// so that it never appears on a command line that `ps` shows, locally or on
/// the remote host; `env` must not contain it.
///
/// OpenSSH passes no signal to a command without a terminal, so the rank
/// runs in a session of its own beside a watcher that waits for the end of
/// standard input: kolorun holds it open while the rank runs, and when
/// kolorun or its ssh dies, the watcher kills the rank's whole process group,
/// stopped or not. (A background command's stdin is /dev/null in sh, so the
/// watcher gets the session's through fd 3.)
fn remote_command(cwd: &str, env: &[(String, String)], cmd: &[String]) -> String {
    let mut s = format!(
        "IFS= read -r KOLO_SECRET; export KOLO_SECRET; cd {} || exit 127; exec 3<&0; setsid env",
        shell_quote(cwd)
    );
    for (k, v) in env {
        s.push(' ');
        s.push_str(&shell_quote(&format!("{k}={v}")));
    }
    for a in cmd {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s.push_str(
        " </dev/null 3<&- & p=$!; \
         setsid sh -c 'cat >/dev/null; kill -s KILL -- -$1' watch $p <&3 >/dev/null 2>&1 3<&- & w=$!; \
         exec 3<&-; wait $p; s=$?; kill -s TERM -- -$w 2>/dev/null; exit $s",
    );
    s
}

/// The ssh command line for a remote rank (the secret goes to its stdin).
/// The job secret (the caller's `KOLO_SECRET`, from the environment or
/// `-x KOLO_SECRET=...`, or a fresh random one; never printed) and the other
/// `-x` variables to pass.
fn job_secret_and_exports(opts: &Opts) -> (String, Vec<(String, String)>) {
    let mut secret = std::env::var("KOLO_SECRET").ok().filter(|s| !s.is_empty());
    let mut exports = Vec::new();
    for (k, v) in &opts.exports {
        if k == "KOLO_SECRET" {
            // Passed to every rank anyway, and never on a command line.
            if let Some(v) = v.clone().filter(|v| !v.is_empty()) {
                secret = Some(v);
            }
            continue;
        }
        match v.clone().or_else(|| std::env::var(k).ok()) {
            Some(v) => exports.push((k.clone(), v)),
            None => eprintln!(
                "kolorun: warning: -x {k}: {k} is not set in kolorun's environment; not passed"
            ),
        }
    }
    let secret = match secret {
        Some(s) => s,
        None => kolo::auth::generate_secret().unwrap_or_else(|e| fail(e)),
    };
    (secret, exports)
}

fn ssh_command(host: &str, cwd: &str, env: &[(String, String)], cmd: &[String]) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
    ])
    .arg("--")
    .arg(host)
    .arg(remote_command(cwd, env, cmd));
    c
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn is_local_host(host: &str, me: &str) -> bool {
    let h = host.rsplit('@').next().unwrap_or(host);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    let short = |s: &str| s.split('.').next().unwrap_or(s).to_ascii_lowercase();
    h == "localhost"
        || h == "::1"
        || h.starts_with("127.")
        || h.eq_ignore_ascii_case(me)
        || (h.parse::<std::net::IpAddr>().is_err() && short(h) == short(me))
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq)]
struct Placement {
    host: String,
    local: bool,
    local_rank: usize,
    local_size: usize,
}

/// Fill hosts in order, up to their slots.
fn place(hosts: &[(String, usize)], np: usize, me: &str) -> Result<Vec<Placement>, String> {
    let total: usize = hosts.iter().map(|(_, s)| s).sum();
    if np > total {
        return Err(format!(
            "{np} ranks requested but the hosts offer only {total} slots ({})",
            hosts
                .iter()
                .map(|(h, s)| format!("{h}:{s}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let mut out = Vec::with_capacity(np);
    'fill: for (h, slots) in hosts {
        for _ in 0..*slots {
            if out.len() == np {
                break 'fill;
            }
            out.push(Placement {
                host: h.clone(),
                local: is_local_host(h, me),
                local_rank: 0,
                local_size: 0,
            });
        }
    }
    // Every name for this machine (localhost, 127.0.0.1, its hostname) is one host.
    let key = |p: &Placement| if p.local { None } else { Some(p.host.clone()) };
    let mut counts: HashMap<Option<String>, usize> = HashMap::new();
    for p in &mut out {
        let c = counts.entry(key(p)).or_insert(0);
        p.local_rank = *c;
        *c += 1;
    }
    for p in &mut out {
        p.local_size = counts[&key(p)];
    }
    Ok(out)
}

enum Msg {
    Line {
        rank: usize,
        err: bool,
        line: Vec<u8>,
    },
    PipeClosed,
    /// A rank's process exited, observed by its waiter thread at this instant.
    Exited(usize, Instant),
    Signal(i32),
    /// Elastic mode: the hosts the discovery script reported (or why it failed).
    Hosts(Result<Vec<(String, usize)>, String>),
}

fn spawn_reader(rank: usize, err: bool, pipe: impl Read + Send + 'static, tx: Sender<Msg>) {
    std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(64 * 1024, pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    let line = std::mem::take(&mut buf);
                    if tx.send(Msg::Line { rank, err, line }).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Msg::PipeClosed);
    });
}

/// Block until `pid` has exited, without reaping it, then report. Leaving the
/// zombie in place until the main thread reaps it means the pid (and its
/// process group) cannot be reused while the main thread may still signal it.
fn spawn_waiter(rank: usize, pid: u32, tx: Sender<Msg>) {
    std::thread::spawn(move || {
        loop {
            // SAFETY: siginfo_t is plain data; waitid writes it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        // Taken here, not when the main thread handles the message, so exit
        // order is not confused by how the waiter threads were scheduled.
        let _ = tx.send(Msg::Exited(rank, Instant::now()));
    });
}

/// Forward SIGINT/SIGTERM to the main loop as messages. Installed before any
/// rank starts, so a Ctrl-C during start-up is not lost.
fn forward_signals(tx: &Sender<Msg>) {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .unwrap_or_else(|e| fail(format!("cannot install signal handlers: {e}")));
    let tx = tx.clone();
    std::thread::spawn(move || {
        for s in signals.forever() {
            if tx.send(Msg::Signal(s)).is_err() {
                break;
            }
        }
    });
}

/// How to start one rank: directly when `local`, else over ssh. The secret
/// goes into a local rank's environment, and to a remote one on stdin (see
/// [`remote_command`]); `env` must not hold it. Each rank leads its own
/// process group: signals reach everything it started, and the terminal's
/// Ctrl-C reaches only kolorun, which forwards it.
fn rank_command(
    opts: &Opts,
    local: bool,
    host: &str,
    cwd: &str,
    env: &[(String, String)],
    secret: &str,
    cpus: Option<Vec<usize>>,
) -> Command {
    let mut cmd = if local {
        let mut c = Command::new(&opts.cmd[0]);
        c.args(&opts.cmd[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KOLO_SECRET", secret)
            .stdin(Stdio::null());
        if let Some(cpus) = cpus {
            pin_to(&mut c, &cpus);
        }
        die_with_parent(&mut c);
        c
    } else {
        let mut c = ssh_command(host, cwd, env, &opts.cmd);
        c.stdin(Stdio::piped());
        die_with_parent(&mut c);
        c
    };
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd
}

/// `--bind-to core`: local rank `local_rank` of `local_size` gets the
/// `local_rank`-th of `local_size` equal, consecutive shares of `cpus` (the
/// remainder unused); `None` when there are fewer CPUs than ranks, where
/// pinning would only stack ranks (mpirun does not bind oversubscribed
/// ranks either).
fn core_share(cpus: &[usize], local_rank: usize, local_size: usize) -> Option<Vec<usize>> {
    if local_size == 0 || local_rank >= local_size || cpus.len() < local_size {
        return None;
    }
    let k = cpus.len() / local_size;
    Some(cpus[local_rank * k..(local_rank + 1) * k].to_vec())
}

/// Pin the child to `cpus` between fork and exec. Best effort: a rank that
/// cannot be pinned (a CPU gone offline, a restrictive cgroup) runs unpinned.
fn pin_to(cmd: &mut Command, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data, filled here before the fork.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c < CPU_SETSIZE (it came from CPU_ISSET's range).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: the hook makes one async-signal-safe system call on a copy of
    // the set and touches nothing else of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// SIGKILL the child when kolorun dies, however it dies (SIGKILL, SIGHUP
/// of its terminal): no local rank, and no ssh of a remote one, outlives the
/// launcher. The signal follows the thread that forked, so ranks are only
/// started from kolorun's main thread.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe; read before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook makes async-signal-safe calls only and touches none
    // of the parent's memory but a copied integer.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // kolorun died before the signal was armed.
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
}

/// Spawn a rank from [`rank_command`]: hand an ssh its secret line, and start
/// the threads that forward its output and report its exit as rank `id`.
fn start_rank(
    mut cmd: Command,
    secret: &str,
    id: usize,
    tx: &Sender<Msg>,
) -> std::io::Result<Child> {
    let mut child = cmd.spawn()?;
    if let Some(stdin) = child.stdin.as_mut() {
        // 65 bytes fit in any pipe buffer: this does not block. An ssh that
        // already failed reports that itself. The pipe then stays open as
        // long as the child is kept: its end tells the remote watcher
        // (see [`remote_command`]) that kolorun is gone.
        let _ = writeln!(stdin, "{secret}");
    }
    spawn_reader(id, false, child.stdout.take().expect("piped"), tx.clone());
    spawn_reader(id, true, child.stderr.take().expect("piped"), tx.clone());
    spawn_waiter(id, child.id(), tx.clone());
    Ok(child)
}

/// `--output-dir`'s log file for rank `id` (appended to).
fn open_log(dir: &std::path::Path, id: usize) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("rank.{id}.log")))
}

/// Print one line of rank `rank`'s output with its `[rank] ` prefix, and
/// append it unprefixed to the rank's log, if any.
fn forward_line(rank: usize, err: bool, line: &[u8], logs: &mut [Option<File>]) {
    let mut out = Vec::with_capacity(line.len() + 8);
    out.extend_from_slice(format!("[{rank}] ").as_bytes());
    let text = out.len();
    out.extend_from_slice(line);
    out.push(b'\n');
    let _ = if err {
        std::io::stderr().lock().write_all(&out)
    } else {
        let mut s = std::io::stdout().lock();
        s.write_all(&out).and_then(|_| s.flush())
    };
    if let Some(Some(f)) = logs.get_mut(rank) {
        let _ = f.write_all(&out[text..]);
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Exit status as a shell reports it, and a description.
fn status_of(st: ExitStatus) -> (i32, String) {
    match (st.code(), st.signal()) {
        (Some(c), _) => (c, c.to_string()),
        (None, Some(s)) => (
            128 + s,
            format!("{} (killed by signal {s}, {})", 128 + s, signal_name(s)),
        ),
        _ => (1, "unknown".into()),
    }
}

struct Rank {
    child: Option<Child>,
    host: String,
    running: bool,
}

struct Job {
    ranks: Vec<Rank>,
    kill_at: Option<Instant>,
    grace: Duration,
    /// Set once the job is being torn down (a failure, a signal, a spawn error).
    stopping: bool,
    /// Whether leftover processes of exited ranks were killed after the last leader exited.
    swept: bool,
}

impl Job {
    fn running(&self) -> usize {
        self.ranks.iter().filter(|r| r.running).count()
    }
    /// Signal the process group of every running rank (each rank leads its
    /// own), and with `exited` also the groups of ranks whose leader already
    /// exited, so processes they left behind are stopped too.
    fn signal_all(&mut self, sig: i32, exited: bool) {
        for r in self.ranks.iter().filter(|r| r.running || exited) {
            if let Some(c) = &r.child {
                // SAFETY: plain syscall. A running leader is unreaped, so its group
                // id cannot be reused; an exited rank's group is signalled only
                // while the job is stopping, seconds after the leader exited.
                unsafe { libc::kill(-(c.id() as libc::pid_t), sig) };
            }
        }
    }
    /// Ask every rank to stop, with SIGKILL after the grace period.
    fn stop(&mut self, sig: i32) {
        self.stopping = true;
        self.signal_all(sig, true);
        if self.kill_at.is_none() {
            self.kill_at = Some(Instant::now() + self.grace);
        }
    }
}

/// A rank that failed while kolorun was not stopping the job.
#[derive(Debug, Clone)]
struct Failure {
    rank: usize,
    code: i32,
    desc: String,
    /// Killed by a signal (which kolorun did not send: it sends none before
    /// the blame is settled).
    signalled: bool,
    exited_at: Instant,
}

/// The root cause among failures collected in the settling window: a rank
/// killed by a signal beats ranks that exited non-zero (those are typically
/// peers that lost it); among equals, the earliest exit, then the lowest rank.
fn root_cause(failures: &[Failure]) -> Option<&Failure> {
    failures
        .iter()
        .min_by_key(|f| (!f.signalled, f.exited_at, f.rank))
}

/// Failures seen since the first one, while the blame settles.
struct Settling {
    until: Instant,
    failures: Vec<Failure>,
    /// Ranks other than the first failing one still running when it failed.
    others: usize,
}

/// The rank each rank's diagnosis blames (see [`kolo::report`]): what the
/// ranks wrote to this launcher's store when they failed, as typed data,
/// whatever (or wherever) the program printed.
fn diagnosed(store: &StoreServer, n: usize) -> Vec<Option<usize>> {
    (0..n)
        .map(|r| {
            let raw = store.peek(&kolo::report::key(r))?;
            let d: kolo::report::Diagnosis = serde_json::from_slice(&raw).ok()?;
            d.blamed.filter(|_| d.rank == r)
        })
        .collect()
}

/// The rank most failing ranks' errors name (ties: the lowest), with the
/// ranks that named it. `named[r]` is what rank `r` reported, if anything.
fn most_named(named: &[Option<usize>], failures: &[Failure]) -> Option<(usize, Vec<usize>)> {
    let mut by: HashMap<usize, Vec<usize>> = HashMap::new();
    for f in failures {
        if let Some(Some(p)) = named.get(f.rank) {
            if *p != f.rank && *p < named.len() {
                by.entry(*p).or_default().push(f.rank);
            }
        }
    }
    by.into_iter()
        .max_by_key(|(p, v)| (v.len(), std::cmp::Reverse(*p)))
        .map(|(p, mut v)| {
            v.sort_unstable();
            (p, v)
        })
}

/// Blame the root cause of `s`, stop the job, and return the exit code.
///
/// A rank killed by a signal on this host is the root cause. Otherwise, when
/// the failing ranks' diagnoses blame a peer (`named`, from [`diagnosed`]),
/// that peer is blamed, whether it exited (a remote rank killed by a
/// signal shows up as ssh's status 255) or is still running (hung, or cut off
/// from the network). Else the earliest failure.
fn settle(job: &mut Job, s: Settling, named: &[Option<usize>]) -> i32 {
    let f = root_cause(&s.failures).expect("settling starts with a failure");
    let code = f.code;
    let blame = (!f.signalled)
        .then(|| most_named(named, &s.failures))
        .flatten()
        .filter(|(p, _)| *p < job.ranks.len());
    if let Some((p, by)) = blame {
        let host = &job.ranks[p].host;
        let by = by
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let what = match s.failures.iter().find(|x| x.rank == p) {
            Some(x) => format!("exited with status {}", x.desc),
            None if job.ranks[p].running => "is unreachable or hung".to_string(),
            None => "exited".to_string(),
        };
        let others = job.ranks.iter().filter(|r| r.running).count();
        eprintln!(
            "kolorun: rank {p} (host {host}) {what}: named by the errors of {} {by}; stopping the other {others} {}",
            if by.contains(',') { "ranks" } else { "rank" },
            plural(others)
        );
        job.stop(libc::SIGTERM);
        return code;
    }
    let host = &job.ranks[f.rank].host;
    eprintln!(
        "kolorun: rank {} (host {host}) exited with status {}; stopping the other {} {}",
        f.rank,
        f.desc,
        s.others,
        plural(s.others)
    );
    job.stop(libc::SIGTERM);
    code
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        "rank"
    } else {
        "ranks"
    }
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("kolorun: {msg}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Action::Help) => {
            print!("{}", usage());
            return;
        }
        Ok(Action::Version) => {
            println!("kolorun {}", kolo::VERSION);
            return;
        }
        Ok(Action::Run(o)) => o,
        Err(e) => fail(e),
    };
    if opts.elastic.is_some() {
        std::process::exit(run_elastic(opts));
    }
    std::process::exit(run(opts));
}

fn run(opts: Opts) -> i32 {
    let me = hostname();
    let hosts = if let Some(f) = &opts.hostfile {
        let text =
            std::fs::read_to_string(f).unwrap_or_else(|e| fail(format!("--hostfile {f}: {e}")));
        parse_hostfile(&text, f).unwrap_or_else(|e| fail(e))
    } else if !opts.hosts.is_empty() {
        opts.hosts.clone()
    } else {
        vec![(me.clone(), opts.np.unwrap_or(1))]
    };
    let np = opts
        .np
        .unwrap_or_else(|| hosts.iter().map(|(_, s)| s).sum());
    let placement = place(&hosts, np, &me).unwrap_or_else(|e| fail(e));
    let all_local = placement.iter().all(|p| p.local);

    // Serve the store ourselves; ranks get KOLO_STORE=external.
    let (bind, master_addr) = if all_local {
        (
            "127.0.0.1:0",
            opts.master_addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
        )
    } else {
        let addr = match &opts.master_addr {
            Some(a) => a.clone(),
            None => {
                let remote = &placement
                    .iter()
                    .find(|p| !p.local)
                    .expect("not all local")
                    .host;
                let h = remote.rsplit('@').next().unwrap_or(remote);
                let ip = net::resolve(h, 22)
                    .and_then(|a| net::local_ip_toward(a.ip()))
                    .ok()
                    .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
                    .or_else(|| {
                        net::interfaces()
                            .ok()
                            .and_then(|ifs| net::match_iface("^lo", &ifs, false).ok())
                    })
                    .unwrap_or_else(|| {
                        fail(format!(
                            "cannot find an address {remote} could reach kolorun at; use --master-addr"
                        ))
                    });
                ip.to_string()
            }
        };
        // An IPv6 master address needs a store that listens on IPv6.
        let v6 = net::resolve(&addr, 0).is_ok_and(|a| a.is_ipv6());
        (if v6 { "[::]:0" } else { "0.0.0.0:0" }, addr)
    };
    let (secret, exports) = job_secret_and_exports(&opts);
    let store = StoreServer::bind_with(bind, Secret::new(&secret)).unwrap_or_else(|e| fail(e));
    let port = store.local_addr().port();

    let mut logs: Vec<Option<File>> = Vec::new();
    if let Some(d) = &opts.output_dir {
        std::fs::create_dir_all(d)
            .unwrap_or_else(|e| fail(format!("--output-dir {}: {e}", d.display())));
        for r in 0..np {
            let f = open_log(d, r).unwrap_or_else(|e| {
                fail(format!(
                    "{}: {e}",
                    d.join(format!("rank.{r}.log")).display()
                ))
            });
            logs.push(Some(f));
        }
    }
    let cwd = std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| ".".into());

    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    forward_signals(&tx);

    let mut job = Job {
        ranks: Vec::with_capacity(np),
        kill_at: None,
        grace: opts.grace,
        stopping: false,
        swept: false,
    };
    let mut open_pipes = 0usize;
    let mut exit_code: Option<i32> = None;
    for (rank, p) in placement.iter().enumerate() {
        let env: Vec<(String, String)> = [
            ("KOLO_RANK", rank.to_string()),
            ("KOLO_SIZE", np.to_string()),
            ("KOLO_LOCAL_RANK", p.local_rank.to_string()),
            ("KOLO_LOCAL_SIZE", p.local_size.to_string()),
            ("KOLO_MASTER_ADDR", master_addr.clone()),
            ("KOLO_MASTER_PORT", port.to_string()),
            ("KOLO_STORE", "external".into()),
            ("KOLO_START_TIMEOUT", opts.start_timeout.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(exports.iter().cloned())
        .collect();
        let cpus = if p.local && opts.bind {
            core_share(&kolo::host::usable_cpus(), p.local_rank, p.local_size)
        } else {
            None
        };
        let cmd = rank_command(&opts, p.local, &p.host, &cwd, &env, &secret, cpus);
        match start_rank(cmd, &secret, rank, &tx) {
            Ok(child) => {
                open_pipes += 2;
                job.ranks.push(Rank {
                    child: Some(child),
                    host: p.host.clone(),
                    running: true,
                });
            }
            Err(e) => {
                let what = if p.local { opts.cmd[0].as_str() } else { "ssh" };
                eprintln!(
                    "kolorun: cannot start rank {rank} (host {}): {what}: {e}; stopping the other {} {}",
                    p.host,
                    job.running(),
                    plural(job.running())
                );
                exit_code = Some(if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                });
                job.stop(libc::SIGTERM);
                break;
            }
        }
    }
    drop(tx);

    let mut got_signal: Option<i32> = None;
    let mut all_exited_at: Option<Instant> = None;
    let mut settling: Option<Settling> = None;
    loop {
        if settling
            .as_ref()
            .is_some_and(|s| job.running() == 0 || Instant::now() >= s.until)
        {
            let named = diagnosed(&store, np);
            exit_code = Some(settle(&mut job, settling.take().expect("checked"), &named));
        }
        let running = job.running();
        if running == 0 && all_exited_at.is_none() {
            all_exited_at = Some(Instant::now());
        }
        if running == 0 && open_pipes == 0 {
            break;
        }
        if running == 0 && job.stopping && !job.swept {
            // Every rank has exited while stopping, but something they started
            // still holds a pipe (e.g. a background job that ignores SIGINT).
            job.signal_all(libc::SIGKILL, true);
            job.swept = true;
        }
        let deadline = if running == 0 {
            all_exited_at.map(|t| t + DRAIN_AFTER_EXIT)
        } else if let Some(s) = &settling {
            Some(job.kill_at.map_or(s.until, |k| k.min(s.until)))
        } else {
            job.kill_at
        };
        let msg = match deadline {
            Some(d) => rx.recv_deadline(d),
            None => rx
                .recv()
                .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if settling.is_some() {
                    continue; // settled at the top of the loop
                }
                if running == 0 {
                    break; // a leftover process holds a pipe open; do not wait for it
                }
                eprintln!(
                    "kolorun: {running} {} still running {:.1}s after being asked to stop; sending SIGKILL",
                    plural(running),
                    job.grace.as_secs_f64()
                );
                job.signal_all(libc::SIGKILL, true);
                job.kill_at = None;
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Msg::Line { rank, err, line } => forward_line(rank, err, &line, &mut logs),
            Msg::PipeClosed => open_pipes -= 1,
            Msg::Hosts(_) => {}
            Msg::Signal(sig) => {
                if let Some(s) = settling.take() {
                    // A failure came first: report it before forwarding the signal.
                    exit_code = Some(settle(&mut job, s, &diagnosed(&store, np)));
                }
                if got_signal.is_none() {
                    eprintln!(
                        "kolorun: got {}; forwarding it to the {} running {} (SIGKILL in {:.1}s; repeat to kill now)",
                        signal_name(sig),
                        job.running(),
                        plural(job.running()),
                        job.grace.as_secs_f64()
                    );
                    got_signal = Some(sig);
                    job.stop(sig);
                } else {
                    eprintln!(
                        "kolorun: got {} again; killing the ranks now",
                        signal_name(sig)
                    );
                    job.signal_all(libc::SIGKILL, true);
                }
            }
            Msg::Exited(rank, exited_at) => {
                let r = &mut job.ranks[rank];
                let Some(child) = r.child.as_mut() else {
                    continue;
                };
                // The waiter saw the exit without reaping it; this returns at once.
                let status = child.wait();
                r.running = false;
                let signalled = matches!(&status, Ok(st) if st.signal().is_some());
                let (code, desc) = match status {
                    Ok(st) => status_of(st),
                    Err(e) => (1, format!("unknown ({e})")),
                };
                if code != 0 && !job.stopping {
                    // Do not stop the others yet: collect what else fails in
                    // the settling window and blame the root cause.
                    let failure = Failure {
                        rank,
                        code,
                        desc,
                        signalled,
                        exited_at,
                    };
                    match &mut settling {
                        Some(s) => s.failures.push(failure),
                        None => {
                            settling = Some(Settling {
                                until: Instant::now() + SETTLE_AFTER_FAILURE,
                                failures: vec![failure],
                                others: job.running(),
                            })
                        }
                    }
                }
            }
        }
    }
    if let Some(s) = settling.take() {
        exit_code = Some(settle(&mut job, s, &diagnosed(&store, np)));
    }
    let _ = std::io::stdout().flush();
    drop(store);
    exit_code.or(got_signal.map(|s| 128 + s)).unwrap_or(0)
}

/// Run the discovery script every `every` and send what it printed.
fn spawn_discovery(script: String, every: Duration, tx: Sender<Msg>) {
    std::thread::spawn(move || loop {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        let hosts = match out {
            Ok(o) if o.status.success() => {
                kolo::elastic::launch::parse_discovery(&String::from_utf8_lossy(&o.stdout))
            }
            Ok(o) => Err(format!("exited with status {}", status_of(o.status).1)),
            Err(e) => Err(e.to_string()),
        };
        if tx.send(Msg::Hosts(hosts)).is_err() {
            return;
        }
        std::thread::sleep(every);
    });
}

/// `kolorun --min-np A --max-np B`: members (ranks of elastic mode) come and
/// go; the job lives while at least A run. Each member gets a stable id
/// (`KOLO_MEMBER_ID`, also its output prefix); the store key
/// `kolo/elastic/alive` lists the running ones, which is what the members'
/// membership agreement waits for (see `kolo::elastic::membership`).
fn run_elastic(opts: Opts) -> i32 {
    let el = opts.elastic.clone().expect("elastic mode");
    let me = hostname();
    let run_script = |s: &str| -> Vec<(String, usize)> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(s)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| fail(format!("--host-discovery-script: {e}")));
        kolo::elastic::launch::parse_discovery(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|e| fail(format!("--host-discovery-script: {e}")))
    };
    let hosts = if let Some(f) = &opts.hostfile {
        let text =
            std::fs::read_to_string(f).unwrap_or_else(|e| fail(format!("--hostfile {f}: {e}")));
        parse_hostfile(&text, f).unwrap_or_else(|e| fail(e))
    } else if !opts.hosts.is_empty() {
        opts.hosts.clone()
    } else if let Some(s) = &el.discovery {
        run_script(s)
    } else {
        vec![(me.clone(), opts.np.unwrap_or(el.min_np))]
    };
    let total: usize = hosts.iter().map(|(_, s)| s).sum();
    let np = opts.np.unwrap_or(total.min(el.max_np));
    if np < el.min_np {
        fail(format!(
            "only {np} slots available, below --min-np {}",
            el.min_np
        ));
    }
    let placement = place(&hosts, np, &me).unwrap_or_else(|e| fail(e));
    let all_local = placement.iter().all(|p| p.local) && el.discovery.is_none();
    let bind = if all_local {
        "127.0.0.1:0"
    } else {
        "0.0.0.0:0"
    };
    let master_addr = opts.master_addr.clone().unwrap_or_else(|| {
        placement
            .iter()
            .find(|p| !p.local)
            .and_then(|p| {
                let h = p.host.rsplit('@').next().unwrap_or(&p.host);
                net::resolve(h, 22)
                    .and_then(|a| net::local_ip_toward(a.ip()))
                    .ok()
            })
            .map_or("127.0.0.1".to_string(), |ip| ip.to_string())
    });
    let (secret, exports) = job_secret_and_exports(&opts);
    let store = StoreServer::bind_with(bind, Secret::new(&secret)).unwrap_or_else(|e| fail(e));
    let port = store.local_addr().port();
    let mut store_client = kolo::rendezvous::StoreClient::connect_with(
        &format!("127.0.0.1:{port}"),
        usize::MAX,
        Secret::new(&secret).as_ref(),
        Instant::now() + Duration::from_secs(10),
    )
    .unwrap_or_else(|e| fail(e));
    let cwd = std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| ".".into());
    if let Some(d) = &opts.output_dir {
        std::fs::create_dir_all(d)
            .unwrap_or_else(|e| fail(format!("--output-dir {}: {e}", d.display())));
    }
    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    forward_signals(&tx);
    // Members by id; `job.ranks[id]` is member `id`.
    let mut job = Job {
        ranks: Vec::new(),
        kill_at: None,
        grace: opts.grace,
        stopping: false,
        swept: false,
    };
    let mut logs: Vec<Option<File>> = Vec::new();
    let mut open_pipes = 0usize;
    let mut failures: HashMap<String, usize> = HashMap::new();
    let mut finished = false;
    let mut exit_code: Option<i32> = None;
    let mut got_signal: Option<i32> = None;
    let publish_alive = |job: &Job, c: &mut kolo::rendezvous::StoreClient| {
        let ids: Vec<String> = job
            .ranks
            .iter()
            .enumerate()
            .filter(|(_, r)| r.running)
            .map(|(i, _)| i.to_string())
            .collect();
        if let Err(e) = c.set(
            kolo::elastic::membership::ALIVE_KEY,
            ids.join(",").as_bytes(),
        ) {
            eprintln!("kolorun: cannot update the member list in the store: {e}");
        }
    };
    let spawn = |job: &mut Job,
                 logs: &mut Vec<Option<File>>,
                 c: &mut kolo::rendezvous::StoreClient,
                 host: &str,
                 launch: Option<(usize, usize)>|
     -> Result<(), String> {
        let id = job.ranks.len();
        let local = is_local_host(host, &me);
        store_reachable_from(host, local, &master_addr)?;
        let (rank, size) = launch.unwrap_or((id, id + 1));
        let mut env: Vec<(String, String)> = [
            ("KOLO_RANK", rank.to_string()),
            ("KOLO_SIZE", size.to_string()),
            ("KOLO_LOCAL_RANK", "0".into()),
            ("KOLO_LOCAL_SIZE", "1".into()),
            ("KOLO_MASTER_ADDR", master_addr.clone()),
            ("KOLO_MASTER_PORT", port.to_string()),
            ("KOLO_STORE", "external".into()),
            ("KOLO_START_TIMEOUT", opts.start_timeout.clone()),
            ("KOLO_MEMBER_ID", id.to_string()),
            ("KOLO_MIN_NP", el.min_np.to_string()),
            ("KOLO_MAX_NP", el.max_np.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(exports.iter().cloned())
        .collect();
        if launch.is_none() {
            env.push(("KOLO_ELASTIC_NEW".into(), "1".into()));
        }
        let cmd = rank_command(&opts, local, host, &cwd, &env, &secret, None);
        // Listed as alive before it can register, so a change in progress waits for it.
        job.ranks.push(Rank {
            child: None,
            host: host.to_string(),
            running: true,
        });
        publish_alive(job, c);
        match start_rank(cmd, &secret, id, &tx) {
            Ok(child) => {
                job.ranks[id].child = Some(child);
                logs.push(opts.output_dir.as_ref().and_then(|d| open_log(d, id).ok()));
                Ok(())
            }
            Err(e) => {
                job.ranks[id].running = false;
                logs.push(None);
                publish_alive(job, c);
                Err(format!("cannot start member {id} on {host}: {e}"))
            }
        }
    };
    if let Some(script) = &el.discovery {
        spawn_discovery(script.clone(), el.discovery_interval, tx.clone());
    }
    for (rank, p) in placement.iter().enumerate() {
        match spawn(
            &mut job,
            &mut logs,
            &mut store_client,
            &p.host,
            Some((rank, np)),
        ) {
            Ok(()) => open_pipes += 2,
            Err(e) => {
                eprintln!("kolorun: {e}; stopping the job");
                exit_code = Some(126);
                job.stop(libc::SIGTERM);
                break;
            }
        }
    }
    let mut all_exited_at: Option<Instant> = None;
    loop {
        let running = job.running();
        if running == 0 && all_exited_at.is_none() {
            all_exited_at = Some(Instant::now());
        }
        if running == 0 && open_pipes == 0 {
            break;
        }
        let deadline = if running == 0 {
            all_exited_at.map(|t| t + DRAIN_AFTER_EXIT)
        } else {
            job.kill_at
        };
        let msg = match deadline {
            Some(d) => rx.recv_deadline(d),
            None => rx
                .recv()
                .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if running == 0 {
                    break;
                }
                job.signal_all(libc::SIGKILL, true);
                job.kill_at = None;
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Msg::Line { rank, err, line } => forward_line(rank, err, &line, &mut logs),
            Msg::PipeClosed => open_pipes -= 1,
            Msg::Signal(sig) => {
                if got_signal.is_none() {
                    eprintln!(
                        "kolorun: got {}; forwarding it to the {} running {}",
                        signal_name(sig),
                        job.running(),
                        plural(job.running())
                    );
                    got_signal = Some(sig);
                    job.stop(sig);
                } else {
                    job.signal_all(libc::SIGKILL, true);
                }
            }
            Msg::Hosts(Err(e)) => eprintln!("kolorun: --host-discovery-script failed: {e}"),
            Msg::Hosts(Ok(hosts)) => {
                if job.stopping || finished {
                    continue;
                }
                let mut used: HashMap<String, usize> = HashMap::new();
                for r in job.ranks.iter().filter(|r| r.running) {
                    *used.entry(r.host.clone()).or_default() += 1;
                }
                let new = kolo::elastic::launch::plan_spawns(
                    &hosts,
                    &used,
                    &failures,
                    el.max_host_failures,
                    job.running(),
                    el.max_np,
                );
                for h in new {
                    let id = job.ranks.len();
                    match spawn(&mut job, &mut logs, &mut store_client, &h, None) {
                        Ok(()) => {
                            open_pipes += 2;
                            eprintln!(
                                "kolorun: started member {id} on {h} ({} running)",
                                job.running()
                            )
                        }
                        Err(e) => {
                            eprintln!("kolorun: {e}");
                            *failures.entry(h).or_default() += 1;
                        }
                    }
                }
            }
            Msg::Exited(id, _) => {
                let r = &mut job.ranks[id];
                let Some(child) = r.child.as_mut() else {
                    continue;
                };
                let status = child.wait();
                r.running = false;
                let host = r.host.clone();
                let (code, desc) = match status {
                    Ok(st) => status_of(st),
                    Err(e) => (1, format!("unknown ({e})")),
                };
                publish_alive(&job, &mut store_client);
                if job.stopping {
                    continue;
                }
                let left = job.running();
                if code == 0 {
                    // The training finished; no member is added or replaced any more.
                    finished = true;
                    continue;
                }
                let n = failures.entry(host.clone()).or_default();
                *n += 1;
                let banned = if *n > el.max_host_failures {
                    format!("; host {host} failed {n} times and gets no new ranks")
                } else {
                    String::new()
                };
                if finished {
                    // The training completed on other members (e.g. this one
                    // joined too late): not a failure of the job.
                    eprintln!(
                        "kolorun: member {id} (host {host}) exited with status {desc} after others had finished; ignored"
                    );
                } else if left < el.min_np {
                    eprintln!(
                        "kolorun: member {id} (host {host}) exited with status {desc}; {left} {} left, below --min-np {}; stopping the job{banned}",
                        plural(left),
                        el.min_np
                    );
                    exit_code = Some(if code == 0 { 1 } else { code });
                    job.stop(libc::SIGTERM);
                } else {
                    eprintln!(
                        "kolorun: member {id} (host {host}) exited with status {desc}; {left} {} go on (--min-np {}){banned}",
                        plural(left),
                        el.min_np
                    );
                }
            }
        }
    }
    let _ = std::io::stdout().flush();
    drop(store_client);
    drop(store);
    exit_code.or(got_signal.map(|s| 128 + s)).unwrap_or(0)
}

/// A rank on another host must be told a store address it can reach. With no
/// remote host at start and no `--master-addr`, an elastic job's store is at
/// 127.0.0.1, and a rank started on a host found later would only time out
/// connecting to its own loopback: refuse to start it, saying why.
fn store_reachable_from(host: &str, local: bool, master_addr: &str) -> Result<(), String> {
    let loopback = master_addr == "localhost"
        || master_addr
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local && loopback {
        return Err(format!(
            "cannot start a rank on {host}: the store's address is {master_addr}, a loopback address \
             (no remote host was known at start); pass --master-addr with this host's address as {host} reaches it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_ranks_are_not_sent_to_a_loopback_store() {
        for addr in ["127.0.0.1", "localhost", "::1", "[::1]"] {
            let e = store_reachable_from("node7", false, addr).unwrap_err();
            assert!(
                e.contains("node7") && e.contains(addr) && e.contains("--master-addr"),
                "{e}"
            );
            assert!(store_reachable_from("localhost", true, addr).is_ok());
        }
        assert!(store_reachable_from("node7", false, "10.0.0.1").is_ok());
        assert!(store_reachable_from("node7", false, "head.example").is_ok());
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn bind_to_parses_and_defaults_to_core() {
        let run = |a: &[&str]| match parse_args(&s(a)) {
            Ok(Action::Run(o)) => Ok(o.bind),
            Ok(_) => panic!("not a run"),
            Err(e) => Err(e),
        };
        assert_eq!(run(&["-np", "2", "x"]), Ok(true));
        assert_eq!(run(&["-np", "2", "--bind-to", "none", "x"]), Ok(false));
        assert_eq!(run(&["--bind-to", "core", "-np", "2", "x"]), Ok(true));
        let e = run(&["-np", "2", "--bind-to", "socket", "x"]).unwrap_err();
        assert!(e.contains("--bind-to") && e.contains("socket"), "{e}");
    }

    #[test]
    fn core_shares_are_disjoint_equal_and_skip_oversubscription() {
        let cpus: Vec<usize> = vec![0, 1, 2, 3, 4, 5, 6, 8]; // a hole in the mask
        assert_eq!(core_share(&cpus, 0, 2), Some(vec![0, 1, 2, 3]));
        assert_eq!(core_share(&cpus, 1, 2), Some(vec![4, 5, 6, 8]));
        assert_eq!(core_share(&cpus, 2, 3), Some(vec![4, 5]));
        assert_eq!(core_share(&cpus, 7, 8), Some(vec![8]));
        assert_eq!(core_share(&cpus, 0, 9), None);
        assert_eq!(core_share(&cpus, 3, 3), None);
        assert_eq!(core_share(&[], 0, 1), None);
        for n in 1..=8 {
            let all: Vec<usize> = (0..n)
                .flat_map(|r| core_share(&cpus, r, n).unwrap())
                .collect();
            let mut dedup = all.clone();
            dedup.dedup();
            assert_eq!(all, dedup, "n={n}");
            assert_eq!(all.len(), cpus.len() / n * n, "n={n}");
        }
    }

    /// A pinned child runs only on its share: `sched_getaffinity` in the
    /// child (read through /proc) lists exactly the CPUs it was given.
    #[test]
    fn pinned_child_sees_only_its_cpus() {
        let cpus = kolo::host::usable_cpus();
        assert!(!cpus.is_empty());
        let mine = vec![*cpus.last().unwrap()];
        let mut c = Command::new("sh");
        c.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        pin_to(&mut c, &mine);
        let out = String::from_utf8(c.output().unwrap().stdout).unwrap();
        assert_eq!(
            out.split_whitespace().last(),
            Some(mine[0].to_string().as_str()),
            "{out}"
        );
    }

    #[test]
    fn quoting_round_trips_through_sh() {
        for w in [
            "plain",
            "",
            "a b",
            "it's",
            "$HOME",
            "`x`",
            "a\"b",
            "*",
            "tab\there",
            "new\nline",
            "'",
            "--x=1",
        ] {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(w)))
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                w,
                "{w:?} -> {}",
                shell_quote(w)
            );
        }
        assert_eq!(shell_quote("abc-1.2/x:y"), "abc-1.2/x:y");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn remote_command_is_one_shell_line() {
        let c = remote_command(
            "/home/me/my dir",
            &[("KOLO_RANK".into(), "1".into()), ("X".into(), "a b".into())],
            &s(&["python", "-c", "print('hi')"]),
        );
        assert_eq!(
            c,
            r#"IFS= read -r KOLO_SECRET; export KOLO_SECRET; cd '/home/me/my dir' || exit 127; exec 3<&0; setsid env KOLO_RANK=1 'X=a b' python -c 'print('\''hi'\'')' </dev/null 3<&- & p=$!; setsid sh -c 'cat >/dev/null; kill -s KILL -- -$1' watch $p <&3 >/dev/null 2>&1 3<&- & w=$!; exec 3<&-; wait $p; s=$?; kill -s TERM -- -$w 2>/dev/null; exit $s"#
        );
    }

    #[test]
    fn ssh_argv_never_carries_the_secret() {
        let secret = kolo::auth::generate_secret().unwrap();
        let env = [("KOLO_RANK".to_string(), "1".to_string())];
        let c = ssh_command("node7", "/w", &env, &s(&["prog", "--flag"]));
        assert_eq!(c.get_program(), "ssh");
        let argv: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(argv.len(), 7, "{argv:?}");
        assert_eq!(argv[4..6], ["--", "node7"], "`--` before the host");
        assert!(!argv.iter().any(|a| a.contains(&secret)), "{argv:?}");
        assert!(c.get_envs().all(|(k, _)| k != "KOLO_SECRET"));
        // The remote line reads it from stdin: run it through sh, feeding the
        // secret as ssh would, and check the command sees it.
        let line = remote_command("/", &env, &s(&["sh", "-c", "printf %s \"$KOLO_SECRET\""]));
        assert!(!line.contains(&secret));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Stdin stays open while the rank runs, as kolorun keeps it: its end
        // would tell the watcher that kolorun is gone.
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{secret}").unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        drop(stdin);
        assert!(child.wait().unwrap().success());
        assert_eq!(out, secret);
    }

    #[test]
    fn parses_flags() {
        let Action::Run(o) = parse_args(&s(&[
            "-np",
            "4",
            "-H",
            "a:2,b",
            "--start-timeout",
            "7.5",
            "-x",
            "FOO=bar",
            "-x",
            "PATH",
            "--grace=1",
            "--output-dir",
            "/tmp/o",
            "--",
            "prog",
            "-np",
            "9",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.np, Some(4));
        assert_eq!(o.hosts, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
        assert_eq!(o.start_timeout, "7.5");
        assert_eq!(
            o.exports,
            vec![("FOO".into(), Some("bar".into())), ("PATH".into(), None)]
        );
        assert_eq!(o.grace, Duration::from_secs(1));
        assert_eq!(o.cmd, s(&["prog", "-np", "9"]));
        // The command starts at the first non-option word.
        let Action::Run(o) = parse_args(&s(&["-np", "2", "sh", "-c", "x"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.cmd, s(&["sh", "-c", "x"]));
        assert_eq!(parse_args(&s(&["--help"])).unwrap(), Action::Help);
        for bad in [
            &["-np", "0", "x"][..],
            &["-np", "x", "y"],
            &["x"],
            &["-np", "2"],
            &["-np", "2", "--bogus", "x"],
            &["-np", "2", "-x", "1A", "x"],
            &["-np", "2", "--start-timeout", "-1", "x"],
            &["-H", "a:0", "x"],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_elastic_flags() {
        let Action::Run(o) = parse_args(&s(&[
            "-np",
            "4",
            "--min-np",
            "2",
            "--max-np=6",
            "--host-discovery-script",
            "./hosts.sh",
            "--max-host-failures",
            "1",
            "--discovery-interval",
            "0.5",
            "prog",
        ]))
        .unwrap() else {
            panic!()
        };
        let e = o.elastic.expect("elastic mode");
        assert_eq!((e.min_np, e.max_np, e.max_host_failures), (2, 6, 1));
        assert_eq!(e.discovery.as_deref(), Some("./hosts.sh"));
        assert_eq!(e.discovery_interval, Duration::from_millis(500));
        // Defaults: --min-np alone gives max = -np; no elastic flag, no elastic mode.
        let Action::Run(o) = parse_args(&s(&["-np", "3", "--min-np", "2", "x"])).unwrap() else {
            panic!()
        };
        let e = o.elastic.unwrap();
        assert_eq!((e.min_np, e.max_np, e.max_host_failures), (2, 3, 3));
        let Action::Run(o) = parse_args(&s(&["-np", "3", "x"])).unwrap() else {
            panic!()
        };
        assert!(o.elastic.is_none());
        for bad in [
            &["-np", "4", "--min-np", "5", "--max-np", "8", "x"][..],
            &["-np", "4", "--min-np", "3", "--max-np", "2", "x"],
            &["-np", "4", "--min-np", "0", "x"],
            &["-np", "4", "--min-np", "x", "y"],
            &["-np", "4", "--host-discovery-script", "s", "x"],
            &[
                "-np",
                "4",
                "--min-np",
                "2",
                "--discovery-interval",
                "0",
                "x",
            ],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostfile_forms() {
        let h = parse_hostfile(
            "# nodes\nn1 slots=4\nn2:2   # two\n\nn3\nn4 slots=2 max_slots=8\n",
            "hf",
        )
        .unwrap();
        assert_eq!(
            h,
            vec![
                ("n1".into(), 4),
                ("n2".into(), 2),
                ("n3".into(), 1),
                ("n4".into(), 2)
            ]
        );
        assert!(parse_hostfile("n1 slots=x\n", "hf")
            .unwrap_err()
            .contains("hf:1"));
        assert!(parse_hostfile("n1 junk\n", "hf").is_err());
        assert!(parse_hostfile("# empty\n", "hf").is_err());
    }

    #[test]
    fn placement_fills_hosts_in_order() {
        let p = place(&[("a".into(), 2), ("b".into(), 2)], 3, "me").unwrap();
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.host.as_str(), p.local_rank, p.local_size))
            .collect();
        assert_eq!(got, vec![("a", 0, 2), ("a", 1, 2), ("b", 0, 1)]);
        let p = place(
            &[("localhost".into(), 1), ("b".into(), 1), ("me".into(), 2)],
            4,
            "me",
        )
        .unwrap();
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.local, p.local_rank, p.local_size))
            .collect();
        assert_eq!(
            got,
            vec![(true, 0, 3), (false, 0, 1), (true, 1, 3), (true, 2, 3)]
        );
        assert!(place(&[("a".into(), 1)], 2, "me")
            .unwrap_err()
            .contains("only 1 slots"));
        assert!(place(&[("localhost".into(), 1)], 1, "me").unwrap()[0].local);
        assert!(place(&[("me.example.com".into(), 1)], 1, "me").unwrap()[0].local);
        assert!(!place(&[("other".into(), 1)], 1, "me").unwrap()[0].local);
    }

    #[test]
    fn local_hosts() {
        for h in [
            "localhost",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "node7",
            "node7.cluster",
            "user@node7",
        ] {
            assert!(is_local_host(h, "node7"), "{h}");
        }
        for h in ["node8", "10.0.0.7", "node70"] {
            assert!(!is_local_host(h, "node7"), "{h}");
        }
    }

    #[test]
    fn blame_goes_to_the_root_cause() {
        let t0 = Instant::now();
        let f = |rank, signalled, ms| Failure {
            rank,
            code: if signalled { 137 } else { 1 },
            desc: String::new(),
            signalled,
            exited_at: t0 + Duration::from_millis(ms),
        };
        let blamed = |fs: &[Failure]| root_cause(fs).map(|f| f.rank);
        // A peer that lost the killed rank exits first and is handled first.
        assert_eq!(
            blamed(&[f(3, false, 1), f(2, true, 5), f(0, false, 2)]),
            Some(2)
        );
        // Among equals, the earliest exit wins, whatever the handling order.
        assert_eq!(
            blamed(&[f(3, false, 9), f(1, false, 4), f(0, false, 7)]),
            Some(1)
        );
        assert_eq!(blamed(&[f(3, true, 9), f(1, true, 4)]), Some(1));
        assert_eq!(blamed(&[f(1, false, 3)]), Some(1));
        assert_eq!(blamed(&[]), None);
    }

    #[test]
    fn blame_goes_to_the_rank_the_errors_name() {
        let t0 = Instant::now();
        let f = |rank| Failure {
            rank,
            code: 1,
            desc: "1".into(),
            signalled: false,
            exited_at: t0,
        };
        // Rank 2 (remote, killed: ssh says 255) is named by two of three reports.
        let named = [Some(2), None, None, Some(2), Some(1)];
        let fs = [f(0), f(3), f(4), f(2)];
        assert_eq!(most_named(&named, &fs), Some((2, vec![0, 3])));
        // Only failing ranks' reports count, and nobody blames itself.
        assert_eq!(most_named(&[Some(0), Some(0)], &[f(0)]), None);
        assert_eq!(most_named(&named, &[f(1)]), None);
    }

    #[test]
    fn help_lists_every_variable() {
        let u = usage();
        for (k, d, _) in kolo::config::ENV_DOC {
            assert!(u.contains(k) && u.contains(d), "{k}");
        }
        for f in [
            "-np",
            "-H",
            "--hostfile",
            "--start-timeout",
            "--output-dir",
            "-x",
            "--master-addr",
            "--grace",
            "--bind-to",
        ] {
            assert!(u.contains(f), "{f}");
        }
    }
}
