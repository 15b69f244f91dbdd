//! Unit tests of the boundary: the header agrees with the Rust exports, and
//! bad arguments, errors and panics become the right status codes. The C and
//! Python clients under `kolorun` are in `ffi/tests/c_api.rs`.

use super::*;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------
// The C spelling of each Rust type in an export's signature, so the expected
// prototype of every export is derived from its Rust signature, not written twice.

trait CType {
    fn c() -> &'static str;
}
macro_rules! ctype {
    ($($t:ty => $c:expr),* $(,)?) => {$(impl CType for $t { fn c() -> &'static str { $c } })*};
}
ctype! {
    c_int => "int",
    usize => "size_t",
    f64 => "double",
    kolo_dtype => "kolo_dtype",
    kolo_op => "kolo_op",
    *const c_char => "const char *",
    *mut c_int => "int *",
    *const c_void => "const void *",
    *mut c_void => "void *",
    *mut kolo_comm => "kolo_comm *",
    *const kolo_comm => "const kolo_comm *",
    *mut *mut kolo_comm => "kolo_comm **",
    *mut kolo_handle => "kolo_handle *",
    *mut *mut kolo_handle => "kolo_handle **",
    *const *const c_char => "const char *const *",
    *const *mut c_void => "void *const *",
    *const usize => "const size_t *",
    *const kolo_dtype => "const kolo_dtype *",
}

/// A function pointer type, as a C declaration of a pointer variable `name`.
trait CFn {
    fn decl(name: &str) -> String;
}
macro_rules! cfn {
    ($($a:ident),*) => {
        impl<R: CType, $($a: CType),*> CFn for unsafe extern "C" fn($($a),*) -> R {
            fn decl(name: &str) -> String {
                let args: Vec<&str> = vec![$($a::c()),*];
                let args = if args.is_empty() { "void".to_string() } else { args.join(", ") };
                format!("{} (*{name})({args})", R::c())
            }
        }
        impl<R: CType, $($a: CType),*> CFn for extern "C" fn($($a),*) -> R {
            fn decl(name: &str) -> String {
                <unsafe extern "C" fn($($a),*) -> R as CFn>::decl(name)
            }
        }
    };
}
cfn!();
cfn!(A);
cfn!(A, B);
cfn!(A, B, C);
cfn!(A, B, C, D);
cfn!(A, B, C, D, E);
cfn!(A, B, C, D, E, F);
cfn!(A, B, C, D, E, F, G);
cfn!(A, B, C, D, E, F, G, H);
cfn!(A, B, C, D, E, F, G, H, I);

fn decl_of<F: CFn>(_: F, name: &str) -> String {
    F::decl(name)
}

/// `(name, C declaration of a pointer to it)` for one export; the `_`s give its arity.
macro_rules! sig {
    (unsafe $f:ident($($u:tt),*)) => {
        (stringify!($f), decl_of($f as unsafe extern "C" fn($($u),*) -> _, concat!("check_", stringify!($f))))
    };
    ($f:ident($($u:tt),*)) => {
        (stringify!($f), decl_of($f as extern "C" fn($($u),*) -> _, concat!("check_", stringify!($f))))
    };
}

/// Every export of the library. A new export must be added here, and then
/// to kolo.h, or `header_declares_every_export` fails.
fn exports() -> Vec<(&'static str, String)> {
    vec![
        sig!(unsafe kolo_init_from_env(_)),
        sig!(unsafe kolo_comm_destroy(_)),
        sig!(unsafe kolo_comm_abort(_)),
        sig!(unsafe kolo_comm_rank(_, _)),
        sig!(unsafe kolo_comm_size(_, _)),
        sig!(unsafe kolo_comm_local_rank(_, _)),
        sig!(unsafe kolo_comm_local_size(_, _)),
        sig!(unsafe kolo_allreduce(_, _, _, _, _, _)),
        sig!(unsafe kolo_broadcast(_, _, _, _, _)),
        sig!(unsafe kolo_allgather(_, _, _, _, _)),
        sig!(unsafe kolo_reduce_scatter(_, _, _, _, _, _)),
        sig!(unsafe kolo_alltoall(_, _, _, _, _)),
        sig!(unsafe kolo_barrier(_)),
        sig!(unsafe kolo_allreduce_async(_, _, _, _, _, _, _)),
        sig!(unsafe kolo_allreduce_async_compressed(_, _, _, _, _, _, _, _)),
        sig!(unsafe kolo_allgather_async(_, _, _, _, _, _, _, _)),
        sig!(unsafe kolo_broadcast_async(_, _, _, _, _, _, _)),
        sig!(unsafe kolo_reduce_scatter_async(_, _, _, _, _, _, _, _)),
        sig!(unsafe kolo_alltoall_async(_, _, _, _, _, _, _)),
        sig!(unsafe kolo_grouped_allreduce_async(_, _, _, _, _, _, _, _, _)),
        sig!(unsafe kolo_join(_, _)),
        sig!(unsafe kolo_wait(_)),
        sig!(unsafe kolo_wait_timeout(_, _, _)),
        sig!(unsafe kolo_test(_, _)),
        sig!(kolo_last_error()),
        sig!(kolo_status_string(_)),
        sig!(unsafe kolo_version(_, _, _)),
    ]
}

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

fn header() -> String {
    std::fs::read_to_string(include_dir().join("kolo.h")).expect("read ffi/include/kolo.h")
}

/// The header without comments.
fn header_code() -> String {
    let h = header();
    let mut out = String::new();
    let mut rest = h.as_str();
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find("*/")
            .expect("unterminated comment in kolo.h");
        rest = &rest[i + end + 2..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers starting with `prefix` in the header's code; with `calls`, only
/// those followed by `(` (function declarations).
fn idents(code: &str, prefix: &str, calls: bool) -> Vec<String> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(j) = code[i..].find(prefix) {
        let start = i + j;
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        let boundary = start == 0 || !word(b[start - 1]);
        let next = code[end..].trim_start().starts_with('(');
        if boundary && (next || !calls) {
            out.push(code[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out.sort();
    out.dedup();
    out
}

/// A C compiler: `$CC` or `cc`. Missing is a failure, not a skip.
fn cc() -> String {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ok = Command::new(&cc).arg("--version").output();
    assert!(
        ok.is_ok_and(|o| o.status.success()),
        "no C compiler `{cc}` (install build-essential; scripts/test.sh does)"
    );
    cc
}

/// Compile `src` (syntax and types only) with `compiler` and `flags` against kolo.h.
fn compile(compiler: &str, flags: &[&str], lang: &str, src: &str) {
    let dir = std::env::temp_dir().join(format!("kolo-ffi-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("check.{lang}"));
    std::fs::write(&file, src).unwrap();
    let out = Command::new(compiler)
        .args(flags)
        .arg("-fsyntax-only")
        .arg("-I")
        .arg(include_dir())
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{compiler} {flags:?} rejected the check against kolo.h:\n{}\n--- source ---\n{src}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The header declares exactly the exports listed in `exports()`, and nothing
/// else that looks like a function.
#[test]
fn header_declares_every_export() {
    let mut want: Vec<String> = exports().iter().map(|e| e.0.to_string()).collect();
    want.sort();
    assert_eq!(idents(&header_code(), "kolo_", true), want);
}

/// Each prototype in kolo.h has exactly the type of the Rust export (a
/// pointer to the function, declared with the type derived from Rust, must
/// accept it with no conversion), and every enum, status and version value in
/// the header equals the Rust one. Checked as C11 and as C++.
#[test]
fn header_types_and_values_match_rust() {
    let mut src = String::from("#include \"kolo.h\"\n");
    for (name, decl) in exports() {
        src += &format!("{decl} = {name};\n");
    }
    for (name, d) in DTYPES {
        src += &format!("static_assert({name} == {}, \"{name}\");\n", d.code());
    }
    for (name, op) in OPS {
        src += &format!("static_assert({name} == {}, \"{name}\");\n", op.code());
    }
    for (code, name, _) in STATUSES {
        src += &format!("static_assert({name} == {code}, \"{name}\");\n");
    }
    let [ma, mi, pa] = version();
    src += &format!(
        "static_assert(KOLO_VERSION_MAJOR == {ma} && KOLO_VERSION_MINOR == {mi} && \
         KOLO_VERSION_PATCH == {pa}, \"version\");\n"
    );
    // The enums are typedefs of C enums, not ints.
    src += "static_assert(sizeof(kolo_dtype) == sizeof(int) && sizeof(kolo_op) == sizeof(int), \"enum size\");\n";
    let c_src = format!("#include <assert.h>\n{src}");
    compile(
        &cc(),
        &["-std=c11", "-Wall", "-Wextra", "-Werror"],
        "c",
        &c_src,
    );
    compile(
        "g++",
        &["-std=c++11", "-Wall", "-Wextra", "-Werror"],
        "cpp",
        &src,
    );
    // The check itself catches a wrong prototype.
    let wrong = c_src.replace(
        "int (*check_kolo_barrier)(kolo_comm *)",
        "int (*check_kolo_barrier)(const kolo_comm *)",
    );
    assert_ne!(wrong, c_src);
    let dir = std::env::temp_dir().join(format!("kolo-ffi-neg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("neg.c"), &wrong).unwrap();
    let out = Command::new(cc())
        .args(["-std=c11", "-Wall", "-Werror", "-fsyntax-only", "-I"])
        .arg(include_dir())
        .arg(dir.join("neg.c"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "a wrong prototype was accepted");
}

/// The enums and status table cover every Rust dtype, op and status, and the
/// header names every status and nothing more.
#[test]
fn tables_cover_kolo() {
    assert_eq!(DTYPES.map(|d| d.1), DType::ALL);
    assert_eq!(OPS.map(|o| o.1), ReduceOp::ALL);
    let code = header_code();
    let mut names: Vec<String> = STATUSES.iter().map(|s| s.1.to_string()).collect();
    names.sort();
    let mut in_header = idents(&code, "KOLO_ERR_", false);
    in_header.push("KOLO_OK".into());
    in_header.sort();
    assert_eq!(in_header, names);
    let mut codes: Vec<c_int> = STATUSES.iter().map(|s| s.0).collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), STATUSES.len(), "status codes are distinct");
}

// ---------------------------------------------------------------------------
// Behaviour at the boundary, on a one-rank communicator.

fn one_rank() -> *mut kolo_comm {
    let c = Communicator::init(kolo::Config::local(0, 1, 0)).expect("1-rank communicator");
    Box::into_raw(Box::new(kolo_comm::new(c)))
}

fn last_error() -> String {
    // SAFETY: kolo_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(kolo_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// Status `want`, and a last-error message containing every needle.
fn expect(rc: c_int, want: c_int, needles: &[&str]) {
    let msg = last_error();
    assert_eq!(rc, want, "message: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} does not mention {n:?}");
    }
}

const F32: kolo_dtype = kolo_dtype(6);
const SUM: kolo_op = kolo_op(1);

#[test]
fn invalid_arguments_are_reported_not_crashes() {
    use std::ptr::{null, null_mut};
    let inv = KOLO_ERR_INVALID_ARGUMENT;
    let mut v = [1.0f32; 8];
    let p = v.as_mut_ptr().cast::<c_void>();
    unsafe {
        expect(kolo_init_from_env(null_mut()), inv, &["comm is NULL"]);
        expect(kolo_comm_destroy(null_mut()), inv, &["kolo_comm_destroy"]);
        expect(
            kolo_allreduce(null_mut(), p, p, 8, F32, SUM),
            inv,
            &["kolo_allreduce", "comm is NULL"],
        );
        let c = one_rank();
        let mut r = -1;
        expect(kolo_comm_rank(c, null_mut()), inv, &["rank is NULL"]);
        expect(kolo_comm_size(null(), &mut r), inv, &["comm is NULL"]);
        expect(
            kolo_allreduce(c, p, p, 8, kolo_dtype(0), SUM),
            inv,
            &["dtype 0"],
        );
        expect(
            kolo_allreduce(c, p, p, 8, kolo_dtype(99), SUM),
            inv,
            &["dtype 99"],
        );
        expect(
            kolo_allreduce(c, p, p, 8, F32, kolo_op(-3)),
            inv,
            &["op -3"],
        );
        expect(
            kolo_allreduce(c, null(), null_mut(), 8, F32, SUM),
            inv,
            &["NULL"],
        );
        expect(
            kolo_allreduce(c, null(), p, 8, F32, SUM),
            inv,
            &["sendbuf is NULL"],
        );
        expect(
            kolo_allreduce(c, p, p, usize::MAX / 2, F32, SUM),
            inv,
            &["overflow"],
        );
        let odd = v.as_mut_ptr().cast::<u8>().add(1).cast::<c_void>();
        expect(kolo_allreduce(c, odd, odd, 2, F32, SUM), inv, &["aligned"]);
        expect(kolo_broadcast(c, p, 8, F32, -1), inv, &["root -1"]);
        expect(
            kolo_allgather(c, p, null_mut(), 4, F32),
            inv,
            &["recvbuf is NULL"],
        );
        expect(
            kolo_reduce_scatter(c, p, p, usize::MAX, F32, SUM),
            inv,
            &["overflow"],
        );
        expect(
            kolo_alltoall(c, null(), p, 1, F32),
            inv,
            &["sendbuf is NULL"],
        );
        expect(kolo_version(null_mut(), &mut r, &mut r), inv, &["major"]);
        // None of that touched the communicator: it still works.
        assert_eq!(kolo_allreduce(c, p, p, 8, F32, SUM), KOLO_OK);
        assert_eq!(kolo_barrier(c), KOLO_OK);
        // Empty buffers may be NULL.
        assert_eq!(kolo_allreduce(c, null(), null_mut(), 0, F32, SUM), KOLO_OK);
        // Errors from the Rust API keep their kind: root 1 of 1 rank.
        expect(
            kolo_broadcast(c, p, 8, F32, 1),
            inv,
            &["broadcast", "root 1 is not below size 1"],
        );
        // ... and then the communicator stays failed, like in Rust.
        expect(kolo_barrier(c), inv, &["root 1"]);
        assert_eq!(kolo_comm_destroy(c), KOLO_OK);
    }
}

#[test]
fn one_rank_collectives_are_identities() {
    unsafe {
        let c = one_rank();
        let (mut r, mut n, mut l) = (-1, -1, -1);
        assert_eq!(kolo_comm_rank(c, &mut r), KOLO_OK);
        assert_eq!(kolo_comm_size(c, &mut n), KOLO_OK);
        assert_eq!(kolo_comm_local_rank(c, &mut l), KOLO_OK);
        assert_eq!((r, n, l), (0, 1, 0));
        let src = [1i64, -2, 3];
        let mut dst = [0i64; 3];
        let i64t = kolo_dtype(3);
        let send = src.as_ptr().cast();
        let recv = dst.as_mut_ptr().cast();
        assert_eq!(kolo_allreduce(c, send, recv, 3, i64t, kolo_op(4)), 0);
        assert_eq!(dst, src);
        dst = [0; 3];
        assert_eq!(kolo_allgather(c, send, recv, 3, i64t), 0);
        assert_eq!(dst, src);
        dst = [0; 3];
        assert_eq!(kolo_reduce_scatter(c, send, recv, 3, i64t, SUM), 0);
        assert_eq!(dst, src);
        dst = [0; 3];
        assert_eq!(kolo_alltoall(c, send, recv, 3, i64t), 0);
        assert_eq!(dst, src);
        assert_eq!(kolo_broadcast(c, recv, 3, i64t, 0), 0);
        assert_eq!(dst, src);
        // Overlapping out-of-place buffers: copied first, same result.
        let mut w = [5u8, 6, 7, 8];
        let p = w.as_mut_ptr().cast::<c_void>();
        assert_eq!(kolo_allgather(c, p.cast_const(), p, 4, kolo_dtype(1)), 0);
        assert_eq!(w, [5, 6, 7, 8]);
        let q = w.as_mut_ptr().add(1).cast::<c_void>();
        assert_eq!(
            kolo_allreduce(c, p.cast_const(), q, 3, kolo_dtype(1), SUM),
            0
        );
        assert_eq!(w, [5, 5, 6, 7]);
        assert_eq!(kolo_comm_destroy(c), KOLO_OK);
    }
}

#[test]
fn panics_become_internal_errors() {
    let rc = guard("kolo_test_export", || panic!("boom {}", 42));
    expect(
        rc,
        KOLO_ERR_INTERNAL,
        &["kolo_test_export panicked", "boom 42"],
    );
}

#[test]
fn every_error_variant_has_its_code() {
    let d = std::time::Duration::from_secs(1);
    let s = String::new;
    let cases = [
        (Error::InvalidArgument(s()), KOLO_ERR_INVALID_ARGUMENT),
        (Error::Config(s()), KOLO_ERR_CONFIG),
        (
            Error::Mismatch {
                rank: 0,
                peer: 1,
                op: s(),
                detail: s(),
            },
            KOLO_ERR_MISMATCH,
        ),
        (
            Error::PeerLost {
                rank: 0,
                peer: 1,
                host: s(),
                op: s(),
                detail: s(),
            },
            KOLO_ERR_PEER_LOST,
        ),
        (
            Error::Timeout {
                rank: 0,
                op: s(),
                waited: d,
                detail: s(),
                hung: None,
            },
            KOLO_ERR_TIMEOUT,
        ),
        (
            Error::Rendezvous {
                rank: 0,
                detail: s(),
            },
            KOLO_ERR_RENDEZVOUS,
        ),
        (
            Error::Protocol {
                rank: 0,
                peer: 1,
                detail: s(),
            },
            KOLO_ERR_PROTOCOL,
        ),
        (
            Error::Aborted {
                rank: 0,
                origin: 1,
                op: s(),
                detail: s(),
                hung: None,
            },
            KOLO_ERR_ABORTED,
        ),
        (Error::Io(s()), KOLO_ERR_IO),
    ];
    for (e, code) in cases {
        assert_eq!(status_of(&e), code, "{e:?}");
        let rc = guard("t", || Err(e.clone()));
        expect(rc, code, &[&e.to_string()]);
    }
}

#[test]
fn status_strings_and_version() {
    for (code, _, text) in STATUSES {
        // SAFETY: static NUL-terminated strings.
        assert_eq!(unsafe { CStr::from_ptr(kolo_status_string(code)) }, text);
    }
    let unknown = unsafe { CStr::from_ptr(kolo_status_string(-1000)) };
    assert_eq!(unknown, c"unknown status");
    let (mut a, mut b, mut c) = (-1, -1, -1);
    assert_eq!(unsafe { kolo_version(&mut a, &mut b, &mut c) }, KOLO_OK);
    assert_eq!(format!("{a}.{b}.{c}"), kolo::VERSION);
}

#[test]
fn last_error_is_per_thread() {
    let rc = unsafe { kolo_barrier(std::ptr::null_mut()) };
    expect(
        rc,
        KOLO_ERR_INVALID_ARGUMENT,
        &["kolo_barrier: comm is NULL"],
    );
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    // A success does not clear it.
    let (mut a, mut b, mut c) = (0, 0, 0);
    assert_eq!(unsafe { kolo_version(&mut a, &mut b, &mut c) }, KOLO_OK);
    assert!(last_error().contains("kolo_barrier"));
}

// ---------------------------------------------------------------------------
// Asynchronous operations (the engine), on one rank.

fn wait_done(h: *mut kolo_handle) {
    let mut done = -1;
    // Finishes: one rank needs no peer.
    while done != 1 {
        assert_eq!(
            unsafe { kolo_test(h, &mut done) },
            KOLO_OK,
            "{}",
            last_error()
        );
        assert!(done == 0 || done == 1);
    }
    // Still done, still valid: kolo_test frees nothing.
    assert_eq!(unsafe { kolo_test(h, &mut done) }, KOLO_OK);
    assert_eq!(done, 1);
}

#[test]
fn async_allreduce_and_sync_calls_through_the_engine() {
    use std::ptr::{null, null_mut};
    unsafe {
        let c = one_rank();
        // Before the engine: the communicator itself.
        assert!(matches!(&*(*c).mode(), Mode::Direct(_)));
        let mut v = [1.5f32, -2.0, 3.0];
        let mut h: *mut kolo_handle = null_mut();
        let p = v.as_mut_ptr().cast::<c_void>();
        assert_eq!(
            kolo_allreduce_async(c, c"a".as_ptr(), p, 3, F32, kolo_op(5), &mut h),
            KOLO_OK,
            "{}",
            last_error()
        );
        assert!(!h.is_null());
        assert!(matches!(&*(*c).mode(), Mode::Engine(_)));
        wait_done(h);
        assert_eq!(kolo_wait(h), KOLO_OK);
        assert_eq!(v, [1.5, -2.0, 3.0]);
        // Every dtype and op, several in flight at once, waited in reverse.
        let mut bufs: Vec<Vec<u64>> = Vec::new();
        let mut hs = Vec::new();
        for (dn, d) in DTYPES {
            for (on, o) in OPS {
                let mut b = vec![0x0101_0101_0101_0101u64; 5];
                let mut h = null_mut();
                let name = CString::new(format!("{dn}.{on}")).unwrap();
                let rc = kolo_allreduce_async(
                    c,
                    name.as_ptr(),
                    b.as_mut_ptr().cast(),
                    40 / d.size(),
                    kolo_dtype(d.code().into()),
                    kolo_op(o.code().into()),
                    &mut h,
                );
                assert_eq!(rc, KOLO_OK, "{}", last_error());
                bufs.push(b);
                hs.push(h);
            }
        }
        for h in hs.into_iter().rev() {
            assert_eq!(kolo_wait(h), KOLO_OK, "{}", last_error());
        }
        // One rank: every reduction is the identity.
        for b in &bufs {
            assert_eq!(b, &[0x0101_0101_0101_0101u64; 5]);
        }
        // An empty buffer may be NULL.
        assert_eq!(
            kolo_allreduce_async(c, c"empty".as_ptr(), null_mut(), 0, F32, SUM, &mut h),
            KOLO_OK
        );
        assert_eq!(kolo_wait(h), KOLO_OK);
        // Blocking calls now run through the engine under automatic names.
        let before = (*c).sync_calls.load(Ordering::Relaxed);
        let src = [1i64, -2, 3];
        let mut dst = [0i64; 3];
        let i64t = kolo_dtype(3);
        let (send, recv) = (src.as_ptr().cast(), dst.as_mut_ptr().cast());
        assert_eq!(kolo_allreduce(c, send, recv, 3, i64t, kolo_op(4)), 0);
        assert_eq!(dst, src);
        dst = [0; 3];
        assert_eq!(kolo_allgather(c, send, recv, 3, i64t), 0);
        assert_eq!(dst, src);
        dst = [0; 3];
        assert_eq!(kolo_reduce_scatter(c, send, recv, 3, i64t, SUM), 0);
        assert_eq!(dst, src);
        dst = [0; 3];
        assert_eq!(kolo_alltoall(c, send, recv, 3, i64t), 0);
        assert_eq!(dst, src);
        assert_eq!(kolo_broadcast(c, recv, 3, i64t, 0), 0);
        assert_eq!(dst, src);
        assert_eq!(kolo_barrier(c), 0);
        assert_eq!(kolo_allreduce(c, null(), null_mut(), 0, F32, SUM), 0);
        // Overlapping buffers, as in the direct mode.
        let mut w = [5u8, 6, 7, 8];
        let p8 = w.as_mut_ptr().cast::<c_void>();
        assert_eq!(kolo_allgather(c, p8.cast_const(), p8, 4, kolo_dtype(1)), 0);
        assert_eq!(w, [5, 6, 7, 8]);
        let q = w.as_mut_ptr().add(1).cast::<c_void>();
        assert_eq!(
            kolo_allreduce(c, p8.cast_const(), q, 3, kolo_dtype(1), SUM),
            0
        );
        assert_eq!(w, [5, 5, 6, 7]);
        assert_eq!((*c).sync_calls.load(Ordering::Relaxed), before + 9);
        // Rejected arguments take no automatic name (ranks stay in step).
        expect(
            kolo_broadcast(c, p, 8, F32, -1),
            KOLO_ERR_INVALID_ARGUMENT,
            &["root -1"],
        );
        expect(
            kolo_allgather(c, p, null_mut(), 4, F32),
            KOLO_ERR_INVALID_ARGUMENT,
            &["recvbuf is NULL"],
        );
        assert_eq!((*c).sync_calls.load(Ordering::Relaxed), before + 9);
        // Rank queries keep working with the engine.
        let (mut r, mut n, mut l) = (-1, -1, -1);
        assert_eq!(kolo_comm_rank(c, &mut r), KOLO_OK);
        assert_eq!(kolo_comm_size(c, &mut n), KOLO_OK);
        assert_eq!(kolo_comm_local_rank(c, &mut l), KOLO_OK);
        assert_eq!((r, n, l), (0, 1, 0));
        // An engine-side error fails the call only: root 1 of 1 rank.
        expect(
            kolo_broadcast(c, p, 3, F32, 1),
            KOLO_ERR_INVALID_ARGUMENT,
            &["root 1 is not below size 1"],
        );
        assert_eq!(kolo_barrier(c), KOLO_OK, "{}", last_error());
        assert_eq!(kolo_comm_destroy(c), KOLO_OK, "{}", last_error());
    }
}

#[test]
fn async_invalid_arguments() {
    use std::ptr::null_mut;
    let inv = KOLO_ERR_INVALID_ARGUMENT;
    let mut v = [1.0f32; 8];
    let p = v.as_mut_ptr().cast::<c_void>();
    let n = c"t".as_ptr();
    unsafe {
        let c = one_rank();
        let stale = std::ptr::dangling_mut::<kolo_handle>();
        let mut h = stale;
        let ar = |c, name, p, count, d, o, h| kolo_allreduce_async(c, name, p, count, d, o, h);
        expect(
            ar(c, n, p, 8, F32, SUM, null_mut()),
            inv,
            &["handle is NULL"],
        );
        expect(
            ar(null_mut(), n, p, 8, F32, SUM, &mut h),
            inv,
            &["comm is NULL"],
        );
        assert!(h.is_null(), "*handle is NULL after a failure");
        h = stale;
        expect(
            ar(c, std::ptr::null(), p, 8, F32, SUM, &mut h),
            inv,
            &["name is NULL"],
        );
        assert!(h.is_null());
        let bad_utf8 = [0xffu8, 0];
        expect(
            ar(c, bad_utf8.as_ptr().cast(), p, 8, F32, SUM, &mut h),
            inv,
            &["not UTF-8"],
        );
        expect(
            ar(c, c"kolo.sync.0".as_ptr(), p, 8, F32, SUM, &mut h),
            inv,
            &["reserved"],
        );
        expect(
            ar(c, n, p, 8, kolo_dtype(0), SUM, &mut h),
            inv,
            &["kolo_dtype 0"],
        );
        expect(ar(c, n, p, 8, F32, kolo_op(6), &mut h), inv, &["kolo_op 6"]);
        expect(
            ar(c, n, null_mut(), 8, F32, SUM, &mut h),
            inv,
            &["kolo_allreduce_async", "buf is NULL but its count is 8"],
        );
        expect(
            ar(c, n, p, usize::MAX / 2, F32, SUM, &mut h),
            inv,
            &["overflow"],
        );
        let odd = v.as_mut_ptr().cast::<u8>().add(1).cast::<c_void>();
        expect(ar(c, n, odd, 2, F32, SUM, &mut h), inv, &["aligned"]);
        // None of that started the engine.
        assert!(matches!(&*(*c).mode(), Mode::Direct(_)));
        expect(kolo_wait(null_mut()), inv, &["kolo_wait: handle is NULL"]);
        let mut done = 0;
        expect(
            kolo_test(null_mut(), &mut done),
            inv,
            &["kolo_test: handle is NULL"],
        );
        // A name in flight twice on one rank: the engine refuses the second.
        let mut w = [2.0f32; 4];
        let pw = w.as_mut_ptr().cast::<c_void>();
        assert_eq!(ar(c, n, p, 8, F32, SUM, &mut h), KOLO_OK);
        let mut h2 = stale;
        let rc = ar(c, n, pw, 4, F32, SUM, &mut h2);
        // (unless the first already completed, which one rank may do at once)
        if rc != KOLO_OK {
            expect(rc, inv, &["already in flight"]);
            assert!(h2.is_null());
        } else {
            assert_eq!(kolo_wait(h2), KOLO_OK);
        }
        expect(kolo_test(h, null_mut()), inv, &["done is NULL"]);
        // ... which freed nothing.
        assert_eq!(kolo_wait(h), KOLO_OK);
        assert_eq!(kolo_comm_destroy(c), KOLO_OK);
    }
}

#[test]
fn handles_outlive_their_communicator() {
    unsafe {
        let c = one_rank();
        let mut v = vec![1u8; 1 << 20];
        let mut hs = Vec::new();
        for i in 0..20 {
            let mut h = std::ptr::null_mut();
            let name = CString::new(format!("t{i}")).unwrap();
            let rc = kolo_allreduce_async(
                c,
                name.as_ptr(),
                v.as_mut_ptr().add(i << 10).cast(),
                1 << 10,
                kolo_dtype(1),
                SUM,
                &mut h,
            );
            assert_eq!(rc, KOLO_OK, "{}", last_error());
            hs.push(h);
        }
        assert_eq!(kolo_comm_destroy(c), KOLO_OK, "{}", last_error());
        // Each handle either finished before the shutdown or failed with it.
        for h in hs {
            let rc = kolo_wait(h);
            if rc != KOLO_OK {
                expect(rc, KOLO_ERR_INVALID_ARGUMENT, &["shut down"]);
            }
        }
        assert!(v.iter().all(|&b| b == 1));
    }
}
