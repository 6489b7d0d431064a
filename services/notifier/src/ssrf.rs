//! The SSRF guard: which webhook targets the notifier may contact.
//!
//! Only registered targets are ever used (the routing configuration is the
//! registry); `https` is required unless `allow_insecure_http` is set (tests,
//! development); and every address a target's host resolves to is checked:
//! loopback, private (RFC 1918, IPv6 ULA), link-local (including the cloud
//! metadata address 169.254.169.254), unspecified, multicast, broadcast,
//! CGNAT (100.64.0.0/10), documentation and other special-purpose addresses
//! are refused unless they fall inside an explicitly allow-listed CIDR. The
//! check runs when the configuration is loaded and again on every delivery,
//! inside the HTTP client's resolver, so a DNS answer that changed after
//! start-up cannot redirect a delivery to an internal address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The URL's scheme is not allowed.
    #[error("scheme `{0}` is not allowed (https only; set webhooks.allow_insecure_http for tests)")]
    Scheme(String),
    /// The URL has no host.
    #[error("the URL has no host")]
    NoHost,
    /// The URL carries credentials.
    #[error("the URL must not carry a user name or password")]
    Credentials,
    /// A resolved address is in a forbidden class.
    #[error("{host} resolves to {addr}, a {class} address (not in webhooks.allow_cidrs)")]
    Address {
        /// The host as written.
        host: String,
        /// The offending address.
        addr: IpAddr,
        /// Its class, in words.
        class: &'static str,
    },
    /// The host did not resolve to any address.
    #[error("{0} resolves to no address")]
    NoAddress(String),
}

/// The guard's policy.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow_insecure_http: bool,
    allow: Vec<IpNet>,
}

/// The class of a special-purpose address, `None` for an ordinary public
/// unicast address.
pub fn special_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_class(v4);
            }
            v6_class(v6)
        }
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified (\"this network\")")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("CGNAT (RFC 6598)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (ULA)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        Some("NAT64")
    } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        Some("IPv4-compatible")
    } else {
        None
    }
}

impl Guard {
    /// A guard; `allow` are CIDRs whose addresses are allowed even when
    /// special (e.g. `127.0.0.0/8` in tests, an internal receiver's subnet).
    pub fn new(allow_insecure_http: bool, allow: Vec<IpNet>) -> Self {
        Self {
            allow_insecure_http,
            allow,
        }
    }

    /// Whether plain `http` is allowed.
    pub fn allows_insecure_http(&self) -> bool {
        self.allow_insecure_http
    }

    /// Checks one address.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        let Some(class) = special_class(ip) else {
            return Ok(());
        };
        let canonical = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self
            .allow
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canonical))
        {
            return Ok(());
        }
        Err(Refusal::Address {
            host: host.to_string(),
            addr: ip,
            class,
        })
    }

    /// Checks a URL's scheme and shape (no DNS).
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_insecure_http => {}
            other => return Err(Refusal::Scheme(other.to_string())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refusal::Credentials);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Refusal::NoHost);
        }
        Ok(())
    }

    /// The literal IP of a URL's host, if it is one.
    pub fn literal_ip(url: &Url) -> Option<IpAddr> {
        let h = url.host_str()?;
        h.trim_start_matches('[').trim_end_matches(']').parse().ok()
    }

    /// Checks a URL fully: scheme, then every address its host resolves to
    /// (resolving with the system resolver). `Ok(None)` when the host could
    /// not be resolved right now (a transient condition).
    pub async fn check_target(&self, url: &Url) -> Result<Result<(), String>, Refusal> {
        self.check_url(url)?;
        let host = url.host_str().unwrap_or_default().to_string();
        if let Some(ip) = Self::literal_ip(url) {
            return self.check_ip(&host, ip).map(Ok);
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let looked_up = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(|a| a.collect::<Vec<SocketAddr>>());
        match looked_up {
            Ok(addrs) => {
                if addrs.is_empty() {
                    return Err(Refusal::NoAddress(host));
                }
                for a in addrs {
                    self.check_ip(&host, a.ip())?;
                }
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(format!("cannot resolve {host}: {e}"))),
        }
    }

    /// Blocking variant of [`Guard::check_target`] for configuration loading.
    pub fn check_target_blocking(&self, url: &Url) -> Result<Result<(), String>, Refusal> {
        use std::net::ToSocketAddrs;
        self.check_url(url)?;
        let host = url.host_str().unwrap_or_default().to_string();
        if let Some(ip) = Self::literal_ip(url) {
            return self.check_ip(&host, ip).map(Ok);
        }
        let port = url.port_or_known_default().unwrap_or(443);
        match (host.as_str(), port).to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    return Err(Refusal::NoAddress(host));
                }
                for a in addrs {
                    self.check_ip(&host, a.ip())?;
                }
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(format!("cannot resolve {host}: {e}"))),
        }
    }
}

/// The HTTP client's resolver: resolves with the system resolver and refuses
/// the host if any of its addresses is refused by the guard. This is the
/// check that holds at connection time, whatever DNS said before.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<Guard>,
}

impl GuardedResolver {
    /// A resolver enforcing `guard`.
    pub fn new(guard: Arc<Guard>) -> Self {
        Self { guard }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(Box::new(Refusal::NoAddress(host)) as Box<_>);
            }
            for a in &addrs {
                guard.check_ip(&host, a.ip()).map_err(Box::new)?;
            }
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_addresses_are_refused() {
        let g = Guard::new(false, vec![]);
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(g.check_ip("h", ip(a)).is_err(), "{a} must be refused");
        }
        for a in ["93.184.216.34", "2606:2800:220:1::1", "8.8.8.8"] {
            assert!(g.check_ip("h", ip(a)).is_ok(), "{a} must be allowed");
        }
        let e = g.check_ip("meta", ip("169.254.169.254")).unwrap_err();
        assert!(e.to_string().contains("link-local"), "{e}");
    }

    #[test]
    fn allow_list_overrides() {
        let g = Guard::new(true, vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(g.check_ip("h", ip("127.0.0.1")).is_ok());
        assert!(g.check_ip("h", ip("::ffff:127.0.0.1")).is_ok());
        assert!(g.check_ip("h", ip("10.0.0.1")).is_err());
        assert!(g.check_ip("h", ip("::1")).is_err());
    }

    #[test]
    fn schemes_and_credentials() {
        let strict = Guard::new(false, vec![]);
        let lax = Guard::new(true, vec![]);
        let http = Url::parse("http://example.com/x").unwrap();
        assert!(matches!(strict.check_url(&http), Err(Refusal::Scheme(_))));
        assert!(lax.check_url(&http).is_ok());
        let ftp = Url::parse("ftp://example.com/x").unwrap();
        assert!(lax.check_url(&ftp).is_err());
        let cred = Url::parse("https://u:p@example.com/x").unwrap();
        assert_eq!(strict.check_url(&cred), Err(Refusal::Credentials));
    }

    #[tokio::test]
    async fn literal_targets_are_checked_without_dns() {
        let g = Guard::new(true, vec![]);
        let u = Url::parse("http://10.0.0.1:8080/hook").unwrap();
        assert!(matches!(
            g.check_target(&u).await,
            Err(Refusal::Address { .. })
        ));
        let u = Url::parse("http://[::1]:8080/hook").unwrap();
        assert!(g.check_target(&u).await.is_err());
        // localhost resolves to loopback only.
        let u = Url::parse("http://localhost:8080/hook").unwrap();
        assert!(g.check_target(&u).await.is_err());
    }
}
