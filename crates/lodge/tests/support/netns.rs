//! Network namespaces a test creates and deletes, and commands run inside them.

use std::process::Command;

/// A network namespace with loopback up, deleted with everything in it when dropped.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new(name: String) -> Namespace {
        run("ip", &["netns", "add", &name]);
        let namespace = Namespace { name };
        namespace.ip(&["link", "set", "lo", "up"]);
        namespace
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `command` (program, arguments and environment) run inside the namespace.
    pub fn wrap(&self, command: Command) -> Command {
        super::prefixed(&["ip", "netns", "exec", &self.name], command)
    }

    /// `program ARGS...` run inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command.args(args);
        self.wrap(command)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Runs `program ARGS...`, which must succeed.
pub fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}
