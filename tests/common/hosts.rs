//! Several hosts on one machine, for tests of multi-host jobs: each host is a network namespace
//! with its own address on a private /24, its own host name and /etc/hosts, all joined by a
//! bridge. Faults are injected per host: unplugging its link, dropping a share of its packets
//! (nftables, on the input hook of each side) and limiting its bandwidth (`tc … tbf`).
//!
//! Names are unique to the test run (process id and a counter), so concurrent runs never
//! collide; dropping [`Hosts`] — also while a test panics — kills every process in the
//! namespaces and deletes the namespaces, links and host files. Leftovers of a run that was
//! killed outright are swept by the next one. Needs root and `ip`; [`Hosts::new`] returns
//! `None` with a message where namespaces cannot be made (with `COCA_REQUIRE_HOSTS=1`, as on
//! CI, that is a failure instead).
//! See `../shared/notes/multi-host-testing.md` and `scripts/hosts.sh` for trying it by hand.

use super::jobs::Job;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Prefix of every namespace this harness makes (`coca-<pid hex>x<n>-h<i>`).
const NETNS_PREFIX: &str = "coca-";
/// Prefix of its bridges (`cb<pid hex>x<n>`) and host-side veths (`cv<pid hex>x<n>h<i>`).
const BRIDGE_PREFIX: &str = "cb";
const VETH_PREFIX: &str = "cv";
/// Name of the nftables table of the packet-loss rules in each host.
const NFT_TABLE: &str = "coca_loss";

/// One host: a network namespace with an address and a host name.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its host name, `host<i>`, known to every host's /etc/hosts.
    pub name: String,
    /// Its address on the hosts' private network.
    pub addr: Ipv4Addr,
    /// The network namespace.
    pub netns: String,
    /// The host-side end of its link (unplugging sets this down).
    veth: String,
}

/// N hosts on a bridge; everything is removed on drop.
pub struct Hosts {
    hosts: Vec<Host>,
    bridge: String,
    subnet: [u8; 3],
}

/// Runs `program args`, returning its output or a message naming the command.
fn command(program: &str, args: &[&str]) -> Result<Output, String> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))
}

/// Runs `program args`; an error carries the command and its stderr.
fn checked(program: &str, args: &[&str]) -> Result<(), String> {
    let out = command(program, args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`checked`], panicking on failure (a fault that cannot be injected fails the test).
fn must(program: &str, args: &[&str]) {
    if let Err(e) = checked(program, args) {
        panic!("{e}");
    }
}

/// Whether `tool` can be run (`tool -V` starts).
pub fn have_tool(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Skips (`true`, with a message) where `tool` is missing, unless CI requires the host tests.
pub fn skip_without(tool: &str) -> bool {
    if have_tool(tool) {
        return false;
    }
    skip(&format!("`{tool}` is not installed"));
    true
}

fn skip(why: &str) {
    let message = format!("skipping the multi-host test: {why}");
    if std::env::var("COCA_REQUIRE_HOSTS").as_deref() == Ok("1") {
        panic!("{message} (COCA_REQUIRE_HOSTS=1)");
    }
    eprintln!("{message}");
}

fn netns_dir(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns)
}

/// The run id a name of this harness carries (`<pid hex>x<n>`), and that pid.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let pid = rest.split('x').next()?;
    u32::from_str_radix(pid, 16).ok()
}

/// Deletes namespaces and bridges of runs whose process is gone (killed before its Drop ran).
fn sweep_stale() {
    let dead = |pid: u32| !PathBuf::from(format!("/proc/{pid}")).exists();
    if let Ok(out) = command("ip", &["netns", "list"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if owner_pid(name, NETNS_PREFIX).is_some_and(dead) {
                remove_netns(name);
            }
        }
    }
    if let Ok(out) = command("ip", &["-o", "link", "show", "type", "bridge"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or_default().trim();
            if owner_pid(name, BRIDGE_PREFIX).is_some_and(dead) {
                let _ = checked("ip", &["link", "del", name]);
            }
        }
    }
}

/// Every process in `netns`.
fn netns_pids(netns: &str) -> Vec<u32> {
    command("ip", &["netns", "pids", netns])
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in `netns` (bounded wait), then deletes it and its host files.
fn remove_netns(netns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = netns_pids(netns);
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                eprintln!("hosts: processes {pids:?} in {netns} outlived SIGKILL");
            }
            break;
        }
        for pid in pids {
            super::jobs::kill(pid, "-9");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = checked("ip", &["netns", "del", netns]);
    let _ = std::fs::remove_dir_all(netns_dir(netns));
}

/// A /24 in 10.200.0.0–10.249.255.0 that no route of this machine uses, picked from the run id.
fn free_subnet(seed: u32) -> [u8; 3] {
    let routes = command("ip", &["-4", "route", "show", "table", "all"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut x = seed.wrapping_mul(2_654_435_761);
    for _ in 0..50 * 256 {
        let subnet = [10, 200 + (x % 50) as u8, (x / 50 % 256) as u8];
        let prefix = format!("{}.{}.{}.", subnet[0], subnet[1], subnet[2]);
        if !routes.contains(&prefix) {
            return subnet;
        }
        x = x.wrapping_add(7919);
    }
    panic!("every /24 of 10.200.0.0/16–10.249.0.0/16 is routed on this machine");
}

impl Hosts {
    /// `n` hosts `host0`…: `None` (after a message) where namespaces cannot be made.
    pub fn new(n: usize) -> Option<Hosts> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        if !have_tool("ip") {
            skip("`ip` (iproute2) is not installed");
            return None;
        }
        sweep_stale();
        let run = format!(
            "{:x}x{:x}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::SeqCst)
        );
        let bridge = format!("{BRIDGE_PREFIX}{run}");
        if let Err(e) = checked("ip", &["link", "add", &bridge, "type", "bridge"]) {
            skip(&format!(
                "cannot make network namespaces and bridges here ({e}); run as root"
            ));
            return None;
        }
        let subnet = free_subnet(std::process::id() ^ (n as u32) << 20);
        let net = |last: u8| Ipv4Addr::new(subnet[0], subnet[1], subnet[2], last);
        let hosts: Vec<Host> = (0..n)
            .map(|i| Host {
                name: format!("host{i}"),
                addr: net(10 + i as u8),
                netns: format!("{NETNS_PREFIX}{run}-h{i}"),
                veth: format!("{VETH_PREFIX}{run}h{i}"),
            })
            .collect();
        // From here on, Drop removes whatever was made.
        let made = Hosts {
            hosts,
            bridge,
            subnet,
        };
        if let Err(e) = made.build() {
            panic!("cannot build the test hosts: {e}");
        }
        eprintln!(
            "hosts: {} on {}.{}.{}.0/24 (bridge {})",
            made.hosts
                .iter()
                .map(|h| format!("{} {}", h.name, h.addr))
                .collect::<Vec<_>>()
                .join(", "),
            subnet[0],
            subnet[1],
            subnet[2],
            made.bridge
        );
        Some(made)
    }

    fn build(&self) -> Result<(), String> {
        let gateway = format!("{}/24", self.gateway());
        checked("ip", &["addr", "add", &gateway, "dev", &self.bridge])?;
        checked("ip", &["link", "set", &self.bridge, "up"])?;
        for host in &self.hosts {
            let ns = host.netns.as_str();
            checked("ip", &["netns", "add", ns])?;
            checked(
                "ip",
                &[
                    "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            checked("ip", &["link", "set", &host.veth, "master", &self.bridge])?;
            checked("ip", &["link", "set", &host.veth, "up"])?;
            let addr = format!("{}/24", host.addr);
            for args in [
                &["addr", "add", &addr, "dev", "eth0"][..],
                &["link", "set", "eth0", "up"],
                &["link", "set", "lo", "up"],
            ] {
                checked("ip", &[&["-n", ns][..], args].concat())?;
            }
            // Like Debian's own: the host's name on 127.0.1.1 first, then every host's address.
            let mut hosts_file = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n", host.name);
            for h in &self.hosts {
                hosts_file.push_str(&format!("{}\t{}\n", h.addr, h.name));
            }
            let dir = netns_dir(ns);
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join("hosts"), hosts_file))
                .and_then(|()| std::fs::write(dir.join("hostname"), format!("{}\n", host.name)))
                .map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// How many hosts there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// The bridge's own address (the machine itself, as seen from the hosts).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    /// A command that runs `program` on host `i`: in its network namespace, with its
    /// /etc/hosts and its host name (`ip netns exec` and `unshare --uts` both exec, so the
    /// child's pid is the program's).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let host = &self.hosts[i];
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.netns, "unshare", "--uts", "sh", "-c"])
            .arg(r#"hostname "$0" && exec "$@""#)
            .arg(&host.name)
            .arg(program);
        c
    }

    /// Runs `program args` on host `i` to the end (bounded by 60 s): (exit code, stdout,
    /// stderr).
    pub fn run(&self, i: usize, program: &str, args: &[&str]) -> (i32, String, String) {
        let mut c = self.command(i, program);
        c.args(args);
        Job::spawn(c).finish(Duration::from_secs(60))
    }

    /// Starts the workspace binary `bin` (e.g. `coca-launch`) on host `i` in the background.
    pub fn start(&self, i: usize, bin: &str, args: &[String], env: &[(&str, &str)]) -> Job {
        let mut c = self.command(i, super::binary(bin));
        c.args(args).envs(env.iter().copied());
        Job::spawn(c)
    }

    /// Starts any `program` on host `i` in the background.
    pub fn start_program(&self, i: usize, program: &str, args: &[&str]) -> Job {
        let mut c = self.command(i, program);
        c.args(args);
        Job::spawn(c)
    }

    /// Every process now running on host `i`.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        netns_pids(&self.hosts[i].netns)
    }

    /// Unplugs host `i`'s link: nothing reaches it or leaves it until [`Self::replug`].
    pub fn unplug(&self, i: usize) {
        must("ip", &["link", "set", &self.hosts[i].veth, "down"]);
    }

    /// Plugs host `i`'s link back in.
    pub fn replug(&self, i: usize) {
        must("ip", &["link", "set", &self.hosts[i].veth, "up"]);
    }

    /// Drops `percent` % of the packets between host `i` and every other host, each way, at
    /// random (nftables on the receiving side's input hook: a sender never sees an error, as
    /// with real loss). Needs `nft`.
    pub fn drop_packets(&self, i: usize, percent: u32) {
        let subnet = format!(
            "{}.{}.{}.0/24",
            self.subnet[0], self.subnet[1], self.subnet[2]
        );
        for (j, host) in self.hosts.iter().enumerate() {
            let from = if j == i {
                subnet.clone()
            } else {
                self.hosts[i].addr.to_string()
            };
            let ns = ["netns", "exec", host.netns.as_str(), "nft"];
            must(
                "ip",
                &[&ns[..], &["add", "table", "inet", NFT_TABLE]].concat(),
            );
            let chain = "{ type filter hook input priority 0; }";
            must(
                "ip",
                &[&ns[..], &["add", "chain", "inet", NFT_TABLE, "in", chain]].concat(),
            );
            let rule = format!("ip saddr {from} numgen random mod 100 < {percent} drop");
            let rule: Vec<&str> = rule.split(' ').collect();
            must(
                "ip",
                &[
                    &ns[..],
                    &["add", "rule", "inet", NFT_TABLE, "in"],
                    &rule[..],
                ]
                .concat(),
            );
        }
    }

    /// Limits host `i`'s link to `mbit` Mbit/s each way (`tc … tbf` on both ends of it).
    pub fn limit_bandwidth(&self, i: usize, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", "32kbit", "latency", "400ms",
        ];
        let host = &self.hosts[i];
        must(
            "tc",
            &[&["qdisc", "add", "dev", &host.veth][..], &tbf].concat(),
        );
        must(
            "ip",
            &[
                &[
                    "netns",
                    "exec",
                    &host.netns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                ][..],
                &tbf,
            ]
            .concat(),
        );
    }

    /// Removes host `i`'s packet loss and bandwidth limit (each where there is one).
    pub fn heal(&self, i: usize) {
        let host = &self.hosts[i];
        let _ = checked("tc", &["qdisc", "del", "dev", &host.veth, "root"]);
        let ns = ["netns", "exec", host.netns.as_str()];
        let _ = checked(
            "ip",
            &[&ns[..], &["tc", "qdisc", "del", "dev", "eth0", "root"]].concat(),
        );
        for h in &self.hosts {
            let ns = ["netns", "exec", h.netns.as_str()];
            let _ = checked(
                "ip",
                &[&ns[..], &["nft", "delete", "table", "inet", NFT_TABLE]].concat(),
            );
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in &self.hosts {
            // The veth pair goes at once; the namespace's own cleanup is asynchronous.
            let _ = checked("ip", &["link", "del", &host.veth]);
            remove_netns(&host.netns);
        }
        let _ = checked("ip", &["link", "del", &self.bridge]);
    }
}
