//! End to end: the real `lodge daemon` process runs two VMs as real `lodge run` VMMs (the
//! default guest on the software engine), driven through the `lodge vm` CLI; the daemon is
//! killed with SIGKILL mid-run and restarted, and the inventory and the running VMs survive
//! it. The graceful stop is the guest's own shutdown: its init answers the power button.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LODGE: &str = env!("CARGO_BIN_EXE_lodge");

/// How long a VM may take to reach `running` with console output (the first start with the
/// default guest may build it).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

struct Host {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lodge-e2e")
            .tempdir()
            .unwrap();
        Self { dir, daemon: None }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/lodge.sock")
    }

    fn start_daemon(&mut self) {
        assert!(self.daemon.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(LODGE)
            .args([
                "daemon",
                "--no-host-network",
                "--stop-timeout",
                "3",
                "--state-dir",
            ])
            .arg(self.dir.path().join("state"))
            .arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["host", "info"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    fn kill_daemon(&mut self) {
        let mut child = self.daemon.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(LODGE)
            .args(args)
            .env("LODGE_SOCKET", self.socket())
            .env("LODGE_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "lodge {args:?} failed: {}{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.daemon_log()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn vm(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["vm", "show", name, "--json"])).unwrap()
    }

    fn wait_for_console(&self, name: &str, text: &str) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let logs = self.ok(&["vm", "logs", name]);
            if logs.contains(text) {
                return;
            }
            let vm = self.vm(name);
            assert!(
                vm["state"] == "running",
                "{name} is not running: {vm:#}\n{}",
                self.vmm_logs()
            );
            assert!(
                Instant::now() < deadline,
                "no '{text}' on the console of {name}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn vmm_logs(&self) -> String {
        let mut text = String::new();
        for id in 1..=2 {
            let path = self.dir.path().join(format!("state/vms/{id}/vmm.log"));
            text.push_str(&format!("--- {}\n", path.display()));
            text.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        text
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // VMMs outlive the daemon by design; end this test's ones.
        for id in 1..=2 {
            let pidfile = self.dir.path().join(format!("run/vms/{id}/vmm.pid"));
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill only sends a signal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

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
