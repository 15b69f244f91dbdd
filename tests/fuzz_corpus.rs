//! Replays the fuzz corpora (`tests/fuzz-corpus/<target>/`, grown by the
//! cargo-fuzz targets in `tests/fuzz/`) through the same `kolo::fuzzing`
//! entry points on stable Rust, so every input the fuzzers ever kept, and
//! any crash they found and we fixed, is checked in CI. The valid seeds in
//! each corpus must still be accepted.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` rewrites the
//! seed files (`seed-*`) from the current encoders.

use kolo::fuzzing;
use kolo::transport::frame::{Desc, Header, Kind};
use std::path::{Path, PathBuf};

type Target = fn(&[u8]) -> bool;

const TARGETS: [(&str, Target); 3] = [
    ("frame_header", fuzzing::frame_header),
    ("handshake", fuzzing::handshake),
    ("store_request", fuzzing::store_request),
];

fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

/// Inputs each target must accept, and a few it must refuse, by file name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>, bool)> {
    let header = |kind, len| {
        Header {
            kind,
            desc: Desc {
                coll: 1,
                dtype: 6,
                op: 1,
                root: 0,
                count: 1000,
            },
            comm_id: 0x1234,
            seq: 7,
            len,
        }
        .encode()
        .to_vec()
    };
    match target {
        "frame_header" => vec![
            ("data".into(), header(Kind::Data, 4000), true),
            ("abort".into(), header(Kind::Abort, 12), true),
            (
                "short".into(),
                header(Kind::Data, 4000)[..20].to_vec(),
                false,
            ),
            ("ones".into(), vec![0xff; 48], false),
        ],
        "handshake" => {
            let mut v: Vec<(String, Vec<u8>, bool)> = [0u32, 2, 3]
                .iter()
                .map(|&from| {
                    let t = fuzzing::valid_handshake(from, [from as u8 + 1; 32]);
                    (format!("valid-from-{from}"), t, true)
                })
                .collect();
            v.push((
                "keyless-hello".into(),
                fuzzing::data_hello(0x1234, 2, 1, 4),
                false,
            ));
            let mut cut = fuzzing::valid_handshake(2, [5; 32]);
            cut.truncate(cut.len() - 1);
            v.push(("truncated".into(), cut, false));
            v
        }
        "store_request" => {
            let mut v: Vec<(String, Vec<u8>, bool)> = fuzzing::valid_store_requests()
                .into_iter()
                .map(|(what, req)| (what.to_string(), req, true))
                .collect();
            // A valid request whose length field (bytes 6..10) claims 4 GiB.
            let mut huge = v[0].1.clone();
            huge[6..10].fill(0xff);
            v.push(("huge-length".into(), huge, false));
            v
        }
        _ => unreachable!("unknown target {target}"),
    }
}

#[test]
#[ignore = "writes the seed files; run by hand after changing an encoder"]
fn write_seeds() {
    for (target, _) in TARGETS {
        std::fs::create_dir_all(dir(target)).unwrap();
        for (name, bytes, _) in seeds(target) {
            std::fs::write(dir(target).join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}

#[test]
fn seeds_in_the_corpus_are_current_and_judged_right() {
    for (target, run) in TARGETS {
        for (name, bytes, valid) in seeds(target) {
            let path = dir(target).join(format!("seed-{name}"));
            let stored = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run write_seeds)", path.display()));
            assert_eq!(
                stored,
                bytes,
                "{} is stale (run write_seeds)",
                path.display()
            );
            assert_eq!(run(&bytes), valid, "{target}: seed {name}");
        }
    }
}

#[test]
fn every_corpus_input_replays_without_a_panic() {
    for (target, run) in TARGETS {
        let mut files = 0;
        let mut accepted = 0;
        for entry in std::fs::read_dir(dir(target)).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let ok = std::panic::catch_unwind(|| run(&bytes))
                .unwrap_or_else(|_| panic!("{target} panicked on {}", path.display()));
            files += 1;
            accepted += usize::from(ok);
        }
        // The seeds alone make a few accepted and a few refused inputs.
        assert!(files >= 4, "{target}: only {files} corpus files");
        assert!(accepted >= 1, "{target}: nothing in the corpus is accepted");
        println!("{target}: {files} inputs replayed, {accepted} accepted");
    }
}
