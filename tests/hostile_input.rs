//! Mutated input through the same decoders a listening socket uses (the
//! `kolo::fuzzing` entry points): data-frame headers, the connection
//! handshake and rendezvous requests. Valid seeds are accepted; tens of
//! thousands of deterministic mutations (flipped and overwritten bytes, huge
//! length fields, truncation, trailing junk) never panic; and a handshake
//! transcript with any of its bytes changed is always refused.

use kolo::fuzzing;
use kolo::transport::frame::{Desc, Header, Kind};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four random edits of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len());
        match rng.below(7) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = rng.next() as u8,
            // Huge length-like fields: all ones or a large power of two.
            2 => {
                let w = [0xffu8; 8];
                let end = (at + 1 + rng.below(8)).min(v.len());
                v[at..end].copy_from_slice(&w[..end - at]);
            }
            3 => {
                let end = (at + 4).min(v.len());
                v[at..end].copy_from_slice(&0x8000_0000u32.to_le_bytes()[..end - at]);
            }
            4 => v.truncate(at),
            5 => {
                let k = rng.below(64);
                v.extend((0..k).map(|_| rng.next() as u8));
            }
            _ if !v.is_empty() => v[at] = 0,
            _ => {}
        }
    }
    v
}

fn header_seed() -> Vec<u8> {
    Header {
        kind: Kind::Data,
        desc: Desc {
            coll: 1,
            dtype: 6,
            op: 1,
            root: 0,
            count: 1000,
        },
        comm_id: 0x1234,
        seq: 7,
        len: 4000,
    }
    .encode()
    .to_vec()
}

#[test]
fn valid_seeds_are_accepted() {
    assert!(fuzzing::frame_header(&header_seed()));
    for from in [0u32, 2, 3] {
        assert!(fuzzing::handshake(&fuzzing::valid_handshake(
            from,
            [from as u8; 32]
        )));
    }
    for (what, req) in fuzzing::valid_store_requests() {
        assert!(fuzzing::store_request(&req), "{what}");
    }
}

#[test]
fn mutated_frame_headers_never_panic() {
    let seed = header_seed();
    let mut rng = Rng(0x51);
    let mut accepted = 0;
    for _ in 0..50_000 {
        accepted += usize::from(fuzzing::frame_header(&mutate(&seed, &mut rng)));
    }
    // Some mutants are still valid headers (e.g. another count), most are not.
    assert!(
        accepted < 50_000,
        "every mutant accepted: the decoder checks nothing"
    );
}

#[test]
fn mutated_store_requests_never_panic() {
    let mut rng = Rng(0x52);
    for (_, seed) in fuzzing::valid_store_requests() {
        for _ in 0..10_000 {
            fuzzing::store_request(&mutate(&seed, &mut rng));
        }
    }
}

#[test]
fn a_changed_handshake_is_always_refused() {
    let mut rng = Rng(0x53);
    for from in [0u32, 2, 3] {
        let seed = fuzzing::valid_handshake(from, [9; 32]);
        for _ in 0..5_000 {
            let m = mutate(&seed, &mut rng);
            let ok = fuzzing::handshake(&m);
            // The proof covers the whole hello and is checked byte for byte,
            // so only a transcript that still starts with the original bytes
            // (junk after it is never read) may pass.
            let intact = m.len() >= seed.len() && m[..seed.len()] == seed[..];
            assert_eq!(ok, intact, "from={from} mutant={m:02x?}");
        }
    }
}
