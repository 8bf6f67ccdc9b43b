//! End to end: the real `lodge daemon` process runs two VMs as real `lodge run` VMMs (the
//! default guest on the software engine), driven through the `lodge vm` CLI; the daemon is
//! killed with SIGKILL mid-run and restarted, and the inventory and the running VMs survive
//! it. The graceful stop is the guest's own shutdown: its init answers the power button.

mod support;

use std::process::Command;

use serde_json::Value;
use support::daemon::{Host, LODGE};

/// Console text proving the default guest's kernel runs.
const BANNER: &str = "Run /init";

/// Builds (or finds) the default guest image, so the first VM start does not have to.
fn ensure_default_guest() {
    let image = Command::new(LODGE)
        .arg("guest-image")
        .env("LODGE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        image.status.success(),
        "the default guest image builds: {}",
        String::from_utf8_lossy(&image.stderr)
    );
}

#[test]
fn two_vms_survive_a_daemon_crash_and_stop_cleanly() {
    let mut host = Host::new();
    ensure_default_guest();
    let banner = BANNER;
    host.start_daemon();
    for name in ["alpha", "beta"] {
        host.ok(&[
            "vm", "create", name, "--engine", "emulator", "--memory", "128M",
        ]);
    }
    for name in ["alpha", "beta"] {
        let started = host.ok(&["vm", "start", name]);
        assert!(started.contains(&format!("{name}: running")), "{started}");
    }
    for name in ["alpha", "beta"] {
        host.wait_for_console(name, banner);
    }
    let pids: Vec<Value> = ["alpha", "beta"]
        .iter()
        .map(|n| host.vm(n)["runtime"]["pid"].clone())
        .collect();
    assert!(pids.iter().all(Value::is_u64), "{pids:?}");

    // The daemon dies mid-run; the VMs do not.
    host.kill_daemon();
    host.start_daemon();
    let list: Value = serde_json::from_str(&host.ok(&["vm", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    for (name, pid) in ["alpha", "beta"].iter().zip(&pids) {
        let vm = host.vm(name);
        assert_eq!(vm["state"], "running", "{vm:#}\n{}", host.daemon_log());
        assert_eq!(&vm["runtime"]["pid"], pid, "{name} was not re-adopted");
    }
    // The console still works through the restarted daemon.
    let logs = host.ok(&["vm", "logs", "alpha", "--lines", "50"]);
    assert!(logs.contains(banner), "{logs}");

    // alpha stops gracefully: the guest sees the power button and reboots by itself.
    let stopped = host.ok(&["vm", "stop", "alpha", "--timeout", "120"]);
    assert!(stopped.starts_with("alpha: stopped"), "{stopped}");
    let alpha = host.vm("alpha");
    let reason = alpha["last_exit"]["reason"].as_str().unwrap();
    println!("alpha stopped: {reason}");
    assert_eq!(
        reason, "Guest reset",
        "the guest shut itself down: {alpha:#}"
    );
    assert_eq!(alpha["last_exit"]["status"], 0, "{alpha:#}");
    let console = host.ok(&["vm", "logs", "alpha", "--lines", "20"]);
    assert!(
        console.contains("lodge-guest: power button pressed, shutting down"),
        "{console}"
    );
    // beta is killed.
    let killed = host.ok(&["vm", "kill", "beta"]);
    assert!(killed.starts_with("beta: stopped"), "{killed}");
    for pid in &pids {
        let pid = pid.as_u64().unwrap() as i32;
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z");
        assert!(!alive, "VMM {pid} still runs");
    }

    // The database reflects it, across another restart.
    host.kill_daemon();
    host.start_daemon();
    for name in ["alpha", "beta"] {
        let vm = host.vm(name);
        assert_eq!(vm["state"], "stopped", "{vm:#}");
        assert_eq!(vm["runtime"], Value::Null);
    }
    host.kill_daemon();
    let db = lodge_daemon::db::Db::open(&host.dir.path().join("state/lodge.db")).unwrap();
    let states: Vec<(String, String)> = db
        .vms()
        .unwrap()
        .into_iter()
        .map(|vm| (vm.name, vm.state.to_string()))
        .collect();
    assert_eq!(
        states,
        [
            ("alpha".to_owned(), "stopped".to_owned()),
            ("beta".to_owned(), "stopped".to_owned())
        ]
    );
}

/// The disk and host commands, `--json`, and failures: non-zero status with the API's
/// message on stderr.
#[test]
fn cli_manages_disks_and_reports_api_errors() {
    let mut host = Host::new();
    host.start_daemon();
    let created = host.ok(&["disk", "create", "data", "--size", "1G"]);
    assert!(
        created.contains("Size:        1.0G (1073741824 bytes)"),
        "{created}"
    );
    let source = host.dir.path().join("seed.raw");
    let mut content = vec![0u8; 3 << 20];
    content[(2 << 20) + 7] = 0x5a;
    std::fs::write(&source, &content).unwrap();
    let imported = host.ok(&["disk", "import", "seed", source.to_str().unwrap()]);
    assert!(imported.contains("State:       ready"), "{imported}");
    let disks: Value = serde_json::from_str(&host.ok(&["disk", "list", "--json"])).unwrap();
    let image = disks[1]["path"].as_str().unwrap();
    assert_eq!(disks[1]["name"], "seed");
    assert_eq!(std::fs::read(image).unwrap(), content);

    host.ok(&[
        "vm", "create", "user", "--disk", "data", "--disk", "seed,ro", "--memory", "1G",
    ]);
    let table = host.ok(&["disk", "list"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(table.contains("user"), "{table}");

    let failure = host.cli(&["disk", "delete", "data"]);
    assert_eq!(failure.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failure.stderr);
    assert_eq!(
        stderr.trim(),
        "lodge: error: Disk 'data' is attached to VM(s) user; detach it first"
    );
    let failure = host.cli(&["vm", "create", "user"]);
    assert_eq!(failure.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failure.stderr).contains("A VM named 'user' already exists"));
    let failure = host.cli(&["vm", "update", "user", "--memory", "lots"]);
    assert_eq!(failure.status.code(), Some(1));

    let updated = host.ok(&["vm", "update", "user", "--no-disks", "--cpus", "1"]);
    assert!(updated.contains("Disks:      -"), "{updated}");
    host.ok(&["disk", "delete", "data"]);
    host.ok(&["vm", "delete", "user"]);
    let info: Value = serde_json::from_str(&host.ok(&["host", "info", "--json"])).unwrap();
    assert_eq!(
        (info["vms_defined"].as_u64(), info["disks"].as_u64()),
        (Some(0), Some(1))
    );

    // No daemon: a clear error, not a hang.
    host.kill_daemon();
    let failure = host.cli(&["vm", "list"]);
    assert_eq!(failure.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failure.stderr);
    assert!(
        stderr.contains("Cannot connect to the lodge daemon"),
        "{stderr}"
    );
}
