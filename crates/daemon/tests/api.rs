//! API tests: a real HTTP client against a daemon on a temporary socket and database, with
//! a fake VMM (`lodge-fake-vmm`) standing in for `lodge run`. Every response is checked
//! against the OpenAPI document.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use lodge_contract::{ControlRequest, RunState};
use lodge_daemon::client::Endpoint;
use lodge_daemon::config::TcpListen;
use serde_json::{json, Value};
use support::{assert_error, Api, TestDaemon};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_and_checked_in() {
    let daemon = TestDaemon::start();
    let response = daemon
        .api
        .raw(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(response.status, 200);
    let served = String::from_utf8(response.body.to_vec()).unwrap();
    assert_eq!(served, lodge_daemon::api::openapi_json());
    let checked_in = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    if std::env::var_os("LODGE_UPDATE_OPENAPI").is_some() {
        std::fs::write(checked_in, &served).unwrap();
    }
    let on_disk = std::fs::read_to_string(checked_in).unwrap_or_default();
    assert!(
        on_disk == served,
        "docs/openapi.json differs from the served document; regenerate it with \
         LODGE_UPDATE_OPENAPI=1 cargo test -p lodge-daemon --test api openapi"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_created_listed_updated_and_deleted() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    assert_eq!(api.get("/v1/vms").await, (200, json!([])));
    let vm = api
        .create_vm(json!({"name": "web", "cpus": 1, "memory_mib": 128, "append": ["quiet"]}))
        .await;
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["engine"], "auto");
    assert_eq!(vm["kernel"], Value::Null);
    api.create_vm(json!({"name": "db"})).await;
    let (status, list) = api.get("/v1/vms").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);

    let (status, updated) = api
        .call(
            Method::PATCH,
            "/v1/vms/web",
            Some(json!({"memory_mib": 256, "engine": "emulator"})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        (updated["memory_mib"].as_u64(), updated["engine"].as_str()),
        (Some(256), Some("emulator"))
    );
    assert_eq!(updated["append"], json!(["quiet"]));

    assert_eq!(api.call(Method::DELETE, "/v1/vms/web", None).await.0, 204);
    assert_error(&api.get("/v1/vms/web").await, 404, "vm_not_found");
    assert_error(
        &api.call(Method::DELETE, "/v1/vms/web", None).await,
        404,
        "vm_not_found",
    );
    // Reopening the database keeps the inventory.
    let mut daemon = daemon;
    daemon.restart();
    let (_, list) = daemon.api.get("/v1/vms").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_400_413_415_with_the_error_shape() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    for body in [
        json!({"name": "Bad_Name"}),
        json!({"name": ""}),
        json!({"name": "a", "cpus": 0}),
        json!({"name": "a", "cpus": 33}),
        json!({"name": "a", "cpus": 2, "engine": "emulator"}),
        json!({"name": "a", "memory_mib": 16}),
        json!({"name": "a", "kernel": "/nonexistent/vmlinux"}),
        json!({"name": "a", "kernel": "relative/vmlinux"}),
        json!({"name": "a", "memroy_mib": 256}),
        json!({"name": "a", "engine": "qemu"}),
        json!({"name": "a", "cpus": "two"}),
        json!({"name": "a", "cmdline": "x".repeat(5000)}),
        // Over the half of the kernel's 2048 bytes left for the user (see MAX_CMDLINE).
        json!({"name": "a", "cmdline": "x".repeat(1000), "append": ["y".repeat(100)]}),
        json!({"cpus": 1}),
        json!([1, 2]),
    ] {
        assert_error(
            &api.post("/v1/vms", body.clone()).await,
            400,
            "invalid_request",
        );
    }
    assert_error(
        &api.post(
            "/v1/vms",
            json!({"name": "a", "disks": [{"disk": "missing"}]}),
        )
        .await,
        400,
        "unknown_disk",
    );
    let malformed = api
        .raw(
            Method::POST,
            "/v1/vms",
            Some("application/json"),
            Some(b"{\"name\": ".to_vec()),
        )
        .await;
    assert_eq!(malformed.status, 400);
    let no_type = api
        .raw(
            Method::POST,
            "/v1/vms",
            None,
            Some(b"{\"name\": \"a\"}".to_vec()),
        )
        .await;
    assert_eq!(no_type.status, 415);
    let text = api
        .raw(
            Method::POST,
            "/v1/vms",
            Some("text/plain"),
            Some(b"{\"name\": \"a\"}".to_vec()),
        )
        .await;
    assert_eq!(text.status, 415);
    let mut huge = b"{\"name\": \"a\", \"append\": [\"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 10 << 20));
    huge.extend_from_slice(b"\"]}");
    let too_large = api
        .raw(
            Method::POST,
            "/v1/vms",
            Some("application/json"),
            Some(huge),
        )
        .await;
    assert_eq!(too_large.status, 413);
    assert_eq!(
        too_large.json().unwrap()["error"]["code"],
        "payload_too_large"
    );
    assert_error(
        &api.call(Method::PATCH, "/v1/vms/x", Some(json!({"bogus": 1})))
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.call(Method::DELETE, "/v1/vms/x?force=maybe", None)
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.call(Method::DELETE, "/v1/vms/x?what=1", None).await,
        400,
        "invalid_request",
    );
    assert_error(&api.get("/v1/nothing-here").await, 404, "not_found");
    assert_error(
        &api.call(Method::PUT, "/v1/vms", None).await,
        405,
        "method_not_allowed",
    );
    // Nothing was created by any of these.
    assert_eq!(api.get("/v1/vms").await, (200, json!([])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_have_exactly_one_winner() {
    let daemon = TestDaemon::start();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = daemon.api.client.clone();
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({"name": "race", "memory_mib": 64 + i})).unwrap();
            client
                .send(
                    Method::POST,
                    "/v1/vms",
                    Some("application/json"),
                    Some(body),
                )
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    for task in tasks {
        let response = task.await.unwrap();
        daemon.api.openapi.check("POST", "/v1/vms", &response);
        match response.status.as_u16() {
            201 => created += 1,
            409 => assert_eq!(response.json().unwrap()["error"]["code"], "name_taken"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(
        daemon.api.get("/v1/vms").await.1.as_array().unwrap().len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_sharing_a_writable_disk_have_exactly_one_winner() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    assert_eq!(
        api.post(
            "/v1/disks",
            json!({"name": "shared", "size_bytes": 1 << 20})
        )
        .await
        .0,
        201
    );
    let names: Vec<String> = (0..8).map(|i| format!("writer{i}")).collect();
    for name in &names {
        api.create_vm(json!({"name": name, "memory_mib": 64, "disks": [{"disk": "shared"}]}))
            .await;
    }
    let mut tasks = Vec::new();
    for name in &names {
        let client = daemon.api.client.clone();
        let path = format!("/v1/vms/{name}/start");
        tasks.push(tokio::spawn(async move {
            client.send(Method::POST, &path, None, None).await.unwrap()
        }));
    }
    let mut started = 0;
    for task in tasks {
        let response = task.await.unwrap();
        match response.status.as_u16() {
            202 => started += 1,
            409 => assert_eq!(response.json().unwrap()["error"]["code"], "disk_in_use"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(started, 1, "two VMs were started writing one disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_checked_at_create_and_start() {
    let host = lodge_daemon::capacity::HostCapacity::detect(1.0, false);
    // A capacity of 1000 MiB whatever this host has.
    let ratio = 1000.0 / host.memory_mib as f64;
    let daemon = TestDaemon::start_with(|config| config.memory_overcommit = ratio);
    let api = &daemon.api;
    let (_, info) = api.get("/v1/host").await;
    assert_eq!(info["memory_capacity_mib"], 1000);
    assert_eq!(info["cpus"], host.cpus);

    let too_big = api
        .post("/v1/vms", json!({"name": "big", "memory_mib": 1001}))
        .await;
    assert_error(&too_big, 422, "insufficient_capacity");
    let message = too_big.1["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1001 MiB") && message.contains("1000 MiB"),
        "{message}"
    );
    let cpus = host.cpus + 1;
    assert_error(
        &api.post("/v1/vms", json!({"name": "wide", "cpus": cpus}))
            .await,
        422,
        "insufficient_capacity",
    );

    api.create_vm(json!({"name": "a", "memory_mib": 600})).await;
    api.create_vm(json!({"name": "b", "memory_mib": 600})).await;
    assert_error(
        &api.call(
            Method::PATCH,
            "/v1/vms/b",
            Some(json!({"memory_mib": 2000})),
        )
        .await,
        422,
        "insufficient_capacity",
    );
    assert_eq!(api.action("/v1/vms/a/start").await.0, 202);
    let refused = api.action("/v1/vms/b/start").await;
    assert_error(&refused, 422, "insufficient_capacity");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("600 MiB") && message.contains("only 400 MiB"),
        "{message}"
    );
    let (_, info) = api.get("/v1/host").await;
    assert_eq!(
        (
            info["memory_allocated_mib"].as_u64(),
            info["vms_active"].as_u64()
        ),
        (Some(600), Some(1))
    );
    assert_eq!(api.get("/v1/vms/b").await.1["state"], "stopped");

    assert_eq!(api.action("/v1/vms/a/kill").await.0, 200);
    assert_eq!(api.action("/v1/vms/b/start").await.0, 202);
    api.wait_state("b", "running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_start_pause_resume_stop_kill_restart_delete() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    api.create_vm(json!({"name": "vm1", "engine": "emulator"}))
        .await;
    assert_error(&api.action("/v1/vms/vm1/stop").await, 409, "invalid_state");
    assert_error(&api.action("/v1/vms/vm1/kill").await, 409, "invalid_state");
    assert_error(&api.action("/v1/vms/vm1/pause").await, 409, "invalid_state");

    let (status, vm) = api.action("/v1/vms/vm1/start").await;
    assert_eq!(status, 202, "{vm}");
    assert!(["starting", "running"].contains(&vm["state"].as_str().unwrap()));
    assert_error(&api.action("/v1/vms/vm1/start").await, 409, "invalid_state");
    let vm = api
        .wait_vm("vm1", Duration::from_secs(20), |vm| {
            vm["state"] == "running" && !vm["runtime"]["boot_time_ms"].is_null()
        })
        .await;
    let pid = vm["runtime"]["pid"].as_u64().unwrap();
    assert_eq!(vm["runtime"]["engine"], "emulator");
    let config: Value =
        serde_json::from_slice(&std::fs::read(daemon.paths().vm(1).vmm_config()).unwrap()).unwrap();
    assert_eq!(config["engine"], "emulator");
    assert_eq!(config["kernel"], "");
    assert_eq!(config["memory"], 256);

    let (status, logs) = api
        .raw(Method::GET, "/v1/vms/vm1/logs", None, None)
        .await
        .status_and_text();
    assert_eq!(status, 200);
    assert!(logs.contains("Welcome to the fake guest"), "{logs}");

    assert_eq!(api.action("/v1/vms/vm1/pause").await.1["state"], "paused");
    assert_error(&api.action("/v1/vms/vm1/pause").await, 409, "invalid_state");
    assert_error(
        &api.call(Method::PATCH, "/v1/vms/vm1", Some(json!({"cpus": 2})))
            .await,
        409,
        "invalid_state",
    );
    assert_error(
        &api.call(Method::DELETE, "/v1/vms/vm1", None).await,
        409,
        "invalid_state",
    );
    assert_eq!(api.action("/v1/vms/vm1/resume").await.1["state"], "running");
    assert_error(
        &api.action("/v1/vms/vm1/resume").await,
        409,
        "invalid_state",
    );

    // Graceful stop: the fake guest answers the power button.
    let (status, vm) = api.action("/v1/vms/vm1/stop").await;
    assert_eq!((status, vm["state"].as_str()), (202, Some("stopping")));
    let vm = api.wait_state("vm1", "stopped").await;
    assert_eq!(vm["last_exit"]["reason"], "Guest powered off");
    assert_eq!(vm["last_exit"]["status"], 0);
    assert_eq!(vm["runtime"], Value::Null);
    assert!(!lodge_daemon::supervisor::is_alive(pid as u32, None));

    // Kill: synchronous.
    api.action("/v1/vms/vm1/start").await;
    api.wait_state("vm1", "running").await;
    let (status, vm) = api.action("/v1/vms/vm1/kill").await;
    assert_eq!(
        (status, vm["state"].as_str()),
        (200, Some("stopped")),
        "{vm}"
    );

    // Restart of a stopped VM starts it; of a running one replaces its process.
    assert_eq!(api.action("/v1/vms/vm1/restart").await.0, 202);
    let first = api.wait_state("vm1", "running").await["runtime"]["pid"].clone();
    assert_eq!(api.action("/v1/vms/vm1/restart?timeout=5").await.0, 202);
    let vm = api
        .wait_vm("vm1", Duration::from_secs(20), |vm| {
            vm["state"] == "running" && vm["runtime"]["pid"] != first
        })
        .await;
    assert_eq!(vm["last_exit"]["reason"], "Guest powered off");

    assert_eq!(
        api.call(Method::DELETE, "/v1/vms/vm1?force=true", None)
            .await
            .0,
        204
    );
    assert_error(&api.get("/v1/vms/vm1").await, 404, "vm_not_found");
    assert!(!daemon.paths().vm(1).data.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_forces_a_guest_that_ignores_the_power_button() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    api.create_vm(json!({"name": "stubborn", "append": ["fake.ignore_shutdown"]}))
        .await;
    api.action("/v1/vms/stubborn/start").await;
    api.wait_state("stubborn", "running").await;
    let started = Instant::now();
    assert_eq!(api.action("/v1/vms/stubborn/stop?timeout=1").await.0, 202);
    let vm = api.wait_state("stubborn", "stopped").await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "forced before the timeout"
    );
    assert_eq!(vm["last_exit"]["reason"], "Stopped on request");
    assert_error(
        &api.action("/v1/vms/stubborn/stop?timeout=soon").await,
        400,
        "invalid_request",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_pause_is_reported_and_undone() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    api.create_vm(json!({"name": "stuck", "append": ["fake.pause_incomplete"]}))
        .await;
    api.action("/v1/vms/stuck/start").await;
    api.wait_state("stuck", "running").await;
    let response = api.action("/v1/vms/stuck/pause").await;
    assert_error(&response, 409, "vmm_refused");
    assert!(
        response.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still running"),
        "{}",
        response.1
    );
    assert_eq!(api.get("/v1/vms/stuck").await.1["state"], "running");
    // The daemon resumed the half-paused VMM: a second attempt is incomplete again (without
    // the resume it would find every vCPU parked and succeed).
    let again = api.action("/v1/vms/stuck/pause").await;
    assert!(
        again.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still running"),
        "{}",
        again.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_record_the_reason_and_the_end_of_the_console() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    api.create_vm(json!({"name": "crashy", "append": ["fake.crash_after_ms=300"]}))
        .await;
    api.create_vm(json!({"name": "ghost", "append": ["fake.vanish_after_ms=300"]}))
        .await;
    api.create_vm(json!({"name": "steady"})).await;
    for name in ["crashy", "ghost", "steady"] {
        assert_eq!(api.action(&format!("/v1/vms/{name}/start")).await.0, 202);
    }
    let vm = api.wait_state("crashy", "crashed").await;
    assert_eq!(vm["last_exit"]["reason"], "Triple fault (fake)");
    assert_eq!(vm["last_exit"]["status"], 1);
    let tail = vm["last_exit"]["console_tail"].as_str().unwrap();
    assert!(
        tail.contains("Kernel panic - not syncing: fake crash"),
        "{tail}"
    );

    let vm = api.wait_state("ghost", "crashed").await;
    let reason = vm["last_exit"]["reason"].as_str().unwrap();
    assert!(reason.contains("killed by signal 9"), "{reason}");
    assert!(vm["last_exit"]["console_tail"]
        .as_str()
        .unwrap()
        .contains("fake: vanishing"));

    // The other VM and the daemon are unaffected; a crashed VM can start again.
    assert_eq!(api.get("/v1/vms/steady").await.1["state"], "running");
    assert_eq!(
        api.call(Method::PATCH, "/v1/vms/crashy", Some(json!({"append": []})))
            .await
            .0,
        200
    );
    assert_eq!(api.action("/v1/vms/crashy/start").await.0, 202);
    api.wait_state("crashy", "running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_cannot_start_is_a_500_and_a_crash() {
    let daemon = TestDaemon::start_with(|config| config.vmm_binary = "/nonexistent/lodge".into());
    let api = &daemon.api;
    api.create_vm(json!({"name": "doomed"})).await;
    assert_error(&api.action("/v1/vms/doomed/start").await, 500, "vmm_error");
    let vm = api.get("/v1/vms/doomed").await.1;
    assert_eq!(vm["state"], "crashed");
    assert!(vm["last_exit"]["reason"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/lodge"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_config_that_cannot_be_written_is_a_500_and_a_crash() {
    use std::os::unix::ffi::OsStrExt;
    // The VMM's JSON configuration cannot name a path that is not UTF-8.
    let daemon = TestDaemon::start_with(|config| {
        config.run_dir = config
            .run_dir
            .with_file_name(std::ffi::OsStr::from_bytes(b"run\xff"))
    });
    let api = &daemon.api;
    api.create_vm(json!({"name": "doomed"})).await;
    assert_error(&api.action("/v1/vms/doomed/start").await, 500, "internal");
    let vm = api.get("/v1/vms/doomed").await.1;
    assert_eq!(vm["state"], "crashed");
    assert!(vm["last_exit"]["reason"]
        .as_str()
        .unwrap()
        .contains("vm.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_readopts_running_vms_and_marks_vanished_ones() {
    let mut daemon = TestDaemon::start();
    for name in ["keep", "lose", "watch"] {
        daemon.api.create_vm(json!({"name": name})).await;
        daemon.api.action(&format!("/v1/vms/{name}/start")).await;
    }
    let mut pids = std::collections::HashMap::new();
    for name in ["keep", "lose", "watch"] {
        let vm = daemon.api.wait_state(name, "running").await;
        pids.insert(name, vm["runtime"]["pid"].as_u64().unwrap() as i32);
    }
    daemon.halt();
    // While the daemon is down, one VMM dies.
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(pids["lose"], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    daemon.boot();
    let api = &daemon.api;
    let keep = api.get("/v1/vms/keep").await.1;
    assert_eq!(keep["state"], "running");
    assert_eq!(keep["runtime"]["pid"], pids["keep"]);
    let lose = api.get("/v1/vms/lose").await.1;
    assert_eq!(lose["state"], "crashed", "{lose}");
    assert_eq!(
        lose["last_exit"]["reason"],
        "The VMM process was gone when the daemon started"
    );

    // An adopted VMM is still supervised: control works, and its death is noticed.
    assert_eq!(api.action("/v1/vms/keep/pause").await.1["state"], "paused");
    assert_eq!(
        api.action("/v1/vms/keep/resume").await.1["state"],
        "running"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pids["watch"], libc::SIGKILL) };
    let watch = api.wait_state("watch", "crashed").await;
    assert_eq!(
        watch["last_exit"]["reason"],
        "The VMM process vanished without an exit report"
    );
    api.action("/v1/vms/keep/stop").await;
    let keep = api.wait_state("keep", "stopped").await;
    assert_eq!(keep["last_exit"]["reason"], "Guest powered off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_socket_file_lives_as_long_as_the_daemon() {
    let mut daemon = TestDaemon::start();
    let socket = daemon.config.socket.clone();
    assert!(socket.exists());
    daemon.halt();
    assert!(!socket.exists(), "socket file left behind");
    // Whatever else is at the path is not the daemon's to delete.
    std::fs::write(&socket, "not a socket").unwrap();
    assert!(lodge_daemon::Daemon::bind(daemon.config.clone())
        .await
        .is_err());
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
    std::fs::remove_file(&socket).unwrap();
    daemon.boot();
    assert_eq!(daemon.api.get("/v1/vms").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_is_refused() {
    let daemon = TestDaemon::start();
    let error = lodge_daemon::Daemon::bind(daemon.config.clone())
        .await
        .err()
        .expect("second daemon started");
    assert!(
        error
            .to_string()
            .starts_with("Another lodge daemon is using"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_are_created_imported_attached_and_deleted() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    let (status, disk) = api
        .post(
            "/v1/disks",
            json!({"name": "blank", "size_bytes": 1u64 << 30}),
        )
        .await;
    assert_eq!(status, 201, "{disk}");
    assert_eq!(
        (disk["state"].as_str(), disk["size_bytes"].as_u64()),
        (Some("ready"), Some(1 << 30))
    );
    assert!(
        disk["allocated_bytes"].as_u64().unwrap() < 1 << 20,
        "not sparse: {disk}"
    );
    assert_error(
        &api.post("/v1/disks", json!({"name": "blank", "size_bytes": 512}))
            .await,
        409,
        "name_taken",
    );
    assert_error(
        &api.post("/v1/disks", json!({"name": "odd", "size_bytes": 1000}))
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.post("/v1/disks", json!({"name": "none"})).await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.post(
            "/v1/disks",
            json!({"name": "both", "size_bytes": 512, "source": "/x"}),
        )
        .await,
        400,
        "invalid_request",
    );

    let source = daemon.dir.path().join("source.raw");
    let mut content = vec![0u8; 8 << 20];
    content[5 << 20..(5 << 20) + 5].copy_from_slice(b"hello");
    std::fs::write(&source, &content).unwrap();
    let (status, disk) = api
        .post("/v1/disks", json!({"name": "imported", "source": source}))
        .await;
    assert_eq!(status, 202, "{disk}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let disk = loop {
        let (_, disk) = api.get("/v1/disks/imported").await;
        if disk["state"] != "importing" {
            break disk;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(disk["state"], "ready", "{disk}");
    assert_eq!(
        std::fs::read(disk["path"].as_str().unwrap()).unwrap(),
        content
    );
    let qcow = daemon.dir.path().join("image.qcow2");
    std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03rest").unwrap();
    let refused = api
        .post("/v1/disks", json!({"name": "q", "source": qcow}))
        .await;
    assert_error(&refused, 400, "invalid_request");
    assert!(refused.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("qcow2"));
    assert_error(
        &api.post(
            "/v1/disks",
            json!({"name": "m", "source": "/nonexistent.raw"}),
        )
        .await,
        400,
        "invalid_request",
    );

    api.create_vm(json!({"name": "user", "disks": [{"disk": "blank"}, {"disk": "imported", "read_only": true}]}))
        .await;
    let (_, disks) = api.get("/v1/disks").await;
    assert_eq!(disks[0]["name"], "blank");
    assert_eq!(disks[0]["attached_to"], json!(["user"]));
    assert_error(
        &api.call(Method::DELETE, "/v1/disks/blank", None).await,
        409,
        "disk_in_use",
    );
    assert_error(
        &api.post(
            "/v1/vms",
            json!({"name": "twice", "disks": [{"disk": "blank"}, {"disk": "blank"}]}),
        )
        .await,
        400,
        "invalid_request",
    );

    // The VMM gets the disks in order with their host paths.
    api.action("/v1/vms/user/start").await;
    api.wait_state("user", "running").await;
    let config: Value =
        serde_json::from_slice(&std::fs::read(daemon.paths().vm(1).vmm_config()).unwrap()).unwrap();
    assert_eq!(
        config["disks"][0]["path"],
        json!(daemon.paths().image("blank"))
    );
    assert_eq!(config["disks"][1]["read_only"], true);
    // A second VM writing the same disk cannot start while the first runs.
    api.create_vm(json!({"name": "rival", "disks": [{"disk": "blank"}]}))
        .await;
    assert_error(&api.action("/v1/vms/rival/start").await, 409, "disk_in_use");
    api.call(Method::DELETE, "/v1/vms/rival", None).await;

    assert_eq!(
        api.call(Method::DELETE, "/v1/vms/user?force=true", None)
            .await
            .0,
        204
    );
    assert_eq!(
        api.call(Method::DELETE, "/v1/disks/blank", None).await.0,
        204
    );
    assert!(!daemon.paths().image("blank").exists());
    assert_error(&api.get("/v1/disks/blank").await, 404, "disk_not_found");
    assert_error(
        &api.call(Method::DELETE, "/v1/disks/blank", None).await,
        404,
        "disk_not_found",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_websocket_carries_both_directions() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    api.create_vm(json!({"name": "tty"})).await;
    let refused = api
        .client
        .websocket("/v1/vms/tty/console")
        .await
        .err()
        .expect("attached to a stopped VM");
    assert!(
        matches!(
            refused,
            lodge_daemon::client::ClientError::Api { status: 409, .. }
        ),
        "{refused:?}"
    );
    api.openapi.record("GET", "/v1/vms/tty/console", 409);
    assert_error(&api.get("/v1/vms/tty/console").await, 409, "invalid_state");
    api.action("/v1/vms/tty/start").await;
    api.wait_state("tty", "running").await;
    // A plain GET is not a WebSocket.
    assert_error(
        &api.get("/v1/vms/tty/console").await,
        400,
        "invalid_request",
    );

    let mut websocket = api.client.websocket("/v1/vms/tty/console").await.unwrap();
    api.openapi.record("GET", "/v1/vms/tty/console", 101);
    websocket
        .send(Message::Binary(b"uname\n".to_vec().into()))
        .await
        .unwrap();
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&received).contains("echo:uname") {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, websocket.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => received.extend_from_slice(&bytes),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no echo: {other:?}, got {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    // Killing the VM closes the console.
    api.action("/v1/vms/tty/kill").await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = websocket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "console stayed open after kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_rotation_and_line_limits() {
    let daemon = TestDaemon::start_with(|config| config.console_log_limit = 4096);
    let api = &daemon.api;
    api.create_vm(json!({"name": "chatty", "append": ["fake.console_spam=300"]}))
        .await;
    let (status, empty) = api
        .raw(Method::GET, "/v1/vms/chatty/logs", None, None)
        .await
        .status_and_text();
    assert_eq!((status, empty.as_str()), (200, ""));
    api.action("/v1/vms/chatty/start").await;
    api.wait_booted("chatty").await;
    let paths = daemon.paths().vm(1);
    assert!(paths.console_log_old().exists(), "the log did not rotate");
    assert!(std::fs::metadata(paths.console_log()).unwrap().len() <= 4096);
    let (_, tail) = api
        .raw(Method::GET, "/v1/vms/chatty/logs?lines=2", None, None)
        .await
        .status_and_text();
    assert_eq!(tail, "fake: console line 299\nWelcome to the fake guest\n");
    let (_, all) = api
        .raw(Method::GET, "/v1/vms/chatty/logs", None, None)
        .await
        .status_and_text();
    assert!(
        all.len() > 4096 && all.ends_with("Welcome to the fake guest\n"),
        "{}",
        all.len()
    );

    // Follow: new output arrives, and the stream ends when the VM stops.
    let mut body = api
        .client
        .stream("/v1/vms/chatty/logs?follow=true&lines=1")
        .await
        .unwrap();
    let mut websocket = api
        .client
        .websocket("/v1/vms/chatty/console")
        .await
        .unwrap();
    websocket
        .send(Message::Binary(b"followed\n".to_vec().into()))
        .await
        .unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text.contains("echo:followed") {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(remaining, http_body_util::BodyExt::frame(&mut body))
            .await
            .expect("no followed output")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.starts_with("Welcome to the fake guest\n"), "{text}");
    api.action("/v1/vms/chatty/stop").await;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if let Ok(data) = frame.unwrap().into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "follow did not end when the VM stopped");
    assert!(text.contains("power button pressed"), "{text}");
    assert_error(
        &api.get("/v1/vms/chatty/logs?lines=x").await,
        400,
        "invalid_request",
    );
    assert_error(&api.get("/v1/vms/nope/logs").await, 404, "vm_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_bearer_token() {
    let daemon = TestDaemon::start_with(|config| {
        config.tcp = Some(TcpListen {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: "s3cret".into(),
        })
    });
    let address = daemon.tcp.unwrap().to_string();
    let anonymous = Api::with_endpoint(Endpoint::Tcp {
        address: address.clone(),
        token: None,
    });
    assert_error(&anonymous.get("/v1/vms").await, 401, "unauthorized");
    let wrong = Api::with_endpoint(Endpoint::Tcp {
        address: address.clone(),
        token: Some("guess".into()),
    });
    assert_error(&wrong.get("/v1/host").await, 401, "unauthorized");
    let right = Api::with_endpoint(Endpoint::Tcp {
        address,
        token: Some("s3cret".into()),
    });
    assert_eq!(right.get("/v1/vms").await, (200, json!([])));
    right.create_vm(json!({"name": "remote"})).await;
    // The Unix socket needs no token.
    assert_eq!(daemon.api.get("/v1/vms/remote").await.0, 200);
}

/// Goes through every operation's documented responses and fails if the OpenAPI document
/// lists a status no request produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_response_is_exercised() {
    let networked = support::private_network("every_documented_response_is_exercised");
    let host = lodge_daemon::capacity::HostCapacity::detect(1.0, false);
    let ratio = 1000.0 / host.memory_mib as f64;
    let mut daemon = TestDaemon::start_with(|config| {
        config.host_network = networked;
        config.memory_overcommit = ratio;
        config.tcp = Some(TcpListen {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: "t".into(),
        });
    });
    let api = &daemon.api;
    let json_post =
        |path: &'static str, body: &'static [u8], content_type: Option<&'static str>| {
            api.raw(Method::POST, path, content_type, Some(body.to_vec()))
        };
    let huge = vec![b' '; 1 << 20];
    let patch = |body: Vec<u8>, content_type: Option<&'static str>| {
        api.raw(Method::PATCH, "/v1/vms/a", content_type, Some(body))
    };

    api.get("/v1/host").await;
    api.get("/v1/vms").await;
    api.get("/v1/disks").await;
    api.get("/v1/openapi.json").await;
    api.get("/v1/networks").await;
    // Creates.
    api.create_vm(json!({"name": "a", "memory_mib": 600})).await;
    api.post("/v1/vms", json!({"name": "a"})).await;
    api.post("/v1/vms", json!({"name": "b", "memory_mib": 2000}))
        .await;
    json_post("/v1/vms", b"{", Some("application/json")).await;
    json_post("/v1/vms", b"{}", None).await;
    api.raw(
        Method::POST,
        "/v1/vms",
        Some("application/json"),
        Some(huge.clone()),
    )
    .await;
    api.post("/v1/disks", json!({"name": "d", "size_bytes": 4096}))
        .await;
    api.post("/v1/disks", json!({"name": "d", "size_bytes": 4096}))
        .await;
    let source = daemon.dir.path().join("src.raw");
    std::fs::write(&source, vec![1u8; 4096]).unwrap();
    api.post("/v1/disks", json!({"name": "i", "source": source}))
        .await;
    api.post("/v1/disks", json!({"name": "x", "size_bytes": 1}))
        .await;
    json_post("/v1/disks", b"{}", None).await;
    api.raw(
        Method::POST,
        "/v1/disks",
        Some("application/json"),
        Some(huge.clone()),
    )
    .await;
    // Reads.
    api.get("/v1/vms/a").await;
    api.get("/v1/vms/zz").await;
    api.get("/v1/disks/d").await;
    api.get("/v1/disks/zz").await;
    // Updates.
    patch(b"{\"cpus\": 1}".to_vec(), Some("application/json")).await;
    patch(b"{\"cpus\": 0}".to_vec(), Some("application/json")).await;
    patch(b"{\"memory_mib\": 5000}".to_vec(), Some("application/json")).await;
    patch(b"{}".to_vec(), None).await;
    patch(huge.clone(), Some("application/json")).await;
    api.call(Method::PATCH, "/v1/vms/zz", Some(json!({}))).await;
    // Lifecycle.
    api.create_vm(json!({"name": "c", "memory_mib": 600})).await;
    for path in ["start", "stop", "kill", "pause", "resume", "restart"] {
        api.action(&format!("/v1/vms/zz/{path}")).await;
    }
    api.action("/v1/vms/a/stop").await;
    api.action("/v1/vms/a/kill").await;
    api.action("/v1/vms/a/pause").await;
    api.action("/v1/vms/a/resume").await;
    api.action("/v1/vms/a/stop?timeout=x").await;
    api.action("/v1/vms/a/restart?timeout=x").await;
    api.action("/v1/vms/a/start").await;
    api.wait_state("a", "running").await;
    api.action("/v1/vms/a/start").await;
    api.action("/v1/vms/c/start").await;
    api.action("/v1/vms/c/restart").await;
    api.action("/v1/vms/a/pause").await;
    api.action("/v1/vms/a/resume").await;
    api.call(Method::PATCH, "/v1/vms/a", Some(json!({}))).await;
    api.call(Method::DELETE, "/v1/vms/a", None).await;
    api.call(Method::DELETE, "/v1/vms/a?force=x", None).await;
    api.call(
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "e", "disks": [{"disk": "d"}]})),
    )
    .await;
    api.call(Method::DELETE, "/v1/disks/d", None).await;
    api.action("/v1/vms/a/restart").await;
    api.action("/v1/vms/a/restart").await;
    api.wait_state("a", "running").await;
    api.get("/v1/vms/a/logs").await;
    api.get("/v1/vms/a/logs?lines=1").await;
    api.get("/v1/vms/a/logs?lines=-1").await;
    api.get("/v1/vms/zz/logs").await;
    api.get("/v1/vms/a/console").await;
    api.get("/v1/vms/c/console").await;
    api.get("/v1/vms/zz/console").await;
    let websocket = api.client.websocket("/v1/vms/a/console").await.unwrap();
    api.openapi.record("GET", "/v1/vms/a/console", 101);
    drop(websocket);
    api.action("/v1/vms/a/stop").await;
    api.wait_state("a", "stopped").await;
    api.call(Method::DELETE, "/v1/vms/e", None).await;
    api.call(Method::DELETE, "/v1/disks/d", None).await;
    api.call(Method::DELETE, "/v1/disks/zz", None).await;
    api.call(Method::DELETE, "/v1/vms/zz", None).await;
    api.call(Method::DELETE, "/v1/vms/a", None).await;
    // Importing disks cannot be deleted: make one that stays importing by reading a FIFO.
    let fifo = daemon.dir.path().join("slow.raw");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    // A FIFO is neither a file nor a block device: refused up front.
    api.post("/v1/disks", json!({"name": "fifo", "source": fifo}))
        .await;
    // Console and pause through a VMM that stopped answering: 500.
    api.create_vm(json!({"name": "f", "memory_mib": 64})).await;
    api.action("/v1/vms/f/start").await;
    let vm = api.wait_state("f", "running").await;
    let pid = vm["runtime"]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill only sends a signal; SIGSTOP freezes the fake VMM.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    api.action("/v1/vms/f/pause").await;
    std::fs::remove_file(daemon.paths().vm(4).console_socket()).ok();
    api.client.websocket("/v1/vms/f/console").await.ok();
    api.openapi.record("GET", "/v1/vms/f/console", 500);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    api.action("/v1/vms/f/kill").await;
    api.action("/v1/vms/f/resume").await;
    // A paused VM whose VMM stops answering cannot resume: 500.
    api.action("/v1/vms/f/start").await;
    let vm = api.wait_state("f", "running").await;
    api.action("/v1/vms/f/pause").await;
    let pid = vm["runtime"]["pid"].as_i64().unwrap() as i32;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    api.action("/v1/vms/f/resume").await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    api.action("/v1/vms/f/kill").await;
    // The VMM refusing: a pause that leaves a vCPU running.
    api.call(
        Method::PATCH,
        "/v1/vms/f",
        Some(json!({"append": ["fake.pause_incomplete"]})),
    )
    .await;
    api.action("/v1/vms/f/start").await;
    api.wait_state("f", "running").await;
    let socket = daemon.paths().vm(4).api_socket();
    api.action("/v1/vms/f/pause").await;
    // The daemon resumes a VMM whose pause failed, to match the inventory's "running".
    let status = lodge_daemon::vmm::request(&socket, ControlRequest::Status {})
        .await
        .unwrap();
    assert_eq!(status.state, RunState::Running);
    // Starting fails: 500.
    daemon.halt();
    daemon.config.vmm_binary = "/nonexistent".into();
    daemon.boot();
    let api = &daemon.api;
    api.action("/v1/vms/c/kill").await;
    api.action("/v1/vms/c/start").await;
    // Importing disk deletion: 409, via a source that is slow to copy.
    let big = daemon.dir.path().join("big.raw");
    std::fs::write(&big, vec![7u8; 256 << 20]).unwrap();
    api.post("/v1/disks", json!({"name": "big", "source": big}))
        .await;
    api.call(Method::DELETE, "/v1/disks/big", None).await;

    if networked {
        // After a restart of the daemon: the bridges are adopted.
        exercise_networks(api).await;
    }

    // Every operation answers 401 on TCP without the token.
    let anonymous = Api::with_endpoint(Endpoint::Tcp {
        address: daemon.tcp.unwrap().to_string(),
        token: None,
    });
    let operations: std::collections::BTreeSet<_> = anonymous
        .openapi
        .documented()
        .into_iter()
        .map(|(m, t, _)| (m, t))
        .collect();
    for (method, template) in operations {
        let path = template.replace("{name}", "x");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        assert_error(
            &anonymous.call(method, &path, None).await,
            401,
            "unauthorized",
        );
    }
    for seen in anonymous.openapi.seen() {
        daemon.api.openapi.record(&seen.0, &seen.1, seen.2);
    }

    let missing: Vec<_> = daemon
        .api
        .openapi
        .documented()
        .difference(&daemon.api.openapi.seen())
        .filter(|(_, path, _)| {
            networked || !(path.contains("network") || path.contains("port-forward"))
        })
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "documented but never produced: {missing:#?}"
    );
}

trait StatusAndText {
    fn status_and_text(self) -> (u16, String);
}

impl StatusAndText for lodge_daemon::client::RawResponse {
    fn status_and_text(self) -> (u16, String) {
        (
            self.status.as_u16(),
            String::from_utf8(self.body.to_vec()).unwrap(),
        )
    }
}

/// Random request bodies (known and unknown keys, values of every JSON type) never get a
/// 500, and every answer matches the OpenAPI document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_never_get_a_server_error() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let daemon = TestDaemon::start();
    let api = &daemon.api;
    api.post("/v1/disks", json!({"name": "d", "size_bytes": 4096}))
        .await;
    api.create_vm(json!({"name": "target"})).await;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z0-9/._-]{0,70}".prop_map(Value::String),
        Just(json!("d")),
        Just(json!("/etc/hostname")),
    ];
    let value = leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("disk|read_only|x", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop_oneof![
        Just("name"),
        Just("cpus"),
        Just("memory_mib"),
        Just("disks"),
        Just("kernel"),
        Just("initrd"),
        Just("cmdline"),
        Just("append"),
        Just("engine"),
        Just("rng"),
        Just("size_bytes"),
        Just("source"),
        Just("bogus"),
    ];
    let body = prop::collection::btree_map(key, value, 0..6)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    let mut runner = TestRunner::deterministic();
    for case in 0..300 {
        let body = body.new_tree(&mut runner).unwrap().current();
        let (method, path) = match case % 3 {
            0 => (Method::POST, "/v1/vms"),
            1 => (Method::PATCH, "/v1/vms/target"),
            _ => (Method::POST, "/v1/disks"),
        };
        let (status, answer) = api.call(method.clone(), path, Some(body.clone())).await;
        assert!(status < 500, "{method} {path} {body} → {status} {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_from_an_image_get_a_root_disk_built_by_the_vmm_binary() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    assert_error(
        &api.post("/v1/vms", json!({"name": "x", "image": "fedora"}))
            .await,
        400,
        "invalid_request",
    );
    // Nothing was left behind by the refused request.
    assert_eq!(api.get("/v1/disks").await.1, json!([]));

    let vm = api
        .create_vm(json!({"name": "web", "image": "debian", "memory_mib": 512}))
        .await;
    assert_eq!(vm["image"], "debian");
    assert_eq!(
        vm["disks"][0],
        json!({"disk": "web-root", "read_only": false})
    );
    let (_, disk) = api.get("/v1/disks/web-root").await;
    assert_eq!(disk["state"], "importing", "{disk}");
    // Not startable before its root disk is ready.
    assert_error(
        &api.action("/v1/vms/web/start").await,
        409,
        "disk_not_ready",
    );
    // A second VM of that name is refused without touching the disk being built.
    assert_error(
        &api.post("/v1/vms", json!({"name": "web", "image": "debian"}))
            .await,
        409,
        "name_taken",
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let disk = loop {
        let (_, disk) = api.get("/v1/disks/web-root").await;
        if disk["state"] != "importing" || Instant::now() > deadline {
            break disk;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(disk["state"], "ready", "{disk}");
    assert_eq!(disk["size_bytes"], 1 << 20);
    assert_eq!(disk["attached_to"], json!(["web"]));

    let (status, vm) = api.action("/v1/vms/web/start").await;
    assert_eq!(status, 202, "{vm}");
    api.wait_booted("web").await;
    let config: Value =
        serde_json::from_slice(&std::fs::read(daemon.paths().vm(1).vmm_config()).unwrap()).unwrap();
    assert_eq!(config["root_disk"], true, "{config}");
    assert!(config["disks"][0]["path"]
        .as_str()
        .unwrap()
        .contains("web-root"));
    assert_eq!(config["disks"][0]["read_only"], false);
    assert!(
        config["append"]
            .as_array()
            .unwrap()
            .contains(&json!("lodge.hostname=web")),
        "{config}"
    );
    api.action("/v1/vms/web/kill").await;
}

/// Every response of the network endpoints, on a daemon with host networking (in the test's
/// own network namespace).
async fn exercise_networks(api: &Api) {
    let (status, network) = api
        .post(
            "/v1/networks",
            json!({"name": "lan", "subnet": "10.77.0.0/24"}),
        )
        .await;
    assert_eq!(status, 201, "{network}");
    assert_eq!(network["gateway"], "10.77.0.1");
    assert_eq!(network["mode"], "nat");
    assert_error(
        &api.post(
            "/v1/networks",
            json!({"name": "lan2", "subnet": "10.77.0.0/16"}),
        )
        .await,
        409,
        "address_conflict",
    );
    assert_error(
        &api.post(
            "/v1/networks",
            json!({"name": "bad", "subnet": "10.77.0.5/24"}),
        )
        .await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.post(
            "/v1/networks",
            json!({"name": "lan", "subnet": "10.78.0.0/24"}),
        )
        .await,
        409,
        "name_taken",
    );
    api.raw(
        Method::POST,
        "/v1/networks",
        Some("application/json"),
        Some(vec![b' '; 1 << 20]),
    )
    .await;
    api.raw(Method::POST, "/v1/networks", None, Some(b"{}".to_vec()))
        .await;
    assert_error(
        &api.get("/v1/networks/nope").await,
        404,
        "network_not_found",
    );
    // The default network exists from the start; a VM without `nics` gets a NIC on it.
    let (status, default) = api.get("/v1/networks/default").await;
    assert_eq!(status, 200, "{default}");
    let vm = api.create_vm(json!({"name": "netvm"})).await;
    assert_eq!(vm["nics"][0]["network"], "default");
    let vm = api
        .create_vm(
            json!({"name": "lanvm", "nics": [{"network": "lan", "mac": "52:54:00:00:00:42"}]}),
        )
        .await;
    assert_eq!(vm["nics"][0]["address"], "10.77.0.2");
    assert_eq!(vm["nics"][0]["mac"], "52:54:00:00:00:42");
    let (_, lan) = api.get("/v1/networks/lan").await;
    assert_eq!(lan["leases"][0]["vm"], "lanvm");
    // Port forwards.
    let (status, vm) = api
        .post(
            "/v1/vms/lanvm/port-forwards",
            json!({"host_port": 8080, "guest_port": 80}),
        )
        .await;
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["port_forwards"][0]["host_port"], 8080);
    assert_error(
        &api.post(
            "/v1/vms/netvm/port-forwards",
            json!({"host_port": 8080, "guest_port": 80}),
        )
        .await,
        409,
        "address_conflict",
    );
    assert_error(
        &api.post(
            "/v1/vms/nope/port-forwards",
            json!({"host_port": 1, "guest_port": 1}),
        )
        .await,
        404,
        "vm_not_found",
    );
    api.create_vm(json!({"name": "nonic", "nics": []})).await;
    assert_error(
        &api.post(
            "/v1/vms/nonic/port-forwards",
            json!({"host_port": 9, "guest_port": 9}),
        )
        .await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.call(Method::DELETE, "/v1/vms/lanvm/port-forwards/9", None)
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &api.call(Method::DELETE, "/v1/vms/nope/port-forwards/9", None)
            .await,
        404,
        "vm_not_found",
    );
    let (status, vm) = api
        .call(Method::DELETE, "/v1/vms/lanvm/port-forwards/8080", None)
        .await;
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["port_forwards"], json!([]));
    // In use, then free.
    assert_error(
        &api.call(Method::DELETE, "/v1/networks/lan", None).await,
        409,
        "network_in_use",
    );
    assert_error(
        &api.call(Method::DELETE, "/v1/networks/nope", None).await,
        404,
        "network_not_found",
    );
    api.call(Method::DELETE, "/v1/vms/lanvm", None).await;
    assert_eq!(
        api.call(Method::DELETE, "/v1/networks/lan", None).await.0,
        204
    );
    api.call(Method::DELETE, "/v1/vms/netvm", None).await;
    api.call(Method::DELETE, "/v1/vms/nonic", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_host_networking_nics_are_refused_clearly() {
    let daemon = TestDaemon::start();
    let api = &daemon.api;
    assert_error(
        &api.post(
            "/v1/networks",
            json!({"name": "lan", "subnet": "10.77.0.0/24"}),
        )
        .await,
        409,
        "host_networking_off",
    );
    assert_error(
        &api.post(
            "/v1/vms",
            json!({"name": "a", "nics": [{"network": "default"}]}),
        )
        .await,
        409,
        "host_networking_off",
    );
    // Without `nics`, no NIC.
    let vm = api.create_vm(json!({"name": "b"})).await;
    assert_eq!(vm["nics"], json!([]));
}
