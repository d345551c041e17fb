//! Helpers shared by the CLI tests that run the real `latte` binary on the tiny fixture models.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The path of a fixture model of latte-models.
pub fn model(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-models/tests/fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Runs `latte ARGS`.
pub fn latte(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latte"))
        .args(args)
        .output()
        .expect("run latte")
}

/// Runs `latte ARGS`, which must succeed; returns its standard output.
pub fn ok(args: &[&str]) -> String {
    let out = latte(args);
    assert!(
        out.status.success(),
        "latte {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `latte ARGS`, which must fail with every one of `needles` in its standard error.
pub fn fails(args: &[&str], needles: &[&str]) {
    let out = latte(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "latte {args:?} should fail");
    for needle in needles {
        assert!(
            err.contains(needle),
            "latte {args:?}: expected {needle:?} in {err}"
        );
    }
}

/// Runs `latte ARGS`, which must succeed; returns its standard error (where reports are printed).
pub fn ok_stderr(args: &[&str]) -> String {
    let out = latte(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "latte {args:?} failed: {err}");
    err
}

/// A path as `&str` (the test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
