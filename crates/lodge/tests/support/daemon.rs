//! A real `lodge daemon` for end-to-end tests.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const LODGE: &str = env!("CARGO_BIN_EXE_lodge");

/// How long a VM may take to reach `running` with console output (the first start with the
/// default guest may build it).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// A real `lodge daemon` on a temporary state directory, driven through the CLI; in a
/// network namespace when given one (host networking on), else with `--no-host-network`.
pub struct Host {
    pub dir: tempfile::TempDir,
    daemon: Option<Child>,
    namespace: Option<String>,
}

impl Host {
    pub fn new() -> Self {
        Self::in_namespace(None)
    }

    /// A host whose daemon runs inside network namespace `namespace` (which must exist).
    pub fn in_namespace(namespace: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lodge-e2e")
            .tempdir()
            .unwrap();
        Self {
            dir,
            daemon: None,
            namespace: namespace.map(str::to_owned),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/lodge.sock")
    }

    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut command = match &self.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace, LODGE, "daemon"]);
                command
            }
            None => {
                let mut command = Command::new(LODGE);
                command.args(["daemon", "--no-host-network"]);
                command
            }
        };
        let child = command
            .args(["--stop-timeout", "3", "--state-dir"])
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
    pub fn kill_daemon(&mut self) {
        let mut child = self.daemon.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(LODGE)
            .args(args)
            .env("LODGE_SOCKET", self.socket())
            .env("LODGE_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
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

    pub fn vm(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["vm", "show", name, "--json"])).unwrap()
    }

    pub fn wait_for_console(&self, name: &str, text: &str) {
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

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn vmm_logs(&self) -> String {
        let mut text = String::new();
        for id in 1..=8 {
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
        for id in 1..=8 {
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
