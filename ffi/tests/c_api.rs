//! The C library as C and Python programs see it: `libkolo.so`/`libkolo.a`
//! export exactly what `kolo.h` declares, the header compiles as C99 and C++,
//! and the C test program, the examples, the pkg-config file and the Python
//! module work under `kolorun -np 3` (the C test also under valgrind).
//!
//! Needs `cc`, `g++`, `nm`, `pkg-config`, `valgrind` and `python3` with venv
//! (scripts/test.sh installs them): a missing tool fails the test, it does not
//! skip it. Builds `libkolo.so`, `libkolo.a` and `kolorun` first (see `artifact`).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// target/<profile>: this test binary lives in its deps/ folder.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// A built artifact in target/<profile>. cargo does not build a cdylib or
/// staticlib for integration tests (they cannot link it), so the first call
/// builds the library and kolorun with the same cargo and profile; when they
/// are up to date that is a quick no-op, and it keeps the tests from running
/// against a stale library.
fn artifact(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let rel = release_dir();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build", "-p", "kolo-ffi", "-p", "kolo", "--lib", "--bin", "kolorun",
        ])
        .env("CARGO_TARGET_DIR", rel.parent().unwrap())
        .current_dir(repo());
        if rel.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert_ok(
            &run(&mut cmd, Duration::from_secs(900)),
            "cargo build (libkolo, kolorun)",
        );
    });
    let p = release_dir().join(name);
    assert!(p.exists(), "{} is missing after cargo build", p.display());
    p
}

/// Fails (not skips) when `tool` cannot run.
fn need(tool: &str, version_arg: &str) {
    let ok = Command::new(tool)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{tool}` is not installed; scripts/test.sh installs it (apt, as root)"
    );
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ffi-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run to completion, killing it after `limit` (a hang is a failure, not a stuck CI).
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{desc} ran over {limit:?}; stderr so far:\n{}",
                text(&err_t.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Compile and link C `sources` against kolo.h and target/release/libkolo.so.
fn build_c(sources: &[&str], out: &Path, extra: &[&str]) {
    need("cc", "--version");
    let rel = release_dir();
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-g", "-I"])
        .arg(repo().join("ffi/include"))
        .args(sources.iter().map(|s| repo().join(s)))
        .args(extra)
        .arg("-o")
        .arg(out);
    if !extra.iter().any(|a| a.ends_with(".a")) {
        artifact("libkolo.so");
        cmd.arg("-L")
            .arg(&rel)
            .arg("-lkolo")
            .arg(format!("-Wl,-rpath,{}", rel.display()));
    }
    assert_ok(&run(&mut cmd, Duration::from_secs(120)), "cc");
}

/// `kolorun -np N prog args...` with a short collective timeout.
fn kolorun(np: usize, prog: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(artifact("kolorun"));
    cmd.arg("-np")
        .arg(np.to_string())
        .args(prog)
        .env("KOLO_TIMEOUT", "60")
        .env("KOLO_LIB", artifact("libkolo.so"))
        // No ffi/python/__pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(repo());
    run(&mut cmd, Duration::from_secs(400))
}

/// Every rank printed a line containing `needle`.
fn every_rank_says(out: &Output, np: usize, needle: &str) {
    let stdout = text(&out.stdout);
    for r in 0..np {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("[{r}] ")) && l.contains(needle)),
            "rank {r} did not print {needle:?}:\n{stdout}\n--- stderr ---\n{}",
            text(&out.stderr)
        );
    }
}

/// Functions declared in kolo.h (identifiers `kolo_*` followed by `(` outside comments).
fn header_functions() -> BTreeSet<String> {
    let h = std::fs::read_to_string(repo().join("ffi/include/kolo.h")).unwrap();
    let mut code = String::new();
    let mut rest = h.as_str();
    while let Some(i) = rest.find("/*") {
        code.push_str(&rest[..i]);
        rest = &rest[i + rest[i..].find("*/").unwrap() + 2..];
    }
    code.push_str(rest);
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("kolo_") {
        let prev = code[..i].chars().next_back();
        if prev.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = code[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if code[i + name.len()..].trim_start().starts_with('(') {
            out.insert(name);
        }
    }
    out
}

/// Defined global text symbols starting with `kolo_` that `nm args` lists.
fn exported(args: &[&str], lib: &Path) -> BTreeSet<String> {
    need("nm", "--version");
    let out = run(
        Command::new("nm").args(args).arg(lib),
        Duration::from_secs(60),
    );
    assert_ok(&out, "nm");
    text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == "T" && f[2].starts_with("kolo_")).then(|| f[2].to_string())
        })
        .collect()
}

#[test]
fn header_declares_exactly_the_library_exports() {
    let declared = header_functions();
    assert!(declared.len() >= 17, "{declared:?}");
    let so = exported(&["-D", "--defined-only"], &artifact("libkolo.so"));
    assert_eq!(so, declared, "libkolo.so exports vs kolo.h declarations");
    let a = exported(&["--defined-only"], &artifact("libkolo.a"));
    assert_eq!(a, declared, "libkolo.a vs kolo.h");
}

#[test]
fn header_compiles_as_c99_and_cxx() {
    need("cc", "--version");
    need("g++", "--version");
    let dir = scratch("header");
    // Take the address of every function (cast to the generic function pointer
    // type, which -Wcast-function-type allows) and use the enums and macros.
    let mut src = String::from(
        "#include \"kolo.h\"\ntypedef void (*any_fn)(void);\nany_fn all_functions[] = {\n",
    );
    for f in header_functions() {
        src += &format!("    (any_fn)&{f},\n");
    }
    src += "};\nkolo_dtype d = KOLO_BFLOAT16;\nkolo_op o = KOLO_AVG;\nint status = KOLO_ERR_TIMEOUT;\n";
    src += "int version = KOLO_VERSION_MAJOR * 10000 + KOLO_VERSION_MINOR * 100 + KOLO_VERSION_PATCH;\n";
    for (compiler, file, std) in [
        ("cc", "h.c", "-std=c99"),
        ("cc", "h11.c", "-std=c11"),
        ("g++", "h.cpp", "-std=c++11"),
        ("g++", "h17.cpp", "-std=c++17"),
    ] {
        std::fs::write(dir.join(file), &src).unwrap();
        let out = run(
            Command::new(compiler)
                .args([std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-c", "-I"])
                .arg(repo().join("ffi/include"))
                .arg(dir.join(file))
                .arg("-o")
                .arg(dir.join(format!("{file}.o"))),
            Duration::from_secs(60),
        );
        assert_ok(&out, &format!("{compiler} {std} kolo.h"));
    }
}

#[test]
fn c_test_program_under_kolorun() {
    let dir = scratch("ctest");
    let exe = dir.join("test_kolo");
    build_c(&["ffi/tests/c/test_kolo.c"], &exe, &[]);
    let out = kolorun(3, &[exe.as_os_str()]);
    assert_ok(&out, "kolorun -np 3 test_kolo");
    every_rank_says(&out, 3, "test_kolo: passed (rank");
    // A mismatch before any asynchronous call (no engine): every rank is
    // told, and the communicator stays failed.
    let out = kolorun(3, &[exe.as_os_str(), "--sync-mismatch".as_ref()]);
    assert_ok(&out, "kolorun -np 3 test_kolo --sync-mismatch");
    every_rank_says(&out, 3, "test_kolo: passed (rank");
    // Initialisation errors: *comm is set to NULL and the status says why.
    let out = run(
        Command::new(&exe)
            .arg("--init-error")
            .env("KOLO_RANK", "0")
            .env("KOLO_SIZE", "1")
            .env("KOLO_TIMEOUT", "bogus"),
        Duration::from_secs(60),
    );
    assert_ok(&out, "test_kolo --init-error");
}

#[test]
fn c_test_program_under_valgrind() {
    need("valgrind", "--version");
    let dir = scratch("valgrind");
    let exe = dir.join("test_kolo");
    build_c(&["ffi/tests/c/test_kolo.c"], &exe, &["-O0"]);
    let valgrind = [
        "valgrind",
        "-q",
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--show-leak-kinds=definite",
    ];
    let mut args: Vec<&std::ffi::OsStr> = valgrind.iter().map(|s| s.as_ref()).collect();
    args.push(exe.as_os_str());
    args.push("--quick".as_ref());
    let out = kolorun(3, &args);
    assert_ok(&out, "kolorun -np 3 valgrind test_kolo --quick");
    every_rank_says(&out, 3, "test_kolo: passed (rank");
    assert!(
        !text(&out.stderr).contains("=="),
        "valgrind reported:\n{}",
        text(&out.stderr)
    );
}

#[test]
fn c_examples_and_pkg_config() {
    need("pkg-config", "--version");
    let dir = scratch("examples");
    // Install under a prefix and build the example with pkg-config's flags only.
    let prefix = dir.join("prefix");
    artifact("libkolo.so");
    artifact("libkolo.a");
    let out = run(
        Command::new(repo().join("ffi/install.sh"))
            .arg(&prefix)
            .env("KOLO_RELEASE_DIR", release_dir()),
        Duration::from_secs(60),
    );
    assert_ok(&out, "ffi/install.sh");
    let pc = |args: &[&str]| {
        let out = run(
            Command::new("pkg-config")
                .args(args)
                .arg("kolo")
                .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")),
            Duration::from_secs(30),
        );
        assert_ok(&out, "pkg-config");
        text(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(pc(&["--modversion"]), [kolo_version()]);
    let exe = dir.join("allreduce");
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c99", "-Wall", "-Werror"])
        .arg(repo().join("ffi/examples/allreduce.c"))
        .args(pc(&["--cflags", "--libs"]))
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .arg("-o")
        .arg(&exe);
    assert_ok(&run(&mut cmd, Duration::from_secs(120)), "cc (pkg-config)");
    let out = kolorun(3, &[exe.as_os_str()]);
    assert_ok(&out, "kolorun -np 3 allreduce");
    every_rank_says(&out, 3, "of 3: mean 1 1 2 3, last rank 2");

    // Static: libkolo.a plus the system libraries pkg-config --static lists.
    let exe = dir.join("allreduce_static");
    let mut libs = pc(&["--static", "--libs-only-l"]);
    libs.retain(|l| l != "-lkolo");
    let lib_a = prefix.join("lib/libkolo.a");
    let mut extra: Vec<&str> = vec![lib_a.to_str().unwrap()];
    extra.extend(libs.iter().map(String::as_str));
    build_c(&["ffi/examples/allreduce.c"], &exe, &extra);
    let ldd = run(Command::new("ldd").arg(&exe), Duration::from_secs(30));
    assert!(
        !text(&ldd.stdout).contains("libkolo"),
        "{}",
        text(&ldd.stdout)
    );
    let out = kolorun(2, &[exe.as_os_str()]);
    assert_ok(&out, "kolorun -np 2 allreduce_static");
    every_rank_says(&out, 2, "of 2: mean 0.5 0.5 1 1.5, last rank 1");

    // The benchmark (small, just that it runs and checks its result).
    let exe = dir.join("bench");
    build_c(&["ffi/examples/bench.c"], &exe, &[]);
    let out = kolorun(
        2,
        &[exe.as_os_str(), "1M".as_ref(), "3".as_ref(), "1".as_ref()],
    );
    assert_ok(&out, "kolorun -np 2 bench");
    assert!(
        text(&out.stdout).contains("[0] c-bench allreduce float32 sum: 1048576 bytes, N=2"),
        "{}",
        text(&out.stdout)
    );
}

fn kolo_version() -> String {
    let h = std::fs::read_to_string(repo().join("ffi/include/kolo.h")).unwrap();
    let v = |what: &str| {
        let key = format!("#define KOLO_VERSION_{what} ");
        h.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap()
            .trim()
            .to_string()
    };
    format!("{}.{}.{}", v("MAJOR"), v("MINOR"), v("PATCH"))
}

/// The repository's .venv python with numpy (scripts/venv.sh makes it when missing).
fn python_with_numpy() -> PathBuf {
    need("python3", "--version");
    let out = run(
        Command::new(repo().join("scripts/venv.sh")).arg("numpy"),
        Duration::from_secs(600),
    );
    assert_ok(&out, "scripts/venv.sh numpy");
    PathBuf::from(text(&out.stdout).trim())
}

#[test]
fn python_module_under_kolorun() {
    let py = python_with_numpy();
    let test = repo().join("ffi/tests/python/test_kolo.py");
    artifact("libkolo.so");
    let out = kolorun(3, &[py.as_os_str(), test.as_os_str()]);
    assert_ok(&out, "kolorun -np 3 python test_kolo.py");
    every_rank_says(&out, 3, "test_kolo.py: passed (rank");
    let out = kolorun(
        3,
        &[py.as_os_str(), test.as_os_str(), "--sync-mismatch".as_ref()],
    );
    assert_ok(&out, "kolorun -np 3 python test_kolo.py --sync-mismatch");
    every_rank_says(&out, 3, "test_kolo.py: passed (rank");
    let out = run(
        Command::new(&py)
            .arg(&test)
            .arg("--init-error")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("KOLO_LIB", artifact("libkolo.so"))
            .env("KOLO_RANK", "0")
            .env("KOLO_SIZE", "1")
            .env("KOLO_TIMEOUT", "bogus"),
        Duration::from_secs(60),
    );
    assert_ok(&out, "test_kolo.py --init-error");
    // The example in the README.
    let example = repo().join("ffi/examples/allreduce.py");
    let out = kolorun(3, &[py.as_os_str(), example.as_os_str()]);
    assert_ok(&out, "kolorun -np 3 python allreduce.py");
    every_rank_says(&out, 3, "of 3: mean [1. 1. 2. 3.], ranks [0 1 2]");
}

/// The README's C and Python examples are the tested example files.
#[test]
fn readme_examples_are_the_tested_files() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for (file, from) in [
        ("ffi/examples/allreduce.c", "#include <kolo.h>"),
        ("ffi/examples/allreduce.py", "import sys"),
        ("ffi/python/examples/quickstart.py", "import torch"),
    ] {
        let src = std::fs::read_to_string(repo().join(file)).unwrap();
        let code = &src[src.find(from).unwrap()..];
        assert!(
            readme.contains(code),
            "README.md does not show {file} from `{from}` on"
        );
    }
}
