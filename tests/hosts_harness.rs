//! The multi-host harness itself (`tests/common/hosts.rs`): hosts know each other by name, each
//! has its own host name and address, faults can be injected and healed, and everything —
//! processes included — is gone after the harness is dropped, also when a test panics.

mod common;

use common::hosts::Hosts;
use common::jobs::alive;
use std::time::Duration;

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[test]
fn hosts_have_their_own_names_and_addresses_and_reach_each_other() {
    let Some(hosts) = Hosts::new(2) else { return };
    let (code, out, err) = hosts.run(0, "hostname", &[]);
    assert_eq!((code, out.trim()), (0, "host0"), "{err}");
    let (code, out, err) = hosts.run(0, "getent", &["ahostsv4", "host1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&hosts.host(1).addr.to_string()), "{out}");
    let addr = hosts.host(1).addr.to_string();
    let (code, out, err) = hosts.run(0, "ip", &["-4", "addr", "show", "dev", "eth0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&hosts.host(0).addr.to_string()), "{out}");
    let (code, out, err) = hosts.run(0, "ip", &["route", "get", &addr]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dev eth0"), "{out}");

    // Unplugged: host 0's link loses its carrier; replugged: back.
    hosts.unplug(0);
    let (_, out, _) = hosts.run(0, "ip", &["link", "show", "dev", "eth0"]);
    assert!(
        out.contains("LOWERLAYERDOWN") || out.contains("NO-CARRIER"),
        "{out}"
    );
    hosts.replug(0);
    let (_, out, _) = hosts.run(0, "ip", &["link", "show", "dev", "eth0"]);
    assert!(!out.contains("NO-CARRIER"), "{out}");

    if !common::hosts::skip_without("nft") {
        hosts.drop_packets(1, 5);
        let (_, out, _) = hosts.run(0, "nft", &["list", "ruleset"]);
        assert!(out.contains(&format!("ip saddr {addr}")), "{out}");
        hosts.heal(1);
        let (_, out, _) = hosts.run(0, "nft", &["list", "ruleset"]);
        assert!(!out.contains("drop"), "{out}");
    }
    hosts.limit_bandwidth(1, 100);
    let (_, out, _) = hosts.run(1, "tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(out.contains("tbf") && out.contains("100Mbit"), "{out}");
    hosts.heal(1);
    let (_, out, _) = hosts.run(1, "tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!out.contains("tbf"), "{out}");
}

#[test]
fn dropping_the_hosts_kills_their_processes_and_deletes_them_even_on_panic() {
    let mut made = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(hosts) = Hosts::new(2) else { return };
        let sleeper = hosts.start_program(1, "sleep", &["600"]);
        made = Some((hosts.host(1).netns.clone(), sleeper.pid()));
        // The job handle is forgotten: only the hosts' teardown can stop the process.
        std::mem::forget(sleeper);
        panic!("a failing test");
    }));
    let Some((netns, pid)) = made else { return };
    assert!(result.is_err());
    assert!(!netns_exists(&netns), "{netns} is left");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} outlived its host"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
