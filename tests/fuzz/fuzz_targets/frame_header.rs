//! A data connection's frame header: any 48 bytes either decode to a header
//! that survives a round trip or are refused; nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kolo::fuzzing::frame_header(data);
});
