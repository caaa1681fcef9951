//! Where node 0's control plane is, and which address this node gives its peers: `--master-addr`
//! resolved with bounded retries, then `--local-addr`, `COCA_SOCKET_IFNAME`, or the address of
//! the interface that reaches the master — never loopback when a peer may be on another host.

use crate::args::{LauncherArgs, NodeLayout, DEFAULT_MASTER_PORT};
use crate::interfaces::{self, InterfaceAddr};
use anyhow::{bail, Context, Result};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

/// The longest `--master-addr` resolution is retried (less when `--rdzv-timeout` is shorter).
pub const RESOLVE_LIMIT: Duration = Duration::from_secs(30);
/// Pause after the first failed resolution; doubled after each, up to [`RESOLVE_MAX_PAUSE`].
const RESOLVE_FIRST_PAUSE: Duration = Duration::from_millis(250);
const RESOLVE_MAX_PAUSE: Duration = Duration::from_secs(4);
/// A documentation address (TEST-NET-1): the route towards it is the default route.
const DEFAULT_ROUTE_PROBE: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 1), 9);

/// `host:port` as a socket address (the first IPv4 one when there are several), retrying a
/// failed look-up (DNS may lag behind a new node) until `limit`, with growing pauses.
pub fn resolve_master(host: &str, port: u16, limit: Duration) -> Result<SocketAddr> {
    let start = Instant::now();
    let mut pause = RESOLVE_FIRST_PAUSE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                match addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) {
                    Some(a) => return Ok(*a),
                    None => "it has no address".to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!(
                "--master-addr {host:?} does not resolve ({error}; {attempts} attempt(s) in {:.1} s)",
                start.elapsed().as_secs_f64()
            );
        }
        tracing::warn!("cannot resolve --master-addr {host:?} ({error}); retrying");
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(RESOLVE_MAX_PAUSE);
    }
}

/// The address this node advertises, and how it was chosen (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// Peers connect to this address (the ring's listeners bind it).
    pub ip: IpAddr,
    /// Why this one: the flag, the interface, the route.
    pub how: String,
}

/// What decides the advertised address.
pub struct AdvertiseInput<'a> {
    /// `--local-addr`, as given.
    pub local_addr: Option<&'a str>,
    /// `--socket-ifname` / `COCA_SOCKET_IFNAME`.
    pub socket_ifname: Option<&'a str>,
    /// `--master-addr` as given, and what it resolved to (`None`: a standalone job).
    pub master: Option<(&'a str, SocketAddr)>,
}

/// Chooses the advertised address: `--local-addr` (which must be an address of this host),
/// else `COCA_SOCKET_IFNAME`'s interface, else the interface that reaches the master. When
/// that route is loopback because `--master-addr` names this host (Debian maps a host's own
/// name to 127.0.1.1), the address of the default route's interface — or of the first other
/// interface — is used instead, since the peers on other hosts cannot reach loopback; only a
/// `--master-addr` that is itself loopback (`127.0.0.1`, `localhost`: every node on this
/// machine) or a host with no other interface keeps it.
pub fn advertise(input: &AdvertiseInput) -> Result<Advertised> {
    let all = interfaces::list()?;
    if let Some(given) = input.local_addr {
        let ip: IpAddr = given
            .trim()
            .parse()
            .with_context(|| format!("--local-addr {given:?} is not an IP address"))?;
        if ip.is_unspecified() {
            bail!("--local-addr {ip} is not an address peers can connect to; give this host's own");
        }
        let Some(iface) = all.iter().find(|a| a.ip == ip) else {
            bail!(
                "--local-addr {ip} is not an address of any interface of this host (it has: {})",
                interfaces::describe(&all)
            );
        };
        return Ok(Advertised {
            ip,
            how: format!("--local-addr, interface {}", iface.name),
        });
    }
    if let Some(spec) = input.socket_ifname {
        let chosen = interfaces::select(spec, &all)?;
        return Ok(Advertised {
            ip: chosen.ip,
            how: format!("COCA_SOCKET_IFNAME={spec}: interface {}", chosen.name),
        });
    }
    let Some((given, master)) = input.master else {
        return Ok(Advertised {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            how: "standalone: loopback".to_string(),
        });
    };
    let ip = local_ip_towards(master)
        .with_context(|| format!("--master-addr {given:?} ({master}) is not reachable"))?;
    let name_of = |ip: IpAddr| {
        all.iter()
            .find(|a| a.ip == ip)
            .map_or_else(|| "?".to_string(), |a| a.name.clone())
    };
    if !ip.is_loopback() {
        return Ok(Advertised {
            ip,
            how: format!("interface {} reaches the master", name_of(ip)),
        });
    }
    if declares_loopback(given) {
        return Ok(Advertised {
            ip,
            how: "--master-addr is loopback: every node runs on this machine".to_string(),
        });
    }
    match outward_address(&all) {
        Some(out) => Ok(Advertised {
            ip: out.ip,
            how: format!(
                "--master-addr {given:?} is this host ({master}), and peers on other hosts \
                 cannot reach loopback: interface {}",
                out.name
            ),
        }),
        None => {
            tracing::warn!(
                "--master-addr {given:?} resolves to loopback ({master}) and this host has no \
                 other interface: only nodes on this machine can reach this one"
            );
            Ok(Advertised {
                ip,
                how: "loopback: no other interface".to_string(),
            })
        }
    }
}

/// Resolves `--master-addr` (multi-node jobs) and chooses the address this node advertises;
/// logs both.
pub fn for_node(args: &LauncherArgs, layout: &NodeLayout) -> Result<(Option<SocketAddr>, IpAddr)> {
    let master = if layout.standalone {
        None
    } else {
        let port = layout.master_port.unwrap_or(DEFAULT_MASTER_PORT);
        let addr = resolve_master(&layout.master_addr, port, args.resolve_limit())?;
        Some(addr)
    };
    let advertised = advertise(&AdvertiseInput {
        local_addr: args.local_addr.as_deref(),
        socket_ifname: args.socket_ifname.as_deref(),
        master: master.map(|m| (layout.master_addr.as_str(), m)),
    })?;
    match master {
        Some(m) => tracing::info!(
            "master {:?} is {m}; node {} advertises {} ({})",
            layout.master_addr,
            layout.node_rank,
            advertised.ip,
            advertised.how
        ),
        None => tracing::debug!("advertising {} ({})", advertised.ip, advertised.how),
    }
    Ok((master, advertised.ip))
}

/// `127.x.y.z`, `::1`, `localhost`: the user says every node is on this machine.
fn declares_loopback(given: &str) -> bool {
    let given = given.trim();
    match given.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let lower = given.to_ascii_lowercase();
            lower == "localhost" || lower.ends_with(".localhost")
        }
    }
}

/// The default route's interface address, else the first up, non-loopback IPv4 address.
fn outward_address(all: &[InterfaceAddr]) -> Option<InterfaceAddr> {
    let by_route = local_ip_towards(SocketAddr::from(DEFAULT_ROUTE_PROBE))
        .ok()
        .filter(|ip| !ip.is_loopback());
    by_route
        .and_then(|ip| all.iter().find(|a| a.ip == ip))
        .or_else(|| {
            all.iter()
                .find(|a| a.up && !a.loopback && a.ip.is_ipv4() && !a.ip.is_loopback())
        })
        .cloned()
}

/// The local address the kernel would use to reach `target` (no packet is sent).
fn local_ip_towards(target: SocketAddr) -> Result<IpAddr> {
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).context("cannot open a UDP socket")?;
    socket
        .connect(target)
        .with_context(|| format!("no route to {target}"))?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_resolves_at_once_and_a_bad_name_within_the_limit() {
        let a = resolve_master("127.0.0.1", 29500, Duration::ZERO).unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:29500");
        let start = Instant::now();
        let e = resolve_master("no-such-host.invalid", 1, Duration::from_millis(600))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(20));
        assert!(
            e.contains("no-such-host.invalid") && e.contains("attempt"),
            "{e}"
        );
    }

    #[test]
    fn loopback_is_kept_only_when_the_master_is_declared_loopback() {
        assert!(declares_loopback("127.0.0.1") && declares_loopback("LOCALHOST"));
        assert!(declares_loopback("::1") && !declares_loopback("node0"));
        let master = "127.0.0.1:29500".parse().unwrap();
        let input = AdvertiseInput {
            local_addr: None,
            socket_ifname: None,
            master: Some(("127.0.0.1", master)),
        };
        assert!(advertise(&input).unwrap().ip.is_loopback());
        // A host name that resolves to loopback here: another interface where there is one.
        let input = AdvertiseInput {
            master: Some(("node0", master)),
            ..input
        };
        let chosen = advertise(&input).unwrap();
        let has_other = interfaces::list()
            .unwrap()
            .iter()
            .any(|a| a.up && !a.loopback && a.ip.is_ipv4());
        assert_eq!(!chosen.ip.is_loopback(), has_other, "{chosen:?}");
    }

    #[test]
    fn a_local_addr_must_be_on_an_interface() {
        let input = |local| AdvertiseInput {
            local_addr: Some(local),
            socket_ifname: None,
            master: None,
        };
        assert_eq!(
            advertise(&input("127.0.0.1")).unwrap().ip.to_string(),
            "127.0.0.1"
        );
        let e = advertise(&input("192.0.2.77")).unwrap_err().to_string();
        assert!(
            e.contains("--local-addr 192.0.2.77") && e.contains("lo 127.0.0.1"),
            "{e}"
        );
        assert!(advertise(&input("not-an-ip")).is_err());
        assert!(advertise(&input("0.0.0.0")).is_err());
    }
}
