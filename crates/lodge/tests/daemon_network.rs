//! End to end: the real daemon, in a network namespace of this test's own, gives VMs (the
//! default guest on the software engine) addresses by DHCP on its default NAT network; they
//! ping each other and the host side, move 10 MB intact, reach a server "outside" (a second
//! namespace joined by a veth pair, playing the uplink) through NAT, serve a port forwarded
//! from outside, keep MAC and address across a daemon crash and a VM restart; guests on an
//! isolated network reach each other but not the host. Nothing leaves the two namespaces.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::Host;
use support::netns::{run, Namespace};
use support::{image_dir, is_root};

/// Waits until `vm`'s console shows `text` (the VM may have ended by then).
fn wait_for(host: &Host, vm: &str, text: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let logs = host.ok(&["vm", "logs", vm]);
        if logs.contains(text) {
            return logs;
        }
        if Instant::now() > deadline {
            let all: Vec<String> = ["v1", "v2", "v3", "v4", "i1", "i2"]
                .iter()
                .map(|vm| {
                    let logs = String::from_utf8_lossy(&host.cli(&["vm", "logs", vm]).stdout)
                        .lines()
                        .filter(|line| !line.starts_with('['))
                        .collect::<Vec<_>>()
                        .join("\n");
                    format!("--- {vm}\n{logs}")
                })
                .collect();
            panic!(
                "no '{text}' on the console of {vm}:\n{logs}\n{}\n{}\n{}",
                all.join("\n"),
                host.daemon_log(),
                host.vmm_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn nic(host: &Host, vm: &str) -> (String, String) {
    let vm: Value = host.vm(vm);
    (
        vm["nics"][0]["mac"].as_str().unwrap().to_owned(),
        vm["nics"][0]["address"].as_str().unwrap().to_owned(),
    )
}

/// The guest command prefix: wait for the DHCP address, show it. (Markers the guest prints
/// are split by '' in the command, because the kernel prints its command line too.)
const GOT_ADDRESS: &str = "until ip -4 addr show eth0 | grep -q inet; do sleep 0.3; done; \
    echo a''ddress=$(ip -4 addr show eth0 | awk '/inet /{print $2}'); \
    p() { n=0; until ping -c 1 -W 1 $1 >/dev/null; do n=$((n+1)); [ $n -gt 60 ] && return; sleep 1; done; \
    echo r''eached-$1; }; ";

/// Pings `address` until it answers (peers boot at their own pace), at most a minute, with
/// the shell function `p` of [`GOT_ADDRESS`].
fn ping(address: &str) -> String {
    format!("p {address}; ")
}

#[test]
fn vms_on_lodge_networks_get_addresses_and_reach_what_their_network_allows() {
    let test = "vms_on_lodge_networks_get_addresses_and_reach_what_their_network_allows";
    if !is_root() {
        println!("SKIP {test}: needs root for network namespaces, bridges and taps");
        return;
    }
    image_dir();
    let id = std::process::id();
    let inside = Namespace::new(format!("lodge-dn-{id}"));
    let outside = Namespace::new(format!("lodge-up-{id}"));
    let (veth_in, veth_out) = (
        format!("lodgein{}", id % 100_000),
        format!("lodgeout{}", id % 100_000),
    );
    run(
        "ip",
        &[
            "link", "add", &veth_in, "type", "veth", "peer", "name", &veth_out,
        ],
    );
    run("ip", &["link", "set", &veth_in, "netns", &inside.name]);
    run("ip", &["link", "set", &veth_out, "netns", &outside.name]);
    inside.ip(&["addr", "add", "172.31.0.1/24", "dev", &veth_in]);
    inside.ip(&["link", "set", &veth_in, "up"]);
    inside.ip(&["route", "add", "default", "via", "172.31.0.2"]);
    outside.ip(&["addr", "add", "172.31.0.2/24", "dev", &veth_out]);
    outside.ip(&["link", "set", &veth_out, "up"]);
    let www = tempfile::tempdir().unwrap();
    let token = format!("outside-{id}");
    std::fs::write(www.path().join("index.html"), &token).unwrap();
    let _server = KillOnDrop(
        outside
            .exec(
                "python3",
                &[
                    "-m",
                    "http.server",
                    "8000",
                    "--bind",
                    "172.31.0.2",
                    "--directory",
                ],
            )
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let mut host = Host::in_namespace(Some(&inside.name));
    host.start_daemon();
    let networks: Value = serde_json::from_str(&host.ok(&["network", "list", "--json"])).unwrap();
    assert_eq!(networks[0]["name"], "default", "{networks}");
    assert_eq!(networks[0]["subnet"], "10.44.0.0/24");

    // Four VMs on the default network; addresses are reserved at create.
    for name in ["v1", "v2", "v3", "v4"] {
        host.ok(&[
            "vm", "create", name, "--memory", "192M", "--engine", "emulator",
        ]);
    }
    let addresses: Vec<String> = ["v1", "v2", "v3", "v4"]
        .iter()
        .map(|vm| nic(&host, vm).1)
        .collect();
    assert_eq!(
        addresses,
        ["10.44.0.2", "10.44.0.3", "10.44.0.4", "10.44.0.5"]
    );
    let pings: String = addresses.iter().map(|a| ping(a)).collect();
    let guest_token = format!("guest-{id}");
    let v1 = format!(
        "mkdir -p /tmp/www; echo {guest_token} >/tmp/www/index.html; httpd -p 80 -h /tmp/www; \
         {GOT_ADDRESS}{}{pings}nc -l -p 5000 >/tmp/got; \
         echo r''eceived=$(md5sum </tmp/got) bytes=$(wc -c </tmp/got); \
         echo o''utside=$(wget -q -O - http://172.31.0.2:8000/); sleep 60",
        ping("10.44.0.1")
    );
    let v2 = format!(
        "{GOT_ADDRESS}dd if=/dev/urandom of=/tmp/data bs=1048576 count=10 2>/dev/null; \
         echo s''ent=$(md5sum </tmp/data); {pings}sleep 2; nc 10.44.0.2 5000 </tmp/data; echo s''ender-done; sleep 30"
    );
    // Everyone stays up long enough for the others to reach it.
    let others = format!("{GOT_ADDRESS}{pings}echo p''inged-all; sleep 45");
    for (vm, command) in [("v1", &v1), ("v2", &v2), ("v3", &others), ("v4", &others)] {
        host.ok(&[
            "vm",
            "update",
            vm,
            "--append",
            &format!("guest.cmd=\"{command}\""),
        ]);
    }
    host.ok(&["vm", "port-forward", "add", "v1", "8080:80"]);
    for vm in ["v1", "v2", "v3", "v4"] {
        host.ok(&["vm", "start", vm]);
    }
    let timeout = Duration::from_secs(150);
    for (vm, address) in ["v1", "v2", "v3", "v4"].iter().zip(&addresses) {
        let logs = wait_for(&host, vm, "reached-10.44.0.5", timeout);
        assert!(
            logs.contains(&format!("address={address}/24")),
            "{vm}: {logs}"
        );
        for peer in &addresses {
            assert!(
                logs.contains(&format!("reached-{peer}")),
                "{vm} did not reach {peer}: {logs}"
            );
        }
    }
    let v1_logs = wait_for(&host, "v1", "outside=", timeout);
    assert!(v1_logs.contains("reached-10.44.0.1"), "{v1_logs}");
    let v2_logs = wait_for(&host, "v2", "sender-done", timeout);
    let sent = v2_logs
        .lines()
        .find_map(|l| l.trim().strip_prefix("sent="))
        .unwrap()
        .to_owned();
    let received = v1_logs
        .lines()
        .find_map(|l| l.trim().strip_prefix("received="))
        .unwrap()
        .to_owned();
    assert_eq!(received, format!("{sent} bytes=10485760"));
    // NAT: the guest reached the server outside.
    assert!(v1_logs.contains(&format!("outside={token}")), "{v1_logs}");
    // The port forward: from outside, the host's uplink address reaches v1's httpd.
    let fetched = outside
        .exec(
            "python3",
            &["-c", "import urllib.request;print(urllib.request.urlopen('http://172.31.0.1:8080/', timeout=10).read().decode())"],
        )
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&fetched.stdout).contains(&guest_token),
        "port forward: {}{}",
        String::from_utf8_lossy(&fetched.stdout),
        String::from_utf8_lossy(&fetched.stderr)
    );

    // An isolated network: its guests reach each other, not the host.
    host.ok(&[
        "network",
        "create",
        "iso",
        "--subnet",
        "10.45.0.0/24",
        "--isolated",
    ]);
    for (vm, command) in [
        ("i1", format!("{GOT_ADDRESS}{}ping -c 2 -W 3 10.45.0.1 >/dev/null || echo h''ost-unreachable; echo i''so-done", ping("10.45.0.3"))),
        ("i2", format!("{GOT_ADDRESS}sleep 40")),
    ] {
        host.ok(&[
            "vm", "create", vm, "--memory", "128M", "--engine", "emulator", "--nic", "iso",
            "--append", &format!("guest.cmd=\"{command}\""),
        ]);
    }
    host.ok(&["vm", "start", "i2"]);
    host.ok(&["vm", "start", "i1"]);
    let i1_logs = wait_for(&host, "i1", "iso-done", timeout);
    assert!(i1_logs.contains("reached-10.45.0.3"), "{i1_logs}");
    assert!(i1_logs.contains("host-unreachable"), "{i1_logs}");
    let refused = host.cli(&["network", "delete", "iso"]);
    assert!(!refused.status.success(), "a network in use was deleted");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("used by"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Stable identity across a daemon crash and a VM restart.
    let before = nic(&host, "v3");
    host.kill_daemon();
    host.start_daemon();
    assert_eq!(nic(&host, "v3"), before);
    let leases: Value =
        serde_json::from_str(&host.ok(&["network", "show", "default", "--json"])).unwrap();
    assert_eq!(leases["leases"].as_array().unwrap().len(), 4, "{leases}");
    wait_for(&host, "v3", "pinged-all", timeout);
    host.ok(&["vm", "kill", "v3"]);
    host.ok(&["vm", "start", "v3"]);
    let deadline = Instant::now() + timeout;
    loop {
        let logs = host.ok(&["vm", "logs", "v3"]);
        if logs.matches(&format!("address={}/24", before.1)).count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v3 did not get its address again: {logs}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for vm in ["v1", "v2", "v3", "v4", "i1", "i2"] {
        let _ = host.cli(&["vm", "kill", vm]);
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
