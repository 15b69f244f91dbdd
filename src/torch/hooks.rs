//! The C++ shim (hooks.cpp, built by build.rs): a post-accumulate-grad hook per parameter
//! that calls back into Rust once autograd has summed the parameter's gradient for this
//! backward pass, so the gradient can go to the engine while backward goes on.
//!
//! The callback is an `extern "C"` function that never unwinds (panics are caught), and
//! the C++ entry points catch every exception and return an error code instead.

use crate::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

/// The hook's call into Rust: `(context, parameter index, status)`; status 0 when the
/// gradient is ready in place, 1 when the shim could not prepare it.
pub(super) type ReadyFn = extern "C" fn(*mut c_void, usize, c_int);

extern "C" {
    fn kolo_hook_install(
        tensor: *mut c_void,
        f: ReadyFn,
        ctx: *mut c_void,
        index: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn kolo_hook_remove(
        tensor: *mut c_void,
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn kolo_grad_zeros(tensor: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
}

/// Runs `f` with an error buffer for the shim, turning a non-zero return into an error.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buf = [0 as c_char; 512];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated message of at most `buf.len()` bytes.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    Err(Error::InvalidArgument(format!("torch: {what}: {msg}")))
}

/// tch's tensor handle is a `torch::Tensor*` (torch-sys's torch_api.h: `typedef
/// torch::Tensor *tensor`), which is what the shim takes.
fn raw(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// Install the hook on parameter `t`, calling `f(ctx, index, status)`.
///
/// # Safety
/// `ctx` must stay valid for `f` until [`remove`] has been called on `t` with it, and `f`
/// must be callable from whichever thread runs autograd.
pub(super) unsafe fn install(
    t: &Tensor,
    name: &str,
    f: ReadyFn,
    ctx: *mut c_void,
    index: usize,
) -> Result<()> {
    call(&format!("hook on {name:?}"), |e, n| {
        // SAFETY: `raw(t)` is a live torch::Tensor*; the rest is the caller's promise.
        unsafe { kolo_hook_install(raw(t), f, ctx, index, e, n) }
    })
}

/// Remove the hook [`install`] put on `t` with `ctx` (any other hook stays).
pub(super) fn remove(t: &Tensor, name: &str, ctx: *mut c_void) -> Result<()> {
    call(&format!("removing the hook on {name:?}"), |e, n| {
        // SAFETY: `raw(t)` is a live torch::Tensor*; the shim only compares `ctx`.
        unsafe { kolo_hook_remove(raw(t), ctx, e, n) }
    })
}

/// Set `t`'s gradient to zeros without running autograd (no hook fires).
pub(super) fn zero_grad_of(t: &Tensor, name: &str) -> Result<()> {
    call(&format!("zero gradient of {name:?}"), |e, n| {
        // SAFETY: `raw(t)` is a live torch::Tensor*.
        unsafe { kolo_grad_zeros(raw(t), e, n) }
    })
}
