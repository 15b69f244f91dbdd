//! Every variable in `ENV_DOC`, fed hostile values (huge, negative, NaN,
//! infinite, garbage, control bytes, random text): reading the configuration
//! gives a configuration error naming the variable, never a panic and never
//! a silently accepted value.

use kolo::config::ENV_DOC;
use kolo::elastic::Options;
use kolo::{Config, Error};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Variables whose value is free text (an address, a path, a secret, an
/// interface name): any string is a value, checked when it is used.
const FREE_TEXT: &[&str] = &[
    "KOLO_MASTER_ADDR",
    "KOLO_SECRET",
    "KOLO_IFACE",
    "KOLO_TIMELINE",
];

/// Values no variable of kolo may accept.
const HOSTILE: &[&str] = &[
    "1e20",
    "-1",
    "-0.5",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "18446744073709551616",
    "99999999999999999999999",
    "garbage",
    "0x10",
    "12abc",
    "4 4",
    "\u{0}",
    "\u{1b}[2J",
    "１",
];

/// A well-formed job of 4 ranks on this host, with `k` set to `v`.
fn vars(k: &str, v: &str) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = [("KOLO_RANK", "1"), ("KOLO_SIZE", "4")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    m.insert(k.to_string(), v.to_string());
    m
}

/// Read both the communicator's and the elastic options' view of `m`:
/// `Ok(())` if both accept it, the first error otherwise; a panic fails.
fn read(k: &str, v: &str) -> Result<(), Error> {
    let m = vars(k, v);
    let got = catch_unwind(AssertUnwindSafe(|| {
        Config::from_vars(|x| m.get(x).cloned())?;
        Options::from_vars(|x| m.get(x).cloned()).map(|_| ())
    }));
    got.unwrap_or_else(|_| panic!("{k}={v:?} panicked"))
}

fn must_refuse(k: &str, v: &str) {
    match read(k, v) {
        Err(Error::Config(msg)) => {
            assert!(msg.contains(k), "{k}={v:?}: error without the name: {msg}")
        }
        Err(e) => panic!("{k}={v:?}: not a configuration error: {e}"),
        Ok(()) => panic!("{k}={v:?} was accepted"),
    }
}

#[test]
fn the_defaults_are_accepted() {
    for (k, _, _) in ENV_DOC {
        if ["KOLO_RANK", "KOLO_SIZE"].contains(k) {
            continue;
        }
        read(k, "").unwrap_or_else(|e| panic!("{k} empty: {e}"));
    }
}

#[test]
fn every_variable_refuses_hostile_values() {
    for (k, _, _) in ENV_DOC {
        if FREE_TEXT.contains(k) {
            continue;
        }
        for v in HOSTILE {
            must_refuse(k, v);
        }
    }
}

#[test]
fn random_text_never_panics() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let alphabet: Vec<char> = "0123456789.eE+-_ xXnaNifINF()\u{0}é".chars().collect();
    for (k, _, _) in ENV_DOC {
        for _ in 0..300 {
            let len = (next() % 24) as usize;
            let v: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            // An error or a value: both fine; only a panic fails (in `read`).
            let _ = read(k, &v);
        }
    }
}

#[test]
fn limits_hold_at_their_edges() {
    // The longest wait is a week; a second more is refused.
    read("KOLO_TIMEOUT", "604800").unwrap();
    must_refuse("KOLO_TIMEOUT", "604801");
    must_refuse("KOLO_TIMEOUT", "0");
    read("KOLO_PEER_TIMEOUT", "0").unwrap();
    read("KOLO_SEGMENT_BYTES", "4096").unwrap();
    must_refuse("KOLO_SEGMENT_BYTES", "4095");
    must_refuse("KOLO_NSOCKS", "0");
    must_refuse("KOLO_SIZE", "1048577");
}

#[test]
fn the_readme_lists_every_variable() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (k, _, _) in ENV_DOC {
        assert!(
            readme.contains(&format!("| `{k}` |")),
            "README.md's variables table has no row for {k}"
        );
    }
}
