//! The `[cluster]` section: who this replica is among the replicas of one `nats` state,
//! and how long its leases last.

use std::time::Duration;

use super::raw::{RawCluster, RawConfig};
use super::validate::Checker;
use super::{ClusterConfig, StateBackend};

/// `[cluster]`: with the `nats` backend always (its defaults when the section is absent),
/// refused with another backend, which one process alone can use.
pub(super) fn cluster_config(
    check: &mut Checker<'_>,
    raw: &RawConfig,
    backend: &StateBackend,
) -> Option<ClusterConfig> {
    if !matches!(backend, StateBackend::NatsKv { .. }) {
        if raw.cluster.is_some() {
            check.problem(
                "cluster",
                "several replicas share state through NATS: set state.backend = \"nats\"",
            );
        }
        return None;
    }
    let default = RawCluster::default();
    let cluster = raw.cluster.as_ref().unwrap_or(&default);
    let replica = match &cluster.replica {
        Some(name) => name.clone(),
        None => host_name(),
    };
    if replica.is_empty() || replica.len() > 128 || replica.chars().any(char::is_control) {
        check.problem(
            "cluster.replica",
            format!("{replica:?} is not a replica name (1 to 128 printable characters)"),
        );
    }
    let lease_ttl = check.duration("cluster.lease_ttl", &cluster.lease_ttl);
    if lease_ttl < Duration::from_secs(1) {
        check.problem("cluster.lease_ttl", "must be at least 1s");
    }
    let handover_wait = check.duration("cluster.handover_wait", &cluster.handover_wait);
    Some(ClusterConfig { replica, lease_ttl, handover_wait })
}

/// The machine's host name (a pod's name in Kubernetes), or `"bridge"`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "bridge".to_string())
}
