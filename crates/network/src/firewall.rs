//! nftables rules of lodge networks, all in the table `inet lodge`, which lodge alone owns:
//! each update replaces that table in one transaction, and nothing else is ever touched.
//!
//! - NAT networks: traffic from the subnet to elsewhere is masqueraded, forwarded out and its
//!   replies back in; nothing else enters the bridge from outside, apart from port forwards
//!   (DNAT of host TCP ports to a guest).
//! - Isolated networks: nothing is forwarded to or from the bridge, and the host accepts only
//!   DHCP from it: guests reach each other and nothing else.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use crate::Ipv4Subnet;

/// The table lodge's rules live in.
pub const TABLE: &str = "lodge";

/// Errors applying rules.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("The generated rules do not fit the nftables schema")]
    Schema(#[source] serde_json::Error),
    #[error("nft refused lodge's rules")]
    Apply(#[source] nftables::helper::NftablesError),
    #[error("Cannot enable IPv4 forwarding")]
    Forwarding(#[source] std::io::Error),
}

/// How a network reaches beyond its bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Nat,
    Isolated,
}

/// One network's part of the rules.
#[derive(Debug, Clone)]
pub struct NetworkRules {
    pub bridge: String,
    pub subnet: Ipv4Subnet,
    pub reach: Reach,
    /// TCP port forwards: host port → (guest address, guest port).
    pub forwards: Vec<(u16, Ipv4Addr, u16)>,
}

/// Replaces lodge's table with the rules of `networks` (an empty list removes the table),
/// and turns IPv4 forwarding on when a NAT network needs it.
pub fn apply(networks: &[NetworkRules]) -> Result<(), FirewallError> {
    let ruleset: nftables::schema::Nftables =
        serde_json::from_value(ruleset(networks)).map_err(FirewallError::Schema)?;
    nftables::helper::apply_ruleset(&ruleset).map_err(FirewallError::Apply)?;
    if networks.iter().any(|n| n.reach == Reach::Nat) {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(FirewallError::Forwarding)?;
    }
    Ok(())
}

/// The libnftables JSON of the whole table.
pub fn ruleset(networks: &[NetworkRules]) -> Value {
    let table = json!({"family": "inet", "name": TABLE});
    // Adding first makes the delete succeed when the table does not exist yet.
    let mut commands = vec![
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
    ];
    if networks.is_empty() {
        return json!({ "nftables": commands });
    }
    commands.push(json!({"add": {"table": table}}));
    for (name, kind, hook, priority) in [
        ("forward", "filter", "forward", 0),
        ("input", "filter", "input", 0),
        ("prerouting", "nat", "prerouting", -100),
        ("postrouting", "nat", "postrouting", 100),
    ] {
        commands.push(json!({"add": {"chain": {
            "family": "inet", "table": TABLE, "name": name,
            "type": kind, "hook": hook, "prio": priority, "policy": "accept"
        }}}));
    }
    let rule = |chain: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}});
    for network in networks {
        let bridge = network.bridge.as_str();
        let subnet = json!({"prefix": {"addr": network.subnet.network().to_string(), "len": network.subnet.prefix()}});
        match network.reach {
            Reach::Nat => {
                commands.push(rule(
                    "postrouting",
                    vec![
                        matches(
                            "==",
                            json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                            subnet.clone(),
                        ),
                        matches(
                            "!=",
                            json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                            subnet.clone(),
                        ),
                        json!({"masquerade": null}),
                    ],
                ));
                commands.push(rule(
                    "forward",
                    vec![interface("iifname", "==", bridge), json!({"accept": null})],
                ));
                commands.push(rule(
                    "forward",
                    vec![
                        interface("oifname", "==", bridge),
                        matches(
                            "in",
                            json!({"ct": {"key": "state"}}),
                            json!(["established", "related"]),
                        ),
                        json!({"accept": null}),
                    ],
                ));
                commands.push(rule(
                    "forward",
                    vec![
                        interface("oifname", "==", bridge),
                        matches("in", json!({"ct": {"key": "status"}}), json!("dnat")),
                        json!({"accept": null}),
                    ],
                ));
                commands.push(rule("forward", drop_crossing(bridge, "oifname", "iifname")));
                for (host_port, address, guest_port) in &network.forwards {
                    commands.push(rule("prerouting", vec![
                        matches("==", json!({"fib": {"result": "type", "flags": ["daddr"]}}), json!("local")),
                        matches("==", json!({"payload": {"protocol": "tcp", "field": "dport"}}), json!(host_port)),
                        json!({"dnat": {"family": "ip", "addr": address.to_string(), "port": guest_port}}),
                    ]));
                }
            }
            Reach::Isolated => {
                commands.push(rule("forward", drop_crossing(bridge, "iifname", "oifname")));
                commands.push(rule("forward", drop_crossing(bridge, "oifname", "iifname")));
                commands.push(rule(
                    "input",
                    vec![
                        interface("iifname", "==", bridge),
                        matches(
                            "==",
                            json!({"payload": {"protocol": "udp", "field": "dport"}}),
                            json!(67),
                        ),
                        json!({"accept": null}),
                    ],
                ));
                commands.push(rule(
                    "input",
                    vec![interface("iifname", "==", bridge), json!({"drop": null})],
                ));
            }
        }
    }
    json!({ "nftables": commands })
}

/// Drops traffic whose `side` interface is the bridge and whose `other` is not: what crosses
/// the bridge's edge. (With br_netfilter, traffic between guests on the bridge passes the
/// forward hook too, with both sides the bridge.)
fn drop_crossing(bridge: &str, side: &str, other: &str) -> Vec<Value> {
    vec![
        interface(side, "==", bridge),
        interface(other, "!=", bridge),
        json!({"drop": null}),
    ]
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn interface(key: &str, op: &str, name: &str) -> Value {
    matches(op, json!({"meta": {"key": key}}), json!(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn networks() -> Vec<NetworkRules> {
        vec![
            NetworkRules {
                bridge: "lodgebr1".into(),
                subnet: "10.9.0.0/24".parse().unwrap(),
                reach: Reach::Nat,
                forwards: vec![(8080, Ipv4Addr::new(10, 9, 0, 5), 80)],
            },
            NetworkRules {
                bridge: "lodgebr2".into(),
                subnet: "10.8.0.0/24".parse().unwrap(),
                reach: Reach::Isolated,
                forwards: Vec::new(),
            },
        ]
    }

    #[test]
    fn rules_fit_the_nftables_schema() {
        let value = ruleset(&networks());
        let parsed: nftables::schema::Nftables = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap()["nftables"]
                .as_array()
                .unwrap()
                .len(),
            value["nftables"].as_array().unwrap().len()
        );
        let text = value.to_string();
        assert!(
            text.contains("masquerade") && text.contains("\"dnat\""),
            "{text}"
        );
        // Only lodge's own table is named.
        for command in value["nftables"].as_array().unwrap() {
            let body = command.as_object().unwrap().values().next().unwrap();
            let object = body.as_object().unwrap().values().next().unwrap();
            let table = object.get("table").or_else(|| object.get("name")).unwrap();
            assert!(
                table == TABLE || object.get("table") == Some(&json!(TABLE)),
                "{command}"
            );
        }
    }

    #[test]
    fn no_networks_removes_the_table() {
        let value = ruleset(&[]);
        assert_eq!(value["nftables"].as_array().unwrap().len(), 2);
        assert!(value["nftables"][1]["delete"]["table"]["name"] == TABLE);
    }
}
