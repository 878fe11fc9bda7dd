//! Where a webhook posted through the API may not go: loopback, link-local, private,
//! unique-local and unspecified addresses, also in their IPv4-mapped, IPv4-compatible,
//! NAT64 and 6to4 IPv6 forms. A literal address is refused when the subscription is
//! posted; a host name is checked when the request connects, on every address it
//! resolves to (so a name that resolves, or is rebound, to 127.0.0.1 is caught), by the
//! DNS resolver of the HTTP client that posts the API's webhooks.
//!
//! Webhooks of the configuration file are trusted: they get a client without the check.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// What kind of address `ip` is when a webhook posted by a stranger must not reach it:
/// `loopback`, `link-local`, `private` (RFC 1918, CGNAT, IPv6 unique local and
/// site-local), `unspecified` (also `0.0.0.0/8` and broadcast) or `multicast`; `None` for
/// a public address. IPv6 forms that carry an IPv4 address (`::ffff:a.b.c.d`,
/// `::a.b.c.d`, `64:ff9b::a.b.c.d`, `2002:aabb:ccdd::`) are judged by that address.
pub fn private_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => private_v4(ip),
        IpAddr::V6(ip) => private_v6(ip),
    }
}

fn private_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_private() || (a == 100 && (b & 0xc0) == 64) {
        Some("private")
    } else if a == 0 || ip.is_broadcast() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

fn private_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    let embedded =
        |high: u16, low: u16| Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8);
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if let Some(mapped) = ip.to_ipv4_mapped() {
        private_v4(mapped)
    } else if segments[..6] == [0; 6] {
        // IPv4-compatible (`::a.b.c.d`, deprecated but still routed by some stacks).
        private_v4(embedded(segments[6], segments[7]))
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // The well-known NAT64 prefix: a gateway turns it into the IPv4 address.
        private_v4(embedded(segments[6], segments[7]))
    } else if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2] == 1 {
        // Local-use NAT64 (RFC 8215): whatever the operator's translator reaches.
        Some("private")
    } else if segments[0] == 0x2002 {
        // 6to4: the IPv4 address of the relay's far end.
        private_v4(embedded(segments[1], segments[2]))
    } else if (segments[0] & 0xfe00) == 0xfc00 || (segments[0] & 0xffc0) == 0xfec0 {
        Some("private")
    } else if (segments[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// A connection a posted webhook may not make: its name resolved to a private address.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} resolves to {address}, a {kind} address; webhooks posted through the API may not reach it (admin.allow_private_webhooks = true allows it)"
)]
pub struct PrivateDestination {
    /// The host name.
    pub name: String,
    /// The address it resolved to.
    pub address: IpAddr,
    /// What kind of address it is (see [`private_address`]).
    pub kind: &'static str,
}

impl PrivateDestination {
    /// The refusal somewhere in `error`'s chain of causes, if it is one.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a PrivateDestination> {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(refused) = error.downcast_ref::<PrivateDestination>() {
                return Some(refused);
            }
            cause = error.source();
        }
        None
    }
}

/// Names a resolver answers itself instead of asking DNS, changeable while it runs: the
/// hook tests use to make a name resolve to loopback, or to rebind it.
#[derive(Clone, Debug, Default)]
pub struct FixedNames(Arc<RwLock<HashMap<String, Vec<IpAddr>>>>);

impl FixedNames {
    /// Resolves `name` to `addresses` from now on.
    pub fn set(&self, name: &str, addresses: Vec<IpAddr>) {
        let mut names = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        names.insert(normal(name), addresses);
    }

    fn get(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()
    }
}

/// A host name as compared: lower case, without a trailing dot.
fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// How long a posted webhook's name may take to resolve when it is checked at once.
const CHECK_WAIT: Duration = Duration::from_secs(2);

/// A DNS resolver that refuses a name when any address it resolves to is private. Names
/// of the proxies in the environment (`HTTP_PROXY`, ...) are the operator's and pass.
#[derive(Debug, Default)]
pub struct GuardedResolver {
    /// Names answered from here instead of DNS (tests), still checked.
    fixed: FixedNames,
    /// Names not checked: the proxies the operator configured.
    trusted: BTreeSet<String>,
    /// Whether addresses are checked at all (`admin.allow_private_webhooks` turns it off).
    check: bool,
}

impl GuardedResolver {
    /// A resolver asking the system (`getaddrinfo`), trusting the proxies named in the
    /// environment, and answering `fixed` names itself; `check` false lets every address
    /// through.
    pub fn new(fixed: FixedNames, check: bool) -> Self {
        let trusted = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"]
            .iter()
            .filter_map(|variable| std::env::var(variable).ok())
            .filter_map(|url| reqwest::Url::parse(&url).ok())
            .filter_map(|url| url.host_str().map(normal))
            .collect();
        GuardedResolver { fixed, trusted, check }
    }

    /// Why a connection to `name` would be refused now, if it would; a name that does not
    /// resolve (yet) within a moment is not refused here (its connection is checked).
    pub async fn refusal(&self, name: &str) -> Option<PrivateDestination> {
        let name = normal(name);
        if !self.check || self.trusted.contains(&name) {
            return None;
        }
        let addresses = tokio::time::timeout(CHECK_WAIT, lookup(self.fixed.get(&name), &name)).await;
        judge(name, &addresses.ok()?.ok()?).err()
    }
}

/// The addresses of `name`: `fixed` ones, or the system's.
async fn lookup(fixed: Option<Vec<IpAddr>>, name: &str) -> std::io::Result<Vec<SocketAddr>> {
    match fixed {
        Some(addresses) => Ok(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect()),
        None => Ok(tokio::net::lookup_host((name, 0)).await?.collect()),
    }
}

/// Refuses `name` when any of its `addresses` is private.
fn judge(name: String, addresses: &[SocketAddr]) -> Result<(), PrivateDestination> {
    match addresses.iter().find_map(|address| private_address(address.ip()).map(|kind| (address.ip(), kind)))
    {
        Some((address, kind)) => Err(PrivateDestination { name, address, kind }),
        None => Ok(()),
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let name = normal(name.as_str());
        let fixed = self.fixed.get(&name);
        let trusted = !self.check || self.trusted.contains(&name);
        Box::pin(async move {
            let addresses = lookup(fixed, &name).await?;
            if !trusted {
                judge(name, &addresses)?;
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// The HTTP clients webhooks are posted with: the configuration's (trusted) and the
/// API's (every resolved address checked, unless `admin.allow_private_webhooks`).
/// Neither follows redirects: a 3xx would turn a POST into a body-less GET.
#[derive(Clone, Debug)]
pub struct WebhookClients {
    /// For webhooks of the configuration file.
    pub trusted: reqwest::Client,
    /// For webhooks posted through the API.
    pub guarded: reqwest::Client,
    /// The guarded client's resolver, to check a posted name at once.
    pub resolver: Arc<GuardedResolver>,
    /// Whether the API's are checked at all.
    pub checked: bool,
}

impl WebhookClients {
    /// Both clients; `fixed` names are resolved to those addresses by the guarded one
    /// (a hook for tests: the check still applies to them).
    ///
    /// # Errors
    /// reqwest's, when a client cannot be built (no TLS backend).
    pub fn build(allow_private: bool, fixed: FixedNames) -> Result<Self, reqwest::Error> {
        let builder = || reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        let trusted = builder().build()?;
        let resolver = Arc::new(GuardedResolver::new(fixed, !allow_private));
        let guarded = builder().dns_resolver(resolver.clone()).build()?;
        Ok(WebhookClients { trusted, guarded, resolver, checked: !allow_private })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_private_form_is_recognised() {
        for (text, kind) in [
            ("127.0.0.1", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("255.255.255.255", "unspecified"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::127.0.0.1", "loopback"),
            ("::169.254.1.1", "link-local"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a00:1", "private"),
            ("64:ff9b:1::1", "private"),
            ("2002:7f00:1::1", "loopback"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("fec0::1", "private"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
        ] {
            assert_eq!(private_address(text.parse().unwrap()), Some(kind), "{text}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1::1", "64:ff9b::5db8:d822", "::ffff:8.8.8.8"] {
            assert_eq!(private_address(public.parse().unwrap()), None, "{public}");
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_a_private_address_is_refused() {
        let fixed = FixedNames::default();
        fixed.set("inside.test", vec!["93.184.216.34".parse().unwrap(), "127.0.0.1".parse().unwrap()]);
        fixed.set("outside.test", vec!["93.184.216.34".parse().unwrap()]);
        let resolver = GuardedResolver::new(fixed.clone(), true);
        let refused = resolver.resolve("Inside.Test.".parse().unwrap()).await.err().expect("refused");
        let refused = PrivateDestination::find(refused.as_ref()).expect("a PrivateDestination");
        assert_eq!((refused.name.as_str(), refused.kind), ("inside.test", "loopback"));
        let addresses: Vec<SocketAddr> =
            resolver.resolve("outside.test".parse().unwrap()).await.unwrap().collect();
        assert_eq!(addresses, ["93.184.216.34:0".parse::<SocketAddr>().unwrap()]);
        assert!(resolver.refusal("outside.test").await.is_none());
        fixed.set("outside.test", vec!["::ffff:10.0.0.1".parse().unwrap()]);
        assert_eq!(
            resolver.refusal("outside.test").await.map(|refused| refused.kind),
            Some("private"),
            "rebound"
        );
        assert!(GuardedResolver::new(fixed, false).refusal("inside.test").await.is_none(), "allowed");
    }
}
