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

/// A hand-assembled kernel: prints "ok\n" on COM1, writes the boot timer, then resets the
/// machine through the i8042 the way Linux's `reboot=k` does.
fn serial_then_reset_kernel() -> tempfile::NamedTempFile {
    let code: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'o', 0xee, // mov al, 'o'; out dx, al
        0xb0, b'k', 0xee, // mov al, 'k'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, // mov rax, 0xd0000000
        0xc6, 0x00, 0x7b, // mov byte [rax], 123 (boot timer)
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al (i8042 reset)
        0xeb, 0xfe, // jmp $
    ];
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&lodge_testkit::vmlinux_from_code(code))
        .unwrap();
    file
}

fn guest_reset_ends_lodge_run_with_status_0(engine: &str) {
    let kernel = serial_then_reset_kernel();
    let output = lodge(&[
        "run",
        "--engine",
        engine,
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--console",
        "stdio",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    assert!(
        stderr.contains(&format!("lodge: engine {engine}")),
        "{stderr}"
    );
    assert!(stderr.contains("guest userspace started after"), "{stderr}");
    assert!(stderr.contains("Guest reset"), "{stderr}");
}

#[test]
fn emulator_guest_reset_ends_lodge_run_with_status_0() {
    guest_reset_ends_lodge_run_with_status_0("emulator");
}

#[test]
fn kvm_guest_reset_ends_lodge_run_with_status_0() {
    match lodge_kvm::probe() {
        Ok(_) => guest_reset_ends_lodge_run_with_status_0("kvm"),
        Err(reason) => println!("SKIP kvm_guest_reset_ends_lodge_run_with_status_0: {reason}"),
    }
}

#[test]
fn exit_file_records_how_the_vm_ended() {
    let kernel = serial_then_reset_kernel();
    let dir = tempfile::tempdir().unwrap();
    let exit_file = dir.path().join("exit.json");
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "kernel": kernel.path(),
            "engine": "emulator",
            "console": "none",
            "exit_file": exit_file,
        })
        .to_string(),
    )
    .unwrap();
    let output = lodge(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&exit_file).unwrap()).unwrap();
    assert_eq!(record["reason"], "Guest reset");
    assert_eq!(record["status"], 0);
    assert!(record["boot_time_ms"].as_u64().is_some());

    // A VM that cannot start records why, too.
    std::fs::write(
        &config,
        serde_json::json!({"kernel": "/nonexistent", "exit_file": exit_file}).to_string(),
    )
    .unwrap();
    let output = lodge(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&exit_file).unwrap()).unwrap();
    assert_eq!(record["status"], 2);
    assert_eq!(record["reason"], "Kernel file not found: /nonexistent");
}
