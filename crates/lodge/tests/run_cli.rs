//! `lodge run` as a user sees it: validation errors are one line with exit status 2.

use std::io::Write;
use std::process::{Command, Output};

fn lodge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lodge"))
        .args(args)
        .env("LODGE_LOG", "warn")
        .output()
        .expect("lodge runs")
}

/// Asserts `lodge run ARGS` fails with status 2 and exactly one stderr line containing `what`.
fn assert_usage_error(args: &[&str], what: &str) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let output = lodge(&full);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line for {args:?}: {stderr}");
    assert!(stderr.contains(what), "{args:?}: {stderr:?} lacks {what:?}");
    assert!(stderr.starts_with("lodge: error: "), "{stderr}");
}

fn kernel_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"not really a kernel").unwrap();
    file
}

#[test]
fn missing_kernel_file() {
    assert_usage_error(
        &["--kernel", "/nonexistent/vmlinux"],
        "Kernel file not found: /nonexistent/vmlinux",
    );
}

#[test]
fn memory_too_small_or_larger_than_the_host() {
    let kernel = kernel_file();
    let path = kernel.path().to_str().unwrap();
    assert_usage_error(
        &["--kernel", path, "--memory", "16M"],
        "Memory 16 MiB is too small (minimum 64 MiB)",
    );
    assert_usage_error(
        &["--kernel", path, "--memory", "64T"],
        "is more than the host's",
    );
    assert_usage_error(
        &["--kernel", path, "--memory", "lots"],
        "Invalid memory size 'lots'",
    );
}

#[test]
fn disk_that_does_not_exist() {
    let kernel = kernel_file();
    assert_usage_error(
        &[
            "--kernel",
            kernel.path().to_str().unwrap(),
            "--disk",
            "/nonexistent/disk.img",
        ],
        "Disk image not found: /nonexistent/disk.img",
    );
}

#[test]
fn unknown_engine() {
    let kernel = kernel_file();
    assert_usage_error(
        &[
            "--kernel",
            kernel.path().to_str().unwrap(),
            "--engine",
            "qemu",
        ],
        "Unknown engine 'qemu' (expected kvm, emulator or auto)",
    );
}

#[test]
fn bad_vcpu_count_console_and_config_file() {
    let kernel = kernel_file();
    let path = kernel.path().to_str().unwrap();
    assert_usage_error(&["--kernel", path, "--cpus", "0"], "Invalid vCPU count 0");
    assert_usage_error(
        &["--kernel", path, "--cpus", "many"],
        "Invalid vCPU count 'many'",
    );
    assert_usage_error(
        &["--kernel", path, "--console", "tty"],
        "Invalid console 'tty'",
    );
    let mut config = tempfile::NamedTempFile::new().unwrap();
    config
        .write_all(br#"{"kernel": "/k", "memroy": "1G"}"#)
        .unwrap();
    assert_usage_error(
        &["--config", config.path().to_str().unwrap()],
        "Invalid config file",
    );
}

#[test]
fn a_file_that_is_not_a_kernel_fails_to_load() {
    // Passes validation (the file exists) but cannot be loaded: an error, not a usage error.
    let kernel = kernel_file();
    let output = lodge(&[
        "run",
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--console",
        "none",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Cannot load kernel"), "{stderr}");
}
