//! Configuration from the environment: the variable names and defaults of the earlier implementation
//! (`shared/reference/nkudo-mvp1-api.md` §0), with a SQLite default for `DATABASE_URL` and no built-in admin key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {message}")]
    Invalid { var: &'static str, message: String },
}

/// Everything the control plane reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub admin_key: Option<String>,
    pub require_persistent_pki: bool,
    pub ca_cert_file: Option<PathBuf>,
    pub ca_key_file: Option<PathBuf>,
    pub server_cert_file: Option<PathBuf>,
    pub server_key_file: Option<PathBuf>,
    /// `AGENT_CA_PREVIOUS_CERT_FILES`: comma-separated PEM files of retired agent CAs, still trusted for client
    /// certificates and in the CA bundle during a rotation (docs/control-plane.md, "Rotating certificates").
    pub agent_ca_previous_cert_files: Vec<PathBuf>,
    pub ca_common_name: String,
    pub server_names: Vec<String>,
    pub default_enrollment_ttl: Duration,
    pub agent_cert_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_offline_after: Duration,
    pub offline_sweep_interval: Duration,
    pub heartbeat_flush_interval: Duration,
    pub plan_lease_ttl: Duration,
    pub max_pending_plans: u32,
    pub enroll_rate_per_minute: u32,
    pub enroll_rate_burst: u32,
    pub shutdown_timeout: Duration,
    pub json_logs: bool,
    /// Operator floor for agent versions (`MINIMUM_AGENT_VERSION`); it can only narrow the N/N-1 rule.
    pub minimum_agent_version: Option<semver::Version>,
    /// `PROMETHEUS_URL`: where rollout triggers run their PromQL (absent: the builtin statistics).
    pub prometheus_url: Option<String>,
    /// `ROLLOUT_TICK`: how often the rollout controller takes a step (default 1s).
    pub rollout_tick: Duration,
    /// `RELEASE_PUBLIC_KEYS` (comma-separated minisign public keys) and `RELEASE_PUBLIC_KEYS_FILE` (minisign
    /// `.pub` files' text or one key per line): the keys a published release manifest must be signed with.
    pub release_public_keys: Vec<nkudo_core::minisign::PublicKey>,
    /// `FLEET_GAUGES_INTERVAL`: how often the per-site fleet gauges are recomputed (default 30s).
    pub fleet_gauges_interval: Duration,
    /// `AUDIT_VERIFY_INTERVAL`: how often every audit hash chain is verified (default 1h); `None` (`0` or
    /// `off`) disables the periodic verification.
    pub audit_verify_interval: Option<Duration>,
}

/// Reads release public keys from a comma-separated list and/or a file (each key a base64 `RW...` line,
/// `untrusted comment:` lines skipped).
pub fn parse_release_keys(
    list: Option<&str>,
    file_text: Option<&str>,
) -> Result<Vec<nkudo_core::minisign::PublicKey>, String> {
    let mut keys = Vec::new();
    let lines = list
        .into_iter()
        .flat_map(|l| l.split(','))
        .chain(file_text.into_iter().flat_map(|t| t.lines()));
    for raw in lines {
        let line = raw.trim();
        if line.is_empty() || line.starts_with("untrusted comment:") || line.starts_with('#') {
            continue;
        }
        let key = nkudo_core::minisign::PublicKey::from_base64(line)
            .map_err(|e| format!("{line:?} is not a minisign public key: {e}"))?;
        if !keys
            .iter()
            .any(|k: &nkudo_core::minisign::PublicKey| k.key_id == key.key_id)
        {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Minimum length of an admin key in production mode.
pub const MIN_ADMIN_KEY_LEN: usize = 32;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (the environment, or a map in tests). Empty values mean the default.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let dur = |k: &'static str, default: &str| -> Result<Duration, ConfigError> {
            let raw = var(k).unwrap_or_else(|| default.to_string());
            parse_duration(&raw).map_err(|message| ConfigError::Invalid { var: k, message })
        };
        let num = |k: &'static str, default: u32| -> Result<u32, ConfigError> {
            match var(k) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| ConfigError::Invalid {
                    var: k,
                    message: format!("{v:?} is not a non-negative integer"),
                }),
            }
        };
        let flag = |k: &'static str| -> Result<bool, ConfigError> {
            match var(k) {
                None => Ok(false),
                Some(v) => parse_bool(&v).ok_or_else(|| ConfigError::Invalid {
                    var: k,
                    message: format!("{v:?} is not a boolean"),
                }),
            }
        };
        let path = |k: &str| var(k).map(PathBuf::from);

        let listen_raw = var("CONTROL_PLANE_ADDR").unwrap_or_else(|| ":8443".into());
        let listen_addr = parse_listen_addr(&listen_raw).map_err(|message| ConfigError::Invalid {
            var: "CONTROL_PLANE_ADDR",
            message,
        })?;
        let data_dir = path("NKUDO_DATA_DIR").unwrap_or_else(|| PathBuf::from("data"));
        let database_url =
            var("DATABASE_URL").unwrap_or_else(|| format!("sqlite://{}", data_dir.join("nkudo.db").display()));
        let mut server_names: Vec<String> = var("SERVER_NAMES")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let h = h.trim();
            if !h.is_empty() && !server_names.iter().any(|n| n == h) {
                server_names.push(h.to_string());
            }
        }
        let cfg = Config {
            listen_addr,
            data_dir,
            database_url,
            admin_key: var("ADMIN_KEY"),
            require_persistent_pki: flag("REQUIRE_PERSISTENT_PKI")?,
            ca_cert_file: path("CA_CERT_FILE"),
            ca_key_file: path("CA_KEY_FILE"),
            server_cert_file: path("SERVER_CERT_FILE"),
            server_key_file: path("SERVER_KEY_FILE"),
            agent_ca_previous_cert_files: var("AGENT_CA_PREVIOUS_CERT_FILES")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
            ca_common_name: var("CA_COMMON_NAME").unwrap_or_else(|| "n-kudo-agent-ca".into()),
            server_names,
            default_enrollment_ttl: dur("DEFAULT_ENROLLMENT_TTL", "15m")?,
            agent_cert_ttl: dur("AGENT_CERT_TTL", "24h")?,
            heartbeat_interval: dur("HEARTBEAT_INTERVAL", "15s")?,
            heartbeat_offline_after: dur("HEARTBEAT_OFFLINE_AFTER", "60s")?,
            offline_sweep_interval: dur("OFFLINE_SWEEP_INTERVAL", "15s")?,
            heartbeat_flush_interval: dur("HEARTBEAT_FLUSH_INTERVAL", "1s")?,
            prometheus_url: match var("PROMETHEUS_URL") {
                None => None,
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
                Some(u) => {
                    return Err(ConfigError::Invalid {
                        var: "PROMETHEUS_URL",
                        message: format!("{u:?} is not an http(s) URL"),
                    })
                }
            },
            rollout_tick: dur("ROLLOUT_TICK", "1s")?,
            fleet_gauges_interval: dur("FLEET_GAUGES_INTERVAL", "30s")?,
            audit_verify_interval: {
                let raw = var("AUDIT_VERIFY_INTERVAL").unwrap_or_else(|| "1h".into());
                parse_optional_interval(&raw).map_err(|message| ConfigError::Invalid {
                    var: "AUDIT_VERIFY_INTERVAL",
                    message,
                })?
            },
            release_public_keys: {
                let file = match var("RELEASE_PUBLIC_KEYS_FILE") {
                    None => None,
                    Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                        var: "RELEASE_PUBLIC_KEYS_FILE",
                        message: format!("reading {path}: {e}"),
                    })?),
                };
                parse_release_keys(var("RELEASE_PUBLIC_KEYS").as_deref(), file.as_deref()).map_err(|message| {
                    ConfigError::Invalid {
                        var: "RELEASE_PUBLIC_KEYS",
                        message,
                    }
                })?
            },
            plan_lease_ttl: dur("PLAN_LEASE_TTL", "45s")?,
            max_pending_plans: num("MAX_PENDING_PLANS", 2)?,
            enroll_rate_per_minute: num("ENROLL_RATE_LIMIT_PER_MINUTE", 10)?,
            enroll_rate_burst: num("ENROLL_RATE_LIMIT_BURST", 20)?,
            shutdown_timeout: dur("HTTP_SHUTDOWN_TIMEOUT", "10s")?,
            json_logs: var("LOG_FORMAT").is_some_and(|v| v.eq_ignore_ascii_case("json")),
            minimum_agent_version: match var("MINIMUM_AGENT_VERSION") {
                None => None,
                Some(v) => Some(nkudo_core::version::parse(&v).map_err(|e| ConfigError::Invalid {
                    var: "MINIMUM_AGENT_VERSION",
                    message: e.to_string(),
                })?),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |var, message: &str| {
            Err(ConfigError::Invalid {
                var,
                message: message.to_string(),
            })
        };
        if self.agent_cert_ttl < Duration::from_secs(60) {
            return invalid("AGENT_CERT_TTL", "must be at least 1m");
        }
        if self.fleet_gauges_interval < Duration::from_millis(100) {
            return invalid("FLEET_GAUGES_INTERVAL", "must be at least 100ms");
        }
        if self
            .audit_verify_interval
            .is_some_and(|d| d < Duration::from_millis(100))
        {
            return invalid(
                "AUDIT_VERIFY_INTERVAL",
                "must be at least 100ms (0 or off disables the verification)",
            );
        }
        if self.heartbeat_flush_interval.is_zero() {
            return invalid("HEARTBEAT_FLUSH_INTERVAL", "must be greater than zero");
        }
        if self.enroll_rate_per_minute == 0 || self.enroll_rate_burst == 0 {
            return invalid("ENROLL_RATE_LIMIT_PER_MINUTE", "rate and burst must be at least 1");
        }
        if self.require_persistent_pki {
            match &self.admin_key {
                None => return invalid("ADMIN_KEY", "is required when REQUIRE_PERSISTENT_PKI=true"),
                Some(k) if k.len() < MIN_ADMIN_KEY_LEN => {
                    return Err(ConfigError::Invalid {
                        var: "ADMIN_KEY",
                        message: format!(
                            "is {} characters; production mode (REQUIRE_PERSISTENT_PKI=true) needs at least {MIN_ADMIN_KEY_LEN}",
                            k.len()
                        ),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The heartbeat interval in whole seconds as agents receive it (at least 1).
    pub fn heartbeat_interval_secs(&self) -> i64 {
        (self.heartbeat_interval.as_secs() as i64).max(1)
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres://") || self.database_url.starts_with("postgresql://")
    }
}

/// Parses a Go-style duration (`1h30m`, `15s`, `250ms`) or bare seconds (`30`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{raw:?}: missing unit (use ms, s, m or h)"))?;
        if num_len == 0 {
            return Err(format!("{raw:?}: expected a number"));
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| format!("{raw:?}: bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ns" => value / 1e9,
            "us" | "µs" => value / 1e6,
            "ms" => value / 1e3,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            other => return Err(format!("{raw:?}: unknown unit {other:?}")),
        };
        total += Duration::from_secs_f64(secs);
    }
    Ok(total)
}

/// A period that can be switched off: `0`, `off`, `false`, `no`, `none` or `disabled` give `None`, anything else
/// is a duration as [`parse_duration`] reads it (a zero duration such as `0s` is also off).
pub fn parse_optional_interval(raw: &str) -> Result<Option<Duration>, String> {
    let s = raw.trim();
    if ["off", "false", "no", "none", "disabled"]
        .iter()
        .any(|w| s.eq_ignore_ascii_case(w))
    {
        return Ok(None);
    }
    let d = parse_duration(s)?;
    Ok((!d.is_zero()).then_some(d))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "TRUE" | "True" | "yes" | "YES" | "on" | "ON" => Some(true),
        "0" | "false" | "FALSE" | "False" | "no" | "NO" | "off" | "OFF" => Some(false),
        _ => None,
    }
}

/// Parses `:8443` (all interfaces, as Go writes it), `127.0.0.1:0` or `[::1]:8443`.
fn parse_listen_addr(raw: &str) -> Result<SocketAddr, String> {
    let full = if raw.starts_with(':') {
        format!("0.0.0.0{raw}")
    } else {
        raw.to_string()
    };
    full.parse()
        .map_err(|_| format!("{raw:?} is not an address such as :8443 or 127.0.0.1:8443"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10").is_ok());
    }

    #[test]
    fn defaults_follow_the_reference() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.listen_addr.port(), 8443);
        assert_eq!(c.agent_cert_ttl, Duration::from_secs(86400));
        assert_eq!(c.default_enrollment_ttl, Duration::from_secs(900));
        assert!(c.database_url.starts_with("sqlite://"));
        assert!(c.admin_key.is_none());
        assert_eq!(c.max_pending_plans, 2);
    }

    #[test]
    fn production_mode_refuses_missing_or_short_admin_key() {
        let e = cfg(&[("REQUIRE_PERSISTENT_PKI", "true")]).unwrap_err();
        assert!(e.to_string().contains("ADMIN_KEY"), "{e}");
        let e = cfg(&[("REQUIRE_PERSISTENT_PKI", "true"), ("ADMIN_KEY", "short")]).unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
        let long = "k".repeat(40);
        assert!(cfg(&[("REQUIRE_PERSISTENT_PKI", "yes"), ("ADMIN_KEY", &long)]).is_ok());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = cfg(&[("AGENT_CERT_TTL", "forever")]).unwrap_err();
        assert!(e.to_string().starts_with("AGENT_CERT_TTL"), "{e}");
        let e = cfg(&[("CONTROL_PLANE_ADDR", "nope")]).unwrap_err();
        assert!(e.to_string().starts_with("CONTROL_PLANE_ADDR"), "{e}");
    }

    #[test]
    fn oncall_intervals() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.fleet_gauges_interval, Duration::from_secs(30));
        assert_eq!(c.audit_verify_interval, Some(Duration::from_secs(3600)));
        let c = cfg(&[("FLEET_GAUGES_INTERVAL", "1s"), ("AUDIT_VERIFY_INTERVAL", "15m")]).unwrap();
        assert_eq!(c.fleet_gauges_interval, Duration::from_secs(1));
        assert_eq!(c.audit_verify_interval, Some(Duration::from_secs(900)));
        for off in ["0", "off", "OFF", "disabled", "0s"] {
            let c = cfg(&[("AUDIT_VERIFY_INTERVAL", off)]).unwrap();
            assert_eq!(c.audit_verify_interval, None, "{off}");
        }
        let e = cfg(&[("AUDIT_VERIFY_INTERVAL", "hourly")]).unwrap_err();
        assert!(e.to_string().starts_with("AUDIT_VERIFY_INTERVAL"), "{e}");
        let e = cfg(&[("AUDIT_VERIFY_INTERVAL", "1ms")]).unwrap_err();
        assert!(e.to_string().starts_with("AUDIT_VERIFY_INTERVAL"), "{e}");
        let e = cfg(&[("FLEET_GAUGES_INTERVAL", "0")]).unwrap_err();
        assert!(e.to_string().starts_with("FLEET_GAUGES_INTERVAL"), "{e}");
        let e = cfg(&[("FLEET_GAUGES_INTERVAL", "soon")]).unwrap_err();
        assert!(e.to_string().starts_with("FLEET_GAUGES_INTERVAL"), "{e}");
    }

    fn release_key(seed: u8) -> nkudo_core::minisign::PublicKey {
        nkudo_core::minisign::PublicKey {
            key_id: nkudo_core::minisign::KeyId([seed; 8]),
            key: ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key(),
        }
    }

    #[test]
    fn release_keys_from_the_list_and_the_file() {
        let (k1, k2, k3) = (release_key(1), release_key(2), release_key(3));
        assert!(cfg(&[]).unwrap().release_public_keys.is_empty());
        let list = format!("{}, {}", k1.to_base64(), k2.to_base64());
        assert_eq!(
            parse_release_keys(Some(&list), None).unwrap(),
            vec![k1.clone(), k2.clone()]
        );
        // A minisign .pub file (untrusted comment line), a comment, a bare key line; k1 twice is kept once.
        let file = format!("{}\n# rotation\n{}\n", k1.to_file_text(), k3.to_base64());
        assert_eq!(
            parse_release_keys(Some(&list), Some(&file)).unwrap(),
            vec![k1.clone(), k2, k3.clone()]
        );
        assert_eq!(parse_release_keys(None, Some(&file)).unwrap(), vec![k1, k3]);
        assert!(parse_release_keys(Some("RWnope"), None).unwrap_err().contains("RWnope"));
        let e = cfg(&[("RELEASE_PUBLIC_KEYS", "garbage")]).unwrap_err();
        assert!(e.to_string().starts_with("RELEASE_PUBLIC_KEYS"), "{e}");
        let e = cfg(&[("RELEASE_PUBLIC_KEYS_FILE", "/nonexistent/keys.pub")]).unwrap_err();
        assert!(e.to_string().starts_with("RELEASE_PUBLIC_KEYS_FILE"), "{e}");
    }
}
