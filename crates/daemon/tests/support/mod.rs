//! Test harness: a daemon on its own runtime with a temporary state directory, socket and
//! fake VMM, and an API client that checks every response against the OpenAPI document.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::Method;
use lodge_daemon::client::{Client, Endpoint, RawResponse};
use lodge_daemon::{Daemon, DaemonConfig};
use serde_json::Value;

/// A daemon serving on a temporary socket, on a runtime of its own so that stopping it is
/// like killing the process: its tasks vanish, its VMM processes keep running.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub config: DaemonConfig,
    pub api: Api,
    pub tcp: Option<SocketAddr>,
    running: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl TestDaemon {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(adjust: impl FnOnce(&mut DaemonConfig)) -> Self {
        let dir = tempfile::Builder::new().prefix("lodged").tempdir().unwrap();
        let mut config = DaemonConfig::new(dir.path().join("state"), dir.path().join("run"));
        config.vmm_binary = PathBuf::from(env!("CARGO_BIN_EXE_lodge-fake-vmm"));
        config.stop_timeout = Duration::from_secs(10);
        // These tests run in the host's network namespace: they must not change it.
        config.host_network = false;
        adjust(&mut config);
        let api = Api::new(Client::unix(&config.socket));
        let mut daemon = Self {
            dir,
            config,
            api,
            tcp: None,
            running: None,
        };
        daemon.boot();
        daemon
    }

    /// Starts the daemon (again) on the same state, on a thread with its own runtime.
    pub fn boot(&mut self) {
        assert!(self.running.is_none(), "already running");
        let (started, started_receiver) = std::sync::mpsc::channel();
        let (stop, stop_receiver) = std::sync::mpsc::channel::<()>();
        let config = self.config.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let daemon = match Daemon::bind(config).await {
                    Ok(daemon) => daemon,
                    Err(e) => return started.send(Err(e.to_string())).unwrap(),
                };
                started.send(Ok(daemon.tcp_address())).unwrap();
                let stopped = tokio::task::spawn_blocking(move || stop_receiver.recv());
                tokio::select! {
                    result = daemon.serve() => result.unwrap(),
                    _ = stopped => {}
                }
            });
            // Drops every task of the daemon, as a killed process would lose them.
            runtime.shutdown_timeout(Duration::from_secs(5));
        });
        self.tcp = started_receiver
            .recv_timeout(Duration::from_secs(20))
            .expect("daemon did not start")
            .expect("daemon failed to start");
        self.running = Some((stop, thread));
    }

    /// Stops the daemon abruptly (its tasks are dropped; VMMs keep running).
    pub fn halt(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            thread.join().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.halt();
        self.boot();
    }

    pub fn paths(&self) -> lodge_daemon::config::Paths {
        self.config.paths()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.halt();
        kill_processes_under(self.dir.path());
    }
}

/// Kills processes whose command line mentions `dir` (the VMMs of a test).
pub fn kill_processes_under(dir: &Path) {
    let wanted = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(wanted.len()).any(|w| w == wanted) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A client that checks every response against the OpenAPI document and remembers which
/// documented responses it saw.
pub struct Api {
    pub client: Client,
    pub openapi: OpenApiCheck,
}

impl Api {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            openapi: OpenApiCheck::new(),
        }
    }

    pub fn with_endpoint(endpoint: Endpoint) -> Self {
        Self::new(Client::new(endpoint))
    }

    /// A request with a JSON body (or none); returns the status and the body as JSON
    /// (`Null` when empty or not JSON).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let content_type = bytes.as_ref().map(|_| "application/json");
        let response = self.raw(method, path, content_type, bytes).await;
        (
            response.status.as_u16(),
            response.json().unwrap_or(Value::Null),
        )
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> RawResponse {
        eprintln!("> {method} {path}");
        let response = self
            .client
            .send(method.clone(), path, content_type, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        self.openapi.check(method.as_str(), path, &response);
        response
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// POST without a body.
    pub async fn action(&self, path: &str) -> (u16, Value) {
        self.call(Method::POST, path, None).await
    }

    pub async fn create_vm(&self, body: Value) -> Value {
        let (status, vm) = self.post("/v1/vms", body).await;
        assert_eq!(status, 201, "{vm}");
        vm
    }

    /// Polls a VM until `done` holds, failing after `timeout`.
    pub async fn wait_vm(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, vm) = self.get(&format!("/v1/vms/{name}")).await;
            assert_eq!(status, 200, "{vm}");
            if done(&vm) {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name} did not get there in {timeout:?}: {vm:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the VM runs and its guest reported the boot time (the fake guest's
    /// banner is in the console log then).
    pub async fn wait_booted(&self, name: &str) -> Value {
        self.wait_vm(name, Duration::from_secs(20), |vm| {
            vm["state"] == "running" && !vm["runtime"]["boot_time_ms"].is_null()
        })
        .await
    }

    pub async fn wait_state(&self, name: &str, state: &str) -> Value {
        self.wait_vm(name, Duration::from_secs(20), |vm| vm["state"] == state)
            .await
    }
}

/// Asserts an error response: status, code, and a non-empty message.
pub fn assert_error(response: &(u16, Value), status: u16, code: &str) {
    assert_eq!(response.0, status, "{}", response.1);
    assert_eq!(response.1["error"]["code"], code, "{}", response.1);
    assert!(
        response.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        response.1
    );
}

/// Validates responses against `docs/openapi.json`'s schemas (the same document the
/// daemon serves; a separate test checks they are equal).
pub struct OpenApiCheck {
    document: Value,
    seen: Mutex<HashSet<(String, String, u16)>>,
}

impl OpenApiCheck {
    pub fn new() -> Self {
        Self {
            document: serde_json::from_str(lodge_daemon::api::openapi_json()).unwrap(),
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Every (method, path template, status) the document lists.
    pub fn documented(&self) -> BTreeSet<(String, String, u16)> {
        let mut all = BTreeSet::new();
        for (template, item) in self.document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for status in operation["responses"].as_object().unwrap().keys() {
                    all.insert((
                        method.to_uppercase(),
                        template.clone(),
                        status.parse().unwrap(),
                    ));
                }
            }
        }
        all
    }

    pub fn seen(&self) -> BTreeSet<(String, String, u16)> {
        self.seen.lock().unwrap().iter().cloned().collect()
    }

    /// Records a response obtained without [`Api`] (the WebSocket upgrade).
    pub fn record(&self, method: &str, path: &str, status: u16) {
        let template = self
            .template(path)
            .unwrap_or_else(|| panic!("{path} is not documented"));
        let documented = &self.document["paths"][&template][method.to_lowercase()]["responses"];
        assert!(
            !documented[status.to_string()].is_null(),
            "{method} {path} {status} is not documented"
        );
        self.seen
            .lock()
            .unwrap()
            .insert((method.to_owned(), template, status));
    }

    /// The document's path template matching `path` (without its query).
    pub fn template(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        self.document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find_map(|template| {
                let parts: Vec<&str> = template.split('/').collect();
                let matches = parts.len() == segments.len()
                    && parts
                        .iter()
                        .zip(&segments)
                        .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()));
                matches.then(|| template.clone())
            })
    }

    /// Checks a response: documented status, and a body valid for its schema.
    pub fn check(&self, method: &str, path: &str, response: &RawResponse) {
        let status = response.status.as_u16();
        let Some(template) = self.template(path) else {
            // Unknown paths answer the generic JSON error.
            assert_eq!(status, 404, "{method} {path}");
            self.validate_error(&response.body, method, path);
            return;
        };
        let operation = &self.document["paths"][&template][method.to_lowercase()];
        if operation.is_null() {
            assert_eq!(status, 405, "{method} {path}");
            self.validate_error(&response.body, method, path);
            return;
        }
        let documented = &operation["responses"][status.to_string()];
        assert!(
            !documented.is_null(),
            "{method} {path} answered {status}, which the OpenAPI document does not list: {}",
            String::from_utf8_lossy(&response.body)
        );
        self.seen
            .lock()
            .unwrap()
            .insert((method.to_owned(), template.clone(), status));
        let content = &documented["content"];
        if content.is_null() {
            assert!(
                response.body.is_empty(),
                "{method} {path}: undocumented body"
            );
            return;
        }
        if let Some(schema_owner) = content.get("application/json") {
            assert!(
                response
                    .content_type
                    .as_deref()
                    .is_some_and(|c| c.starts_with("application/json")),
                "{method} {path}: content type {:?}",
                response.content_type
            );
            let body: Value = serde_json::from_slice(&response.body)
                .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON: {e}"));
            let _ = schema_owner;
            let pointer = format!(
                "#/paths/{}/{}/responses/{status}/content/application~1json/schema",
                template
                    .replace('~', "~0")
                    .replace('/', "~1")
                    .replace('{', "%7B")
                    .replace('}', "%7D"),
                method.to_lowercase()
            );
            self.validate(&pointer, &body, method, path);
        } else {
            assert!(
                content.get("text/plain").is_some(),
                "{method} {path}: unexpected documented content {content}"
            );
            assert!(
                response
                    .content_type
                    .as_deref()
                    .is_some_and(|c| c.starts_with("text/plain")),
                "{method} {path}: content type {:?}",
                response.content_type
            );
        }
    }

    fn validate_error(&self, body: &[u8], method: &str, path: &str) {
        let body: Value = serde_json::from_slice(body).unwrap();
        self.validate("#/components/schemas/ErrorBody", &body, method, path);
    }

    fn validate(&self, pointer: &str, body: &Value, method: &str, path: &str) {
        let mut schema = self.document.clone();
        let root = schema.as_object_mut().unwrap();
        root.insert("$ref".into(), Value::String(pointer.to_owned()));
        root.insert(
            "$schema".into(),
            Value::String("https://json-schema.org/draft/2020-12/schema".into()),
        );
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("schema {pointer} does not compile: {e}"));
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{method} {path}: response does not match {pointer}: {errors:?}\n{body:#}"
        );
    }
}

/// Moves the calling thread (and the threads it starts later, such as a test daemon's) into a
/// network namespace of its own, so a daemon with host networking changes nothing of the
/// host's. False, with the reason printed, when that needs privileges this test lacks.
pub fn private_network(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {test} (host networking part): needs root for a network namespace");
        return false;
    }
    // SAFETY: unshare(2) changes only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!(
            "SKIP {test} (host networking part): unshare failed: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    // Children inherit the calling thread's namespace: loopback up for TCP tests.
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
    true
}
