//! Replays every file of the fuzz corpora (`fuzz/corpus/<target>/`, seeds and
//! crashers found by `cargo xtask fuzz`) through the same entry points the
//! fuzz targets call, so a parser that panics on one of them fails `cargo test`
//! without nightly or libFuzzer.

use std::path::{Path, PathBuf};

use gateway_user::fuzzing;

/// A fuzz entry point: takes any bytes, must not panic.
type Entry = fn(&[u8]);

/// Fuzz targets and the entry point each one drives.
const TARGETS: [(&str, Entry); 6] = [
    ("request_body", fuzzing::request_body),
    ("sse_usage", fuzzing::sse_usage),
    ("config_annotation", fuzzing::config_annotation),
    ("pods_file", fuzzing::pods_file),
    ("engine_metrics", fuzzing::engine_metrics_page),
    ("pd_bodies", fuzzing::pd_bodies),
];

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_replays_without_a_panic() {
    for (target, run) in TARGETS {
        let files = corpus_files(target);
        assert!(files.len() >= 3, "{target}: a seed corpus of a handful of files expected, found {}", files.len());
        for file in files {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{target}: {} panicked", file.display());
            }
        }
    }
}
