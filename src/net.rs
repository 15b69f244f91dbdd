//! Choosing the address a rank advertises to its peers.
//!
//! Peers connect to whatever a rank publishes at rendezvous, so the address
//! must be reachable from the other hosts: never loopback when the job spans
//! hosts. `KOLO_IFACE` overrides the choice with NCCL's `NCCL_SOCKET_IFNAME`
//! syntax; otherwise the address the kernel routes toward the master is used.
use crate::config::Config;
use crate::error::{Error, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};

/// The IP this rank listens on and advertises. Never loopback when the master is remote.
pub fn advertise_ip(cfg: &Config) -> Result<IpAddr> {
    choose_ip(cfg)
}

/// [`advertise_ip`] and a description of the choice for the startup log:
/// the interface that holds the address and why it was taken, e.g.
/// `10.0.0.5 on eth0 (route to the master 10.0.0.1)`.
///
/// ```
/// let cfg = kolo::Config::local(0, 2, 29500);
/// let (ip, how) = kolo::net::advertise(&cfg)?;
/// assert!(ip.is_loopback() && how.contains("master is loopback"), "{how}");
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn advertise(cfg: &Config) -> Result<(IpAddr, String)> {
    let ip = choose_ip(cfg)?;
    let why = match cfg.iface.as_deref().map(str::trim) {
        Some(p) => format!("KOLO_IFACE={p}"),
        None if ip.is_loopback() => "master is loopback: single-host job".to_string(),
        None => match resolve(&cfg.master_addr, cfg.master_port) {
            Ok(m) if local_ip_toward(m.ip()).ok() == Some(ip) => {
                format!("route to the master {}", m.ip())
            }
            _ => "first non-loopback interface".to_string(),
        },
    };
    let name = interfaces()
        .ok()
        .and_then(|ifs| ifs.into_iter().find(|(_, a)| *a == ip).map(|(n, _)| n))
        .unwrap_or_else(|| "?".into());
    Ok((ip, format!("{ip} on {name} ({why})")))
}

fn choose_ip(cfg: &Config) -> Result<IpAddr> {
    let master = resolve(&cfg.master_addr, cfg.master_port)?.ip();
    let master_local = master.is_loopback();
    if let Some(pattern) = cfg.iface.as_deref() {
        let pattern = pattern.trim();
        // KOLO_IFACE may also name an address outright.
        if let Ok(ip) = pattern.parse::<IpAddr>() {
            if ip.is_loopback() && !master_local {
                return Err(Error::Config(format!(
                    "KOLO_IFACE={pattern} is a loopback address but the master {} ({master}) is not: \
                     peers on other hosts could not reach this rank",
                    cfg.master_addr
                )));
            }
            return Ok(ip);
        }
        return match_iface(pattern, &interfaces()?, master_local);
    }
    if master_local {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Ok(ip) = local_ip_toward(master) {
        if !ip.is_loopback() && !ip.is_unspecified() {
            return Ok(ip);
        }
    }
    // No route, or the route is loopback (the master name is one of our own
    // addresses on a host with odd routing): take the first real interface.
    let ifs = interfaces()?;
    first_non_loopback(&ifs).ok_or_else(|| {
        Error::Config(format!(
            "no non-loopback interface to advertise to reach the master {} ({master}); interfaces: {}",
            cfg.master_addr,
            describe(&ifs)
        ))
    })
}

/// Resolve `host` (a name, an IPv4 address, or an IPv6 address with or
/// without brackets) and `port` to one socket address, preferring IPv4.
///
/// ```
/// let a = kolo::net::resolve("127.0.0.1", 29500)?;
/// assert_eq!(a.to_string(), "127.0.0.1:29500");
/// let b = kolo::net::resolve("[::1]", 1)?;
/// assert!(b.ip().is_loopback());
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let h = host.trim();
    let h = h
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(h);
    let addrs: Vec<SocketAddr> = (h, port)
        .to_socket_addrs()
        .map_err(|e| Error::Io(format!("cannot resolve {host:?}: {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| Error::Io(format!("{host:?} resolved to no address")))
}

/// The local address the kernel would use to send to `dest`.
///
/// Connects a UDP socket (which sends no packet) and reads its local address.
/// `kolorun` uses it to find the address remote hosts should reach it at.
pub fn local_ip_toward(dest: IpAddr) -> Result<IpAddr> {
    let bind: SocketAddr = match dest {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind)
        .map_err(|e| Error::Io(format!("UDP socket to find a route to {dest}: {e}")))?;
    // Port 9 (discard): any non-zero port works; connect() only consults routing.
    sock.connect(SocketAddr::new(dest, 9))
        .map_err(|e| Error::Io(format!("no route to {dest}: {e}")))?;
    sock.local_addr()
        .map(|a| a.ip())
        .map_err(|e| Error::Io(format!("local address toward {dest}: {e}")))
}

/// This host's interfaces as (name, address) pairs, in the order the OS lists them.
pub fn interfaces() -> Result<Vec<(String, IpAddr)>> {
    let ifs = if_addrs::get_if_addrs()
        .map_err(|e| Error::Io(format!("cannot list network interfaces: {e}")))?;
    Ok(ifs.into_iter().map(|i| (i.name.clone(), i.ip())).collect())
}

fn describe(ifs: &[(String, IpAddr)]) -> String {
    if ifs.is_empty() {
        return "none".into();
    }
    ifs.iter()
        .map(|(n, ip)| format!("{n}={ip}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// IPv6 link-local addresses need a scope id peers cannot know; never advertise them.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

fn first_non_loopback(ifs: &[(String, IpAddr)]) -> Option<IpAddr> {
    let ok = |ip: &IpAddr| usable(ip) && !ip.is_loopback();
    let v4 = ifs
        .iter()
        .map(|(_, ip)| *ip)
        .find(|ip| ip.is_ipv4() && ok(ip));
    v4.or_else(|| ifs.iter().map(|(_, ip)| *ip).find(ok))
}

/// Pick an address from `ifs` by an NCCL-style interface pattern.
///
/// The pattern is a comma-separated list of name prefixes (`eth,ib`); a
/// leading `^` excludes the listed prefixes instead (`^lo,docker`); a leading
/// `=` (after `^`, if any) makes the names exact (`=eth0`, `^=docker0`). The
/// first matching interface with an IPv4 address wins, else the first with a
/// (non-link-local) IPv6 address. Loopback addresses count only when
/// `allow_loopback` (the master is itself loopback). The error names the
/// pattern and lists the interfaces that were available.
///
/// ```
/// use kolo::net::match_iface;
/// let ifs = vec![
///     ("lo".to_string(), "127.0.0.1".parse().unwrap()),
///     ("eth0".to_string(), "10.0.0.5".parse().unwrap()),
/// ];
/// assert_eq!(match_iface("eth", &ifs, false)?.to_string(), "10.0.0.5");
/// assert_eq!(match_iface("^lo", &ifs, false)?.to_string(), "10.0.0.5");
/// assert!(match_iface("ib", &ifs, false).is_err());
/// # Ok::<(), kolo::Error>(())
/// ```
pub fn match_iface(
    pattern: &str,
    ifs: &[(String, IpAddr)],
    allow_loopback: bool,
) -> Result<IpAddr> {
    let (exclude, rest) = match pattern.strip_prefix('^') {
        Some(r) => (true, r),
        None => (false, pattern),
    };
    let (exact, rest) = match rest.strip_prefix('=') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let names: Vec<&str> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() && !exclude {
        return Err(Error::Config(format!(
            "KOLO_IFACE={pattern:?} names no interface"
        )));
    }
    let hit = |n: &str| {
        names
            .iter()
            .any(|p| if exact { n == *p } else { n.starts_with(p) })
    };
    let matching: Vec<&(String, IpAddr)> = ifs.iter().filter(|(n, _)| hit(n) != exclude).collect();
    let ok = |ip: &IpAddr| usable(ip) && (allow_loopback || !ip.is_loopback());
    let pick = matching
        .iter()
        .map(|(_, ip)| *ip)
        .find(|ip| ip.is_ipv4() && ok(ip))
        .or_else(|| matching.iter().map(|(_, ip)| *ip).find(ok));
    pick.ok_or_else(|| {
        let why = if matching.iter().any(|(_, ip)| ip.is_loopback()) && !allow_loopback {
            " (only loopback matched, and the master is on another host)"
        } else {
            ""
        };
        Error::Config(format!(
            "KOLO_IFACE={pattern:?} matches no usable interface{why}; available: {}",
            describe(ifs)
        ))
    })
}

/// A host name that is safe to hand to ssh: a DNS name (RFC 1123 labels) or
/// an IP address, optionally `user@` before it. Anything else, a leading `-`
/// above all (ssh would read it as an option), is refused before any ssh runs.
///
/// ```
/// use kolo::net::check_host;
/// assert!(check_host("node-7.cluster").is_ok());
/// assert!(check_host("alice@10.0.0.2").is_ok());
/// assert!(check_host("[fd00::1]").is_ok());
/// assert!(check_host("-oProxyCommand=touch /tmp/x").is_err());
/// assert!(check_host("a b").is_err());
/// ```
pub fn check_host(host: &str) -> std::result::Result<(), String> {
    let name = host.rsplit_once('@').map_or(host, |(user, h)| {
        let ok_user = !user.is_empty()
            && !user.starts_with('-')
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if ok_user {
            h
        } else {
            ""
        }
    });
    let ip = name.trim_start_matches('[').trim_end_matches(']');
    if ip.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "host {host:?} is not a host name (RFC 1123) or an IP address"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("docker0", "172.17.0.1"),
            ("eth0", "fe80::1"),
            ("eth0", "2001:db8::5"),
            ("eth0", "10.0.0.5"),
            ("eth10", "10.0.1.5"),
            ("ib0", "2001:db8::7"),
        ]
        .iter()
        .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
        .collect()
    }

    fn m(p: &str) -> Result<String> {
        match_iface(p, &ifs(), false).map(|ip| ip.to_string())
    }

    #[test]
    fn prefix_exact_and_exclude() {
        assert_eq!(m("eth").unwrap(), "10.0.0.5");
        assert_eq!(m("eth1").unwrap(), "10.0.1.5");
        assert_eq!(m("=eth0").unwrap(), "10.0.0.5");
        assert!(m("=eth").is_err());
        assert_eq!(
            m("ib,eth").unwrap(),
            "10.0.0.5",
            "IPv4 preferred across the list"
        );
        assert_eq!(m("ib").unwrap(), "2001:db8::7", "IPv6 when no IPv4");
        assert_eq!(m("^lo,docker").unwrap(), "10.0.0.5");
        assert_eq!(m("^lo,docker,eth").unwrap(), "2001:db8::7");
        assert_eq!(m("^=docker0,lo").unwrap(), "10.0.0.5");
        assert_eq!(m(" eth0 , ").unwrap(), "10.0.0.5");
    }

    #[test]
    fn errors_name_pattern_and_interfaces() {
        let e = m("wlan").unwrap_err().to_string();
        assert!(
            e.contains("wlan") && e.contains("eth0=10.0.0.5") && e.contains("lo=127.0.0.1"),
            "{e}"
        );
        let e = m("lo").unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        assert_eq!(
            match_iface("lo", &ifs(), true).unwrap().to_string(),
            "127.0.0.1"
        );
        assert!(m("").is_err());
    }

    #[test]
    fn link_local_v6_is_never_picked() {
        let only = vec![("eth0".to_string(), "fe80::1".parse().unwrap())];
        assert!(match_iface("eth", &only, false).is_err());
        assert_eq!(first_non_loopback(&only), None);
        assert_eq!(
            first_non_loopback(&ifs()).unwrap().to_string(),
            "172.17.0.1"
        );
    }

    #[test]
    fn loopback_master_advertises_loopback() {
        let cfg = Config::local(0, 2, 29500);
        assert_eq!(advertise_ip(&cfg).unwrap(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut cfg = Config::local(0, 2, 29500);
        cfg.master_addr = "localhost".into();
        assert!(advertise_ip(&cfg).unwrap().is_loopback());
        cfg.master_addr = "::1".into();
        assert_eq!(advertise_ip(&cfg).unwrap(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn explicit_address_in_iface() {
        let mut cfg = Config::local(0, 2, 29500);
        cfg.iface = Some("10.1.2.3".into());
        assert_eq!(advertise_ip(&cfg).unwrap().to_string(), "10.1.2.3");
        cfg.iface = Some("lo".into());
        assert!(advertise_ip(&cfg).unwrap().is_loopback());
    }

    #[test]
    fn remote_master_is_never_loopback() {
        // 192.0.2.1 is TEST-NET-1. Routing it with a UDP connect sends no packet;
        // without any route (an isolated sandbox) the fallback may find nothing.
        let mut cfg = Config::local(0, 2, 29500);
        cfg.master_addr = "192.0.2.1".into();
        if let Ok(ip) = advertise_ip(&cfg) {
            assert!(!ip.is_loopback(), "{ip}");
        }
    }

    #[test]
    fn resolves_forms() {
        assert_eq!(resolve("127.0.0.1", 5).unwrap().to_string(), "127.0.0.1:5");
        assert_eq!(resolve("[::1]", 5).unwrap().to_string(), "[::1]:5");
        assert!(resolve("localhost", 5).unwrap().ip().is_loopback());
    }
}
