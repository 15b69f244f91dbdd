//! One rendezvous request frame as the store reads it after the handshake:
//! valid or refused, never a panic or an allocation of the length it claims.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kolo::fuzzing::store_request(data);
});
