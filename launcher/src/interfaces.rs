//! This host's network interfaces and their addresses (`getifaddrs`), and the selection of
//! `COCA_SOCKET_IFNAME` (NCCL_SOCKET_IFNAME's syntax).

use anyhow::{bail, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// The interface's name (`eth0`, `ib0`, `lo`).
    pub name: String,
    /// One of its addresses.
    pub ip: IpAddr,
    /// The interface is administratively up.
    pub up: bool,
    /// The loopback interface.
    pub loopback: bool,
}

/// Every IPv4 and IPv6 address of every interface, in the system's order.
pub fn list() -> Result<Vec<InterfaceAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!(
            "cannot list this host's network interfaces: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cur };
        cur = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        let ip = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sa = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let flags = entry.ifa_flags;
        out.push(InterfaceAddr {
            name,
            ip,
            up: flags & libc::IFF_UP as u32 != 0,
            loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// `eth0 10.0.0.2, lo 127.0.0.1`: for error messages.
pub fn describe(all: &[InterfaceAddr]) -> String {
    if all.is_empty() {
        return "none".to_string();
    }
    all.iter()
        .map(|a| format!("{} {}", a.name, a.ip))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `name` matches the `COCA_SOCKET_IFNAME` spec: comma-separated name prefixes
/// (`eth,ib`), exact names after `=` (`=eth0`), and either of those after `^` to exclude
/// (`^docker,lo`).
pub fn name_matches(spec: &str, name: &str) -> bool {
    let (exclude, spec) = match spec.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, spec),
    };
    let (exact, spec) = match spec.strip_prefix('=') {
        Some(rest) => (true, rest),
        None => (false, spec),
    };
    let listed = spec
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .any(|p| {
            if exact {
                name == p
            } else {
                name.starts_with(p)
            }
        });
    listed != exclude
}

/// The address `COCA_SOCKET_IFNAME=spec` selects: the first up interface it matches (loopback
/// only when named, not when merely not excluded), IPv4 before IPv6 (link-local IPv6 never).
pub fn select(spec: &str, all: &[InterfaceAddr]) -> Result<InterfaceAddr> {
    let named_loopback = !spec.starts_with('^');
    let usable = |a: &&InterfaceAddr| {
        a.up && name_matches(spec, &a.name)
            && (!a.loopback || named_loopback)
            && !matches!(a.ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
    };
    all.iter()
        .filter(usable)
        .find(|a| a.ip.is_ipv4())
        .or_else(|| all.iter().find(usable))
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "COCA_SOCKET_IFNAME={spec:?} matches no up interface with an address (this \
                 host has: {})",
                describe(all)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(name: &str, ip: &str, loopback: bool) -> InterfaceAddr {
        InterfaceAddr {
            name: name.into(),
            ip: ip.parse().unwrap(),
            up: true,
            loopback,
        }
    }

    #[test]
    fn socket_ifname_syntax() {
        assert!(name_matches("eth", "eth0"));
        assert!(name_matches("ib,eth", "eth1"));
        assert!(!name_matches("=eth", "eth0"));
        assert!(name_matches("=eth0", "eth0"));
        assert!(!name_matches("^eth", "eth0"));
        assert!(name_matches("^docker,lo", "ens5"));
        assert!(!name_matches("^=ens5", "ens5"));
    }

    #[test]
    fn selection_prefers_ipv4_and_skips_loopback_unless_named() {
        let all = [
            addr("lo", "127.0.0.1", true),
            addr("eth0", "fe80::1", false),
            addr("eth0", "2001:db8::5", false),
            addr("eth0", "10.1.2.3", false),
            addr("ib0", "10.9.0.3", false),
        ];
        assert_eq!(select("eth", &all).unwrap().ip.to_string(), "10.1.2.3");
        assert_eq!(select("^eth", &all).unwrap().name, "ib0");
        assert_eq!(select("lo", &all).unwrap().ip.to_string(), "127.0.0.1");
        let e = select("wlan", &all).unwrap_err().to_string();
        assert!(e.contains("wlan") && e.contains("eth0 10.1.2.3"), "{e}");
    }

    #[test]
    fn this_host_has_a_loopback_address() {
        let all = list().unwrap();
        assert!(
            all.iter().any(|a| a.loopback && a.ip.is_loopback()),
            "{all:?}"
        );
    }
}
