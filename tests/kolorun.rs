//! End-to-end checks of the `kolorun` launcher with local ranks (`sh -c ...`).
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KOLORUN: &str = env!("CARGO_BIN_EXE_kolorun");

fn kolorun(args: &[&str]) -> Output {
    Command::new(KOLORUN)
        .args(args)
        .output()
        .expect("run kolorun")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A stand-in `ssh` in a fresh directory that runs the remote command
/// locally (so the whole remote path, quoting, cd, env and the watcher that
/// ends a rank with its session, runs without any network), and a PATH that
/// finds it first. It checks the options and the `--` before the host.
fn fake_ssh(tag: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("kolorun-fake-ssh-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ssh = dir.join("ssh");
    std::fs::write(
        &ssh,
        "#!/bin/sh\n[ \"$1 $2 $3 $4 $5\" = '-o BatchMode=yes -o StrictHostKeyChecking=accept-new --' ] || exit 99\n\
         echo \"ssh to $6\" >&2\nexec sh -c \"$7\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (dir, path)
}

/// Pids of live processes whose command line is exactly `argv`.
fn running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// Start kolorun with `args`, wait until `n` ranks printed `ready`, SIGSTOP
/// the rank running `stop` (if any), SIGKILL kolorun, and require that no
/// process running `victim` is left after 10 s.
fn killing_kolorun_leaves_nothing(args: &[&str], path: &str, n: usize, victim: &[&str]) {
    let mut child = Command::new(KOLORUN)
        .env("PATH", path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ready = 0;
    while ready < n {
        let l = lines.next().expect("kolorun output ended early").unwrap();
        ready += usize::from(l.ends_with("ready"));
    }
    let t0 = Instant::now();
    while running(victim).len() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ranks never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One rank stopped: only SIGKILL ends it.
    let stopped = running(victim)[0];
    // SAFETY: plain kill(2) on processes this test started.
    unsafe {
        libc::kill(stopped as libc::pid_t, libc::SIGSTOP);
        libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
    }
    child.wait().unwrap();
    let t0 = Instant::now();
    loop {
        let left = running(victim);
        if left.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            for pid in &left {
                // SAFETY: as above; clean up before failing.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
            panic!("ranks {left:?} outlived kolorun by 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn no_local_rank_outlives_a_killed_kolorun() {
    let secs = format!("9000.{}", std::process::id());
    let script = format!("echo ready; exec sleep {secs}");
    let args = ["-np", "2", "sh", "-c", &script];
    killing_kolorun_leaves_nothing(&args, &std::env::var("PATH").unwrap(), 2, &["sleep", &secs]);
}

#[test]
fn no_remote_rank_outlives_a_killed_kolorun() {
    let (dir, path) = fake_ssh("orphans");
    let secs = format!("9001.{}", std::process::id());
    let script = format!("echo ready; exec sleep {secs}");
    let args = [
        "-H",
        "fakehost-a,fakehost-b",
        "--master-addr",
        "127.0.0.1",
        "sh",
        "-c",
        &script,
    ];
    killing_kolorun_leaves_nothing(&args, &path, 2, &["sleep", &secs]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_host_name_that_ssh_would_read_as_an_option_is_refused() {
    let (dir, path) = fake_ssh("option");
    let marker = dir.join("ssh-ran");
    let ssh = dir.join("ssh");
    std::fs::write(&ssh, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    let hostfile = dir.join("hosts");
    std::fs::write(&hostfile, "-oProxyCommand=touch${IFS}/tmp/pwned slots=1\n").unwrap();
    for args in [
        vec!["-H", "-oProxyCommand=touch /tmp/pwned", "true"],
        vec!["-H", "ok-host,-oProxyCommand=x:2", "true"],
        vec!["--hostfile", hostfile.to_str().unwrap(), "true"],
        vec!["-H", "bad host", "true"],
    ] {
        let out = Command::new(KOLORUN)
            .env("PATH", &path)
            .args(&args)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not a host name"), "{args:?}: {err}");
        assert!(!marker.exists(), "{args:?}: ssh ran");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sets_env_per_rank() {
    let out = kolorun(&[
        "-np",
        "3",
        "--start-timeout",
        "7",
        "-x",
        "KOLO_TEST_FOO=bar baz",
        "sh",
        "-c",
        "echo \"R=$KOLO_RANK S=$KOLO_SIZE L=$KOLO_LOCAL_RANK LS=$KOLO_LOCAL_SIZE \
         M=$KOLO_MASTER_ADDR P=$KOLO_MASTER_PORT ST=$KOLO_STORE T=$KOLO_START_TIMEOUT X=$KOLO_TEST_FOO\"",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let mut port = None;
    for r in 0..3 {
        let l = lines
            .iter()
            .find(|l| l.starts_with(&format!("[{r}] ")))
            .unwrap_or_else(|| panic!("no line from rank {r}: {stdout}"));
        let want =
            format!("[{r}] R={r} S=3 L={r} LS=3 M=127.0.0.1 P=PORT ST=external T=7 X=bar baz");
        let p = l.split("P=").nth(1).unwrap().split(' ').next().unwrap();
        let p: u16 = p.parse().unwrap();
        assert!(p > 0);
        assert_eq!(
            *port.get_or_insert(p),
            p,
            "every rank gets the same store port"
        );
        assert_eq!(l.replace(&format!("P={p}"), "P=PORT"), want);
    }
}

#[test]
fn prefixes_output_and_writes_logs() {
    let dir = std::env::temp_dir().join(format!("kolorun-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = kolorun(&[
        "-np",
        "2",
        "--output-dir",
        dir.to_str().unwrap(),
        "sh",
        "-c",
        "printf 'out one\\nout two\\n'; echo err line >&2; printf 'no newline'",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    for r in 0..2 {
        for l in ["out one", "out two", "no newline"] {
            assert!(stdout.contains(&format!("[{r}] {l}\n")), "{stdout}");
        }
        assert!(stderr.contains(&format!("[{r}] err line\n")), "{stderr}");
        assert!(!stdout.contains("err line"), "{stdout}");
        let log = std::fs::read_to_string(dir.join(format!("rank.{r}.log"))).unwrap();
        assert!(
            log.contains("out one\n") && log.contains("err line\n"),
            "{log}"
        );
        assert!(!log.contains('['), "log lines are not prefixed: {log}");
    }
    // Order within one pipe of one rank is preserved.
    let r0: Vec<&str> = stdout.lines().filter(|l| l.starts_with("[0] ")).collect();
    assert_eq!(r0, vec!["[0] out one", "[0] out two", "[0] no newline"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failing_rank_stops_the_job_with_its_status() {
    let t0 = Instant::now();
    let out = kolorun(&[
        "-np",
        "3",
        "sh",
        "-c",
        "if [ $KOLO_RANK = 1 ]; then exit 3; fi; sleep 30",
    ]);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = text(&out.stderr);
    let naming: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kolorun: rank"))
        .collect();
    assert_eq!(naming.len(), 1, "{stderr}");
    assert!(
        naming[0].starts_with("kolorun: rank 1 (host ")
            && naming[0].ends_with("exited with status 3; stopping the other 2 ranks"),
        "{stderr}"
    );
}

#[test]
fn rank_killed_by_signal_gives_128_plus_signal() {
    let out = kolorun(&[
        "-np",
        "2",
        "sh",
        "-c",
        "if [ $KOLO_RANK = 0 ]; then kill -9 $$; fi; sleep 30",
    ]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(text(&out.stderr).contains("rank 0 (host "), "{out:?}");
}

#[test]
fn all_ok_exits_zero_and_missing_command_fails() {
    assert!(kolorun(&["-np", "2", "true"]).status.success());
    let out = kolorun(&["-np", "1", "/nonexistent/kolo-test-cmd"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(text(&out.stderr).contains("cannot start rank 0"), "{out:?}");
    let out = kolorun(&["-np", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no command"), "{out:?}");
}

#[test]
fn forwards_sigint_to_every_rank() {
    let mut child = Command::new(KOLORUN)
        .args([
            "-np",
            "2",
            "sh",
            "-c",
            "trap 'echo got INT; exit 0' INT; echo ready; sleep 30 & wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ready = 0;
    while ready < 2 {
        let l = lines.next().expect("kolorun output ended early").unwrap();
        if l.ends_with("ready") {
            ready += 1;
        }
    }
    let t0 = Instant::now();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(status.code(), Some(130));
    for r in 0..2 {
        assert!(rest.contains(&format!("[{r}] got INT")), "{rest:?}");
    }
}

#[test]
fn help_documents_flags_and_variables() {
    let out = kolorun(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for (name, default, _) in kolo::config::ENV_DOC {
        assert!(help.contains(name) && help.contains(default), "{name}");
    }
    for flag in [
        "-np",
        "-H",
        "--hostfile",
        "--start-timeout",
        "--output-dir",
        "-x",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
}

#[test]
fn remote_hosts_go_through_ssh_with_quoted_env() {
    // A stand-in `ssh` that runs the remote command locally, so the whole
    // remote path (quoting, cd, env) is exercised without any network.
    let (dir, path) = fake_ssh("quoted");
    let out = Command::new(KOLORUN)
        .env("PATH", path)
        .args([
            "-H",
            "fakehost-a:2,fakehost-b",
            "--master-addr",
            "127.0.0.1",
            "-x",
            "KOLO_TEST_Q=it's $HOME",
            "sh",
            "-c",
            "echo \"$KOLO_RANK/$KOLO_SIZE local $KOLO_LOCAL_RANK/$KOLO_LOCAL_SIZE q=$KOLO_TEST_Q pwd=$(pwd)\"",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let cwd = std::env::current_dir().unwrap();
    for (r, lr, ls) in [(0, 0, 2), (1, 1, 2), (2, 0, 1)] {
        let want = format!(
            "[{r}] {r}/3 local {lr}/{ls} q=it's $HOME pwd={}",
            cwd.display()
        );
        assert!(
            stdout.lines().any(|l| l == want),
            "want {want:?} in {stdout}"
        );
    }
    assert!(
        stderr.contains("[0] ssh to fakehost-a") && stderr.contains("[2] ssh to fakehost-b"),
        "{stderr}"
    );
}
