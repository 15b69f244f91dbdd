//! Everything a client sends to a data listener's authenticated handshake:
//! refused unless it is a valid hello and proof for the fixed key and nonce,
//! with no panic and no reply beyond a challenge and a verdict.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kolo::fuzzing::handshake(data);
});
