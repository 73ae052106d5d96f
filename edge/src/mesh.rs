//! NetBird status for the heartbeat: the agent's settings handed to [`crate::netbird::Netbird`].

use crate::cli::NetbirdSettings;
use crate::netbird::{Netbird, NetbirdConfig, Probe, ProbeKind};
use nkudo_core::api::NetbirdStatus;

/// The NetBird configuration of the provider module, from the agent's merged settings.
pub fn netbird_config(s: &NetbirdSettings) -> NetbirdConfig {
    let probe = s.probe_target.as_ref().map(|target| Probe {
        kind: if s.probe_type == "ping" {
            ProbeKind::Ping
        } else {
            ProbeKind::Http
        },
        target: target.clone(),
        timeout: s.probe_timeout,
        http_status_min: s.probe_http_min,
        http_status_max: s.probe_http_max,
    });
    NetbirdConfig {
        enabled: s.enabled,
        bin: s.bin.clone(),
        auto_join: s.auto_join,
        setup_key: s.setup_key.clone(),
        management_url: s.management_url.clone(),
        hostname: s.hostname.clone(),
        probe,
    }
}

/// The NetBird CLI's version (`None` when it does not run).
pub fn netbird_version(bin: &std::path::Path) -> Option<String> {
    Netbird::new(NetbirdConfig {
        bin: bin.to_path_buf(),
        ..NetbirdConfig::default()
    })
    .binary_version()
}

pub struct Mesh {
    nb: Netbird,
}

impl Mesh {
    pub fn new(settings: &NetbirdSettings) -> Self {
        Mesh {
            nb: Netbird::new(netbird_config(settings)),
        }
    }

    pub async fn status(&self) -> NetbirdStatus {
        self.nb.status().await
    }

    pub fn binary_version(&self) -> Option<String> {
        self.nb.binary_version()
    }
}
