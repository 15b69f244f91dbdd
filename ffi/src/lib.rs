//! C ABI for kolo. The exports land with the C ABI issue; for now the crate
//! only links the Rust library so the workspace layout is in place.

/// Version of the kolo crate this library was built from.
pub const VERSION: &str = kolo::VERSION;
