//! API latency and daemon memory, measured against a real `lodge daemon` process.
//!
//! Run: `cargo build --release -p lodge && cargo bench -p lodge-daemon --bench api`.
//! The daemon runs VMs with the fake VMM (`lodge-fake-vmm`), so `start` measures the
//! daemon's work (capacity check, database, spawn), not a guest boot.
//!
//! Latencies are per request over the Unix socket, one connection per request (as the CLI
//! does). The peer, measured in the same run, is the transport floor: an unknown path
//! answered by the router with a JSON 404; each operation is printed as a ratio to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use lodge_daemon::client::Client;
use serde_json::json;

const ROUNDS: usize = 500;
const START_ROUNDS: usize = 30;

fn main() {
    let Some(lodge) = lodge_binary() else {
        eprintln!(
            "api bench: no release lodge binary next to this benchmark; \
             run `cargo build --release -p lodge` first"
        );
        std::process::exit(1);
    };
    let dir = tempfile::Builder::new()
        .prefix("lodge-bench")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("run/lodge.sock");
    let mut daemon = Command::new(&lodge)
        .args([
            "daemon",
            "--vmm-binary",
            env!("CARGO_BIN_EXE_lodge-fake-vmm"),
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .env("LODGE_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client::unix(&socket);
    runtime.block_on(async {
        wait_for_socket(&client).await;
        let pid = daemon.id();
        // Warm up the code paths before the first memory reading.
        for _ in 0..50 {
            client.send(Method::GET, "/v1/vms", None, None).await.unwrap();
        }
        let rss_empty = rss_kib(pid);
        for i in 0..10 {
            let body = json!({"name": format!("vm{i}"), "memory_mib": 64});
            let _: serde_json::Value = client.call(Method::POST, "/v1/vms", Some(&body)).await.unwrap();
        }
        for _ in 0..50 {
            client.send(Method::GET, "/v1/vms", None, None).await.unwrap();
        }
        let rss_ten = rss_kib(pid);

        let floor = measure(ROUNDS, || async {
            let response = client.send(Method::GET, "/v1/nothing", None, None).await.unwrap();
            assert_eq!(response.status, 404);
        })
        .await;
        let list = measure(ROUNDS, || async {
            let response = client.send(Method::GET, "/v1/vms", None, None).await.unwrap();
            assert_eq!(response.status, 200);
        })
        .await;
        let inspect = measure(ROUNDS, || async {
            let response = client.send(Method::GET, "/v1/vms/vm5", None, None).await.unwrap();
            assert_eq!(response.status, 200);
        })
        .await;
        let mut start = Vec::new();
        let mut to_running = Vec::new();
        for _ in 0..START_ROUNDS {
            let began = Instant::now();
            let response = client.send(Method::POST, "/v1/vms/vm0/start", None, None).await.unwrap();
            assert_eq!(response.status, 202, "{:?}", response.body);
            start.push(began.elapsed());
            loop {
                let vm: serde_json::Value = client.get("/v1/vms/vm0").await.unwrap();
                if vm["state"] == "running" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            to_running.push(began.elapsed());
            let response = client.send(Method::POST, "/v1/vms/vm0/kill", None, None).await.unwrap();
            assert_eq!(response.status, 200);
        }
        let rss_after = rss_kib(pid);

        println!("lodge daemon API latency over its Unix socket ({ROUNDS} requests each, 10 VMs defined)");
        println!("{:<28} {:>9} {:>9} {:>9} {:>8}", "operation", "median", "p99", "mean", "÷ floor");
        report("floor (unknown path, 404)", &floor, &floor);
        report("list VMs (GET /v1/vms)", &list, &floor);
        report("inspect (GET /v1/vms/NAME)", &inspect, &floor);
        report("start (POST …/start → 202)", &start, &floor);
        report("start → running (fake VMM)", &to_running, &floor);
        println!();
        println!("daemon resident memory: {rss_empty} KiB with 0 VMs, {rss_ten} KiB with 10 defined, {rss_after} KiB after {START_ROUNDS} start/kill cycles");
    });
    let _ = daemon.kill();
    let _ = daemon.wait();
    stop_vmms(dir.path());
}

async fn measure<F, Fut>(rounds: usize, mut operation: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let began = Instant::now();
        operation().await;
        samples.push(began.elapsed());
    }
    samples
}

fn report(name: &str, samples: &[Duration], floor: &[Duration]) {
    let (median, p99, mean) = stats(samples);
    let (floor_median, _, _) = stats(floor);
    println!(
        "{name:<28} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>7.2}×",
        micros(median),
        micros(p99),
        micros(mean),
        micros(median) / micros(floor_median)
    );
}

fn stats(samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    (median, p99, mean)
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn wait_for_socket(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .send(Method::GET, "/v1/host", None, None)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "daemon did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The release `lodge` binary: this benchmark runs from `target/release/deps/`.
fn lodge_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.parent()?.join("lodge");
    candidate.is_file().then_some(candidate)
}

/// Ends fake VMMs left by the run (they outlive the daemon by design).
fn stop_vmms(dir: &Path) {
    let wanted = dir.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
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
