//! Bridges, taps and nftables rules for real, in a network namespace of this test's own
//! (unshared by the test thread, so the host's network is never touched). Needs root.

use std::process::Command;

use lodge_network::firewall::{self, NetworkRules, Reach};
use lodge_network::links::{self, Links};
use lodge_network::Ipv4Subnet;

/// Moves this thread into a new network namespace; false (with the reason printed) if not
/// possible.
fn private_network(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {test}: needs root for a network namespace");
        return false;
    }
    // SAFETY: unshare(2) affects only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!(
            "SKIP {test}: unshare(CLONE_NEWNET) failed: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}

fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn nft_list() -> String {
    let output = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn bridges_taps_and_rules_in_a_private_namespace() {
    let test = "bridges_taps_and_rules_in_a_private_namespace";
    if !private_network(test) {
        return;
    }
    // A runtime whose threads start after the unshare, so they share the namespace.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let links = Links::connect().unwrap();
        let subnet: Ipv4Subnet = "10.66.0.0/24".parse().unwrap();
        links
            .ensure_bridge("lodgebr7", "lodge:test", &subnet)
            .await
            .unwrap();
        // Idempotent, and it adopts only its own bridge.
        links
            .ensure_bridge("lodgebr7", "lodge:test", &subnet)
            .await
            .unwrap();
        let shown = ip(&["-d", "addr", "show", "lodgebr7"]);
        assert!(shown.contains("inet 10.66.0.1/24"), "{shown}");
        assert!(shown.contains("bridge"), "{shown}");
        assert!(matches!(
            links
                .ensure_bridge("lodgebr7", "lodge:other", &subnet)
                .await,
            Err(links::LinkError::NameTaken(_))
        ));

        let tap = links::open_tap("lodgetap7").unwrap();
        links.attach("lodgetap7", "lodgebr7").await.unwrap();
        let shown = ip(&["link", "show", "lodgetap7"]);
        assert!(shown.contains("master lodgebr7"), "{shown}");
        drop(tap);
        assert!(
            links.find("lodgetap7").await.unwrap().is_none(),
            "the tap goes with its fd"
        );

        let routes = links::host_routes(&[]);
        assert!(
            routes
                .iter()
                .any(|(interface, destination, prefix)| interface == "lodgebr7"
                    && destination.to_string() == "10.66.0.0"
                    && *prefix == 24),
            "{routes:?}"
        );

        // Another table is left alone.
        Command::new("nft")
            .args(["add", "table", "inet", "other"])
            .status()
            .unwrap();
        firewall::apply(&[NetworkRules {
            bridge: "lodgebr7".into(),
            subnet,
            reach: Reach::Nat,
            forwards: vec![(8080, "10.66.0.5".parse().unwrap(), 80)],
        }])
        .unwrap();
        let rules = nft_list();
        assert!(rules.contains("table inet lodge"), "{rules}");
        assert!(rules.contains("masquerade"), "{rules}");
        assert!(rules.contains("dnat ip to 10.66.0.5:80"), "{rules}");
        firewall::apply(&[NetworkRules {
            bridge: "lodgebr7".into(),
            subnet,
            reach: Reach::Isolated,
            forwards: Vec::new(),
        }])
        .unwrap();
        let rules = nft_list();
        assert!(
            !rules.contains("masquerade"),
            "replaced, not added: {rules}"
        );
        firewall::apply(&[]).unwrap();
        let rules = nft_list();
        assert!(!rules.contains("table inet lodge"), "{rules}");
        assert!(rules.contains("table inet other"), "{rules}");

        links.delete_bridge("lodgebr7", "lodge:test").await.unwrap();
        assert!(links.find("lodgebr7").await.unwrap().is_none());
    });
}
