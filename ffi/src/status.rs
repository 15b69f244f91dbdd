//! Status codes, the thread's last error message, and the boundary every export runs behind
//! (`guard`: errors and panics become status codes, never unwinding into C).

use super::*;

// ---------------------------------------------------------------------------
// Status codes. Stable: never renumber (C programs compare against them).

/// Success.
pub const KOLO_OK: c_int = 0;
/// A NULL pointer, unknown dtype/op, overflowing count, misaligned buffer, or
/// arguments the Rust API rejects (`kolo::Error::InvalidArgument`).
pub const KOLO_ERR_INVALID_ARGUMENT: c_int = -1;
/// Ranks called the same collective with different arguments (`Error::Mismatch`).
pub const KOLO_ERR_MISMATCH: c_int = -2;
/// A peer closed or reset its connection (`Error::PeerLost`).
pub const KOLO_ERR_PEER_LOST: c_int = -3;
/// Nothing moved for `KOLO_TIMEOUT` seconds (`Error::Timeout`).
pub const KOLO_ERR_TIMEOUT: c_int = -4;
/// A bug in kolo: a panic caught at the boundary.
pub const KOLO_ERR_INTERNAL: c_int = -5;
/// Another rank failed this collective and said why (`Error::Aborted`).
pub const KOLO_ERR_ABORTED: c_int = -6;
/// A peer sent bytes that are not a kolo frame for this job (`Error::Protocol`).
pub const KOLO_ERR_PROTOCOL: c_int = -7;
/// The environment or launcher settings are missing or contradictory (`Error::Config`).
pub const KOLO_ERR_CONFIG: c_int = -8;
/// Rendezvous failed: store unreachable or ranks missing (`Error::Rendezvous`).
pub const KOLO_ERR_RENDEZVOUS: c_int = -9;
/// An OS-level I/O error outside a collective: bind, connect (`Error::Io`).
pub const KOLO_ERR_IO: c_int = -10;

/// Every status code with its name in `kolo.h` and its `kolo_status_string` text.
pub const STATUSES: [(c_int, &str, &CStr); 11] = [
    (KOLO_OK, "KOLO_OK", c"success"),
    (
        KOLO_ERR_INVALID_ARGUMENT,
        "KOLO_ERR_INVALID_ARGUMENT",
        c"invalid argument",
    ),
    (
        KOLO_ERR_MISMATCH,
        "KOLO_ERR_MISMATCH",
        c"mismatch across ranks",
    ),
    (KOLO_ERR_PEER_LOST, "KOLO_ERR_PEER_LOST", c"peer lost"),
    (KOLO_ERR_TIMEOUT, "KOLO_ERR_TIMEOUT", c"timeout"),
    (KOLO_ERR_INTERNAL, "KOLO_ERR_INTERNAL", c"internal error"),
    (
        KOLO_ERR_ABORTED,
        "KOLO_ERR_ABORTED",
        c"aborted by another rank",
    ),
    (KOLO_ERR_PROTOCOL, "KOLO_ERR_PROTOCOL", c"protocol error"),
    (KOLO_ERR_CONFIG, "KOLO_ERR_CONFIG", c"configuration error"),
    (
        KOLO_ERR_RENDEZVOUS,
        "KOLO_ERR_RENDEZVOUS",
        c"rendezvous failed",
    ),
    (KOLO_ERR_IO, "KOLO_ERR_IO", c"I/O error"),
];

/// The status code of a `kolo::Error`. Exhaustive on purpose: a new variant
/// must be given a code here before the library builds.
pub fn status_of(e: &Error) -> c_int {
    match e {
        Error::InvalidArgument(_) => KOLO_ERR_INVALID_ARGUMENT,
        Error::Mismatch { .. } => KOLO_ERR_MISMATCH,
        Error::PeerLost { .. } => KOLO_ERR_PEER_LOST,
        Error::Timeout { .. } => KOLO_ERR_TIMEOUT,
        Error::Aborted { .. } => KOLO_ERR_ABORTED,
        Error::Protocol { .. } => KOLO_ERR_PROTOCOL,
        Error::Config(_) => KOLO_ERR_CONFIG,
        Error::Rendezvous { .. } => KOLO_ERR_RENDEZVOUS,
        Error::Io(_) => KOLO_ERR_IO,
        // Only elastic Rust programs see it; for C it is a lost peer.
        Error::MembershipChanged { .. } => KOLO_ERR_PEER_LOST,
    }
}

// ---------------------------------------------------------------------------
// Errors and the boundary.

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: String) {
    // NULs cannot be in a C string; kolo messages have none, but be total.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // try_with: during thread teardown the slot may be gone; drop the message then.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Run the body of export `name`: `Ok` is `KOLO_OK`; an error or a panic
/// becomes its status and the thread's last error message.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> kolo::Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => KOLO_OK,
        Ok(Err(e)) => {
            let code = status_of(&e);
            set_last_error(e.to_string());
            code
        }
        Err(p) => {
            set_last_error(format!(
                "internal error: {name} panicked: {}",
                panic_text(&*p)
            ));
            KOLO_ERR_INTERNAL
        }
    }
}

pub(crate) fn invalid(name: &str, msg: std::fmt::Arguments) -> Error {
    Error::InvalidArgument(format!("{name}: {msg}"))
}

/// The full message of the last failed kolo call on this thread ("" if none).
/// Successful calls leave it alone. The pointer stays valid until the next
/// failing kolo call on this thread or the thread's exit; never NULL.
///
/// ```c
/// if (rc != KOLO_OK) fprintf(stderr, "kolo: %s\n", kolo_last_error());
/// ```
#[no_mangle]
pub extern "C" fn kolo_last_error() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|e| e.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
    .unwrap_or(c"".as_ptr())
}

/// A static description of a status code ("unknown status" for others); never NULL.
///
/// ```c
/// printf("%s\n", kolo_status_string(KOLO_ERR_TIMEOUT)); /* "timeout" */
/// ```
#[no_mangle]
pub extern "C" fn kolo_status_string(status: c_int) -> *const c_char {
    STATUSES
        .iter()
        .find(|s| s.0 == status)
        .map_or(c"unknown status", |s| s.2)
        .as_ptr()
}
