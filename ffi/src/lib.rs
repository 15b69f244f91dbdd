//! C ABI for kolo: `libkolo.so` / `libkolo.a` with the header `ffi/include/kolo.h`.
//!
//! Every export is a thin shim over the Rust API ([`kolo::Communicator`]): it
//! checks what only the C side can get wrong (NULL pointers, unknown enum
//! values, counts that overflow, misaligned buffers), turns the raw buffer into
//! a typed slice of the runtime dtype, calls the same method a Rust user calls,
//! and turns the `kolo::Error` into a status code plus a thread-local message
//! (`kolo_last_error`). No panic crosses the boundary: every export runs under
//! `catch_unwind` and reports a panic as `KOLO_ERR_INTERNAL`.
//!
//! Arguments rejected here (before any communication) leave the communicator
//! usable and are not announced to the other ranks; errors found by the Rust
//! API (wrong root, mismatched counts, lost peers) behave exactly as in Rust:
//! every rank is told, and the communicator stays failed.
//!
//! The asynchronous named operations (`kolo_*_async`, `kolo_join`, `kolo_test`,
//! `kolo_wait`) run on a [`kolo::engine::Engine`], started on the first such
//! call: the engine takes the communicator over, and from then on the blocking
//! collectives of that `kolo_comm` are engine operations too (submitted under
//! the automatic name `kolo.sync.<n>` and waited for), so blocking and
//! asynchronous calls mix. In that mode a disagreement between ranks fails
//! only the call concerned (the engine finds it before any data moves); a
//! failure inside a collective still stops everything.
//!
//! Modules: `status` (status codes, last error, the panic guard), `types`
//! (`kolo_dtype`/`kolo_op` and buffer checks), `comm` (`kolo_comm`, who owns
//! the communicator, init/destroy/queries), `blocking` (the blocking
//! collectives) and `asynchronous` (the engine's named operations, groups,
//! join, `kolo_test`/`kolo_wait`).
//!
//! ```c
//! kolo_comm *comm;
//! if (kolo_init_from_env(&comm) != KOLO_OK) { fprintf(stderr, "%s\n", kolo_last_error()); exit(1); }
//! float grad[1024] = {0};
//! kolo_allreduce(comm, grad, grad, 1024, KOLO_FLOAT32, KOLO_AVG); /* in place */
//! kolo_comm_destroy(comm);
//! ```

#![allow(non_camel_case_types)]
#![warn(missing_docs)]

use half::{bf16, f16};
use kolo::engine::{Engine, Handle, Op};
use kolo::{Communicator, DType, Element, Error, ReduceOp};
use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

/// Version of the kolo crate this library was built from.
pub const VERSION: &str = kolo::VERSION;

/// Call `$f::<T>($args)` with `T` the Rust element type of runtime dtype `$d`.
macro_rules! dispatch {
    ($d:expr, $f:ident($($arg:expr),*)) => {
        match $d {
            DType::U8 => $f::<u8>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
        }
    };
}

mod asynchronous;
mod blocking;
mod comm;
mod status;
mod types;

pub use asynchronous::*;
pub use blocking::*;
pub use comm::*;
pub use status::*;
pub use types::*;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_async;
