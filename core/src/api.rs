//! Wire types of the control plane's HTTP API.
//!
//! Field names follow the earlier Go implementation (see `shared/reference/nkudo-mvp1-api.md`). Request types
//! of admin and tenant routes refuse unknown fields (`deny_unknown_fields`); request types of agent routes
//! (enroll, heartbeat, renew, logs) tolerate them, because agents in the field send more than we read.
//! Timestamps are RFC 3339 strings in UTC.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every error answer: `{"error":"<message>","code":"<CODE>"}`. `error` stays a plain string for old clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

/// Machine-readable error codes carried in [`ErrorBody::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The body is not valid JSON, not one JSON value, or has fields of the wrong type.
    InvalidJson,
    /// A field is missing, empty, unknown or out of range.
    ValidationFailed,
    /// A path id is not a valid id.
    InvalidId,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidAdminKey,
    MissingApiKey,
    InvalidApiKey,
    MissingClientCertificate,
    InvalidClientCertificate,
    UnknownAgent,
    CertificateSerialMismatch,
    AgentRevoked,
    AgentIdMismatch,
    /// The enrollment token is not known.
    InvalidToken,
    /// The enrollment token was used already (tokens are one-time).
    AlreadyUsed,
    TokenExpired,
    InvalidCsr,
    InvalidRefreshToken,
    Conflict,
    RateLimited,
    AgentVersionUnsupported,
    Internal,
    Unavailable,
    /// A pre-release was aimed at an agent whose environment is production.
    PrereleaseInProduction,
    /// A release manifest's signature does not verify with any configured release public key.
    InvalidSignature,
    /// A release manifest is past its `expires`.
    ManifestExpired,
    /// Uploaded artifact bytes do not match the size or SHA-256 the signed manifest states.
    ArtifactMismatch,
    /// A `Range` header asks for bytes outside the artifact (HTTP 416).
    RangeNotSatisfiable,
    /// The version is not published, or has no artifact an agent could fetch.
    ReleaseNotAvailable,
    /// The version was marked bad (rolled back by a rollout); an operator must clear the mark first.
    VersionMarkedBad,
    /// The control plane has no release public keys configured (`RELEASE_PUBLIC_KEYS`).
    ReleaseKeysNotConfigured,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::ValidationFailed,
        ErrorCode::InvalidId,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InvalidAdminKey,
        ErrorCode::MissingApiKey,
        ErrorCode::InvalidApiKey,
        ErrorCode::MissingClientCertificate,
        ErrorCode::InvalidClientCertificate,
        ErrorCode::UnknownAgent,
        ErrorCode::CertificateSerialMismatch,
        ErrorCode::AgentRevoked,
        ErrorCode::AgentIdMismatch,
        ErrorCode::InvalidToken,
        ErrorCode::AlreadyUsed,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidCsr,
        ErrorCode::InvalidRefreshToken,
        ErrorCode::Conflict,
        ErrorCode::RateLimited,
        ErrorCode::AgentVersionUnsupported,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::PrereleaseInProduction,
        ErrorCode::InvalidSignature,
        ErrorCode::ManifestExpired,
        ErrorCode::ArtifactMismatch,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::ReleaseNotAvailable,
        ErrorCode::VersionMarkedBad,
        ErrorCode::ReleaseKeysNotConfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::ValidationFailed => "VALIDATION_FAILED",
            ErrorCode::InvalidId => "INVALID_ID",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::InvalidAdminKey => "INVALID_ADMIN_KEY",
            ErrorCode::MissingApiKey => "MISSING_API_KEY",
            ErrorCode::InvalidApiKey => "INVALID_API_KEY",
            ErrorCode::MissingClientCertificate => "MISSING_CLIENT_CERTIFICATE",
            ErrorCode::InvalidClientCertificate => "INVALID_CLIENT_CERTIFICATE",
            ErrorCode::UnknownAgent => "UNKNOWN_AGENT",
            ErrorCode::CertificateSerialMismatch => "CERTIFICATE_SERIAL_MISMATCH",
            ErrorCode::AgentRevoked => "AGENT_REVOKED",
            ErrorCode::AgentIdMismatch => "AGENT_ID_MISMATCH",
            ErrorCode::InvalidToken => "INVALID_TOKEN",
            ErrorCode::AlreadyUsed => "ALREADY_USED",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::InvalidCsr => "INVALID_CSR",
            ErrorCode::InvalidRefreshToken => "INVALID_REFRESH_TOKEN",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::AgentVersionUnsupported => "AGENT_VERSION_UNSUPPORTED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::PrereleaseInProduction => "PRERELEASE_IN_PRODUCTION",
            ErrorCode::InvalidSignature => "INVALID_SIGNATURE",
            ErrorCode::ManifestExpired => "MANIFEST_EXPIRED",
            ErrorCode::ArtifactMismatch => "ARTIFACT_MISMATCH",
            ErrorCode::RangeNotSatisfiable => "RANGE_NOT_SATISFIABLE",
            ErrorCode::ReleaseNotAvailable => "RELEASE_NOT_AVAILABLE",
            ErrorCode::VersionMarkedBad => "VERSION_MARKED_BAD",
            ErrorCode::ReleaseKeysNotConfigured => "RELEASE_KEYS_NOT_CONFIGURED",
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Admin routes

/// `POST /tenants` (admin).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    pub slug: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_retention_days: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tenant {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub primary_region: String,
    pub data_retention_days: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantsResponse {
    pub tenants: Vec<Tenant>,
}

/// `POST /tenants/{tenantID}/api-keys` (admin).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// Plaintext key (`nk_…`), shown once.
    pub api_key: String,
    pub expires_at: Option<String>,
}

/// An API key as `GET /tenants/{tenantID}/api-keys` lists it (never the key itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKeyInfo {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeysResponse {
    pub api_keys: Vec<ApiKeyInfo>,
}

// ---------------------------------------------------------------------------------------------------------
// Tenant routes (X-API-Key)

/// `POST /tenants/{tenantID}/sites`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSiteRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_country_code: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Site {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_country_code: Option<String>,
    pub connectivity_state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SitesResponse {
    pub sites: Vec<Site>,
}

/// `POST /tenants/{tenantID}/enrollment-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentTokenRequest {
    pub site_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokenCreated {
    pub token_id: String,
    pub site_id: String,
    /// Plaintext token, shown once.
    pub token: String,
    pub expires_at: String,
    pub one_time: bool,
}

/// An enrollment token as `GET /tenants/{tenantID}/enrollment-tokens` lists it (never the token itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnrollmentTokenInfo {
    pub id: String,
    pub site_id: String,
    pub site_name: String,
    pub created_at: String,
    pub expires_at: String,
    pub consumed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_by_agent_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokensResponse {
    pub tokens: Vec<EnrollmentTokenInfo>,
}

/// A host as `GET /sites/{siteID}/hosts` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub id: String,
    pub tenant_id: String,
    pub site_id: String,
    pub hostname: String,
    pub cpu_cores_total: i64,
    pub memory_bytes_total: i64,
    pub storage_bytes_total: i64,
    pub kvm_available: bool,
    pub cloud_hypervisor_available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_facts_at: Option<String>,
    pub agent_state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_last_heartbeat_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netbird_status: Option<NetbirdStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostsResponse {
    pub hosts: Vec<Host>,
}

/// An enrolled agent as `GET /tenants/{tenantID}/agents` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Agent {
    pub id: String,
    pub tenant_id: String,
    pub site_id: String,
    pub host_id: String,
    pub hostname: String,
    pub agent_version: String,
    pub agent_version_supported: bool,
    pub state: String,
    pub enrolled_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    pub cert_serial: String,
    pub cert_expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// The version the binary was built as, when the agent reports one different from `agent_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_version: Option<String>,
    /// Effective labels: the site's overlaid with the agent's own (`ring`, `environment`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The version the desired-version resolution names for this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    /// The self-update state from the agent's last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentsResponse {
    pub agents: Vec<Agent>,
}

/// `POST /tenants/{tenantID}/agents/{agentID}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RevokeAgentRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Agent routes

/// Hashes of stable host identifiers that the earlier agent sends at enrollment.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct HostFingerprint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_mac_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bios_uuid_sha256: Option<String>,
}

/// `POST /enroll` and `POST /v1/enroll` (no auth; the one-time token authenticates). Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct EnrollRequest {
    #[serde(default)]
    pub enrollment_token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub requested_hostname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_version: String,
    #[serde(default)]
    pub csr_pem: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_fingerprint: Option<HostFingerprint>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bootstrap_nonce: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub tenant_id: String,
    pub site_id: String,
    pub host_id: String,
    pub agent_id: String,
    pub client_certificate_pem: String,
    /// The CA bundle the agent trusts: it signs agent certificates and the server certificate.
    pub ca_certificate_pem: String,
    pub refresh_token: String,
    pub heartbeat_endpoint: String,
    pub heartbeat_interval_sec: i64,
    pub heartbeat_interval_seconds: i64,
    pub certificate_expires_at: String,
    pub minimum_supported_agent_version: String,
}

/// `POST /v1/renew` (mTLS): a fresh certificate for a new CSR. Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RenewRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub csr_pem: String,
    /// Optional for agents that hold one; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// `POST /v1/unenroll` (mTLS): the agent gives up its identity; its certificate stops working at once.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UnenrollRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewResponse {
    pub client_certificate_pem: String,
    pub ca_certificate_pem: String,
    pub expires_at: String,
    pub refresh_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct DiskFacts {
    #[serde(default)]
    pub mountpoint: String,
    #[serde(default)]
    pub total_bytes: i64,
    #[serde(default)]
    pub free_bytes: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct KvmFacts {
    #[serde(default)]
    pub present: bool,
    #[serde(default)]
    pub readable: bool,
    #[serde(default)]
    pub writable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct InterfaceFacts {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub is_bridge: bool,
}

/// Host facts as the agent collects them (`nkudo-edge hostfacts`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct HostFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected_at: Option<String>,
    #[serde(default)]
    pub cpu_cores: i64,
    #[serde(default)]
    pub memory_total_bytes: i64,
    #[serde(default)]
    pub memory_free_bytes: i64,
    #[serde(default)]
    pub disks: Vec<DiskFacts>,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub os_version: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub kvm: KvmFacts,
    #[serde(default)]
    pub interfaces: Vec<InterfaceFacts>,
    #[serde(default)]
    pub bridges: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_hypervisor_available: Option<bool>,
}

/// NetBird status as the agent reports it. `raw` (the CLI's output) is accepted and not stored.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct NetbirdStatus {
    #[serde(default)]
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
    #[serde(default, skip_serializing)]
    pub raw: Option<serde_json::Value>,
}

/// A microVM as the agent reports it. `state` is preferred over `status` (the earlier agent sends `status`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct MicroVmReport {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_iface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ch_pid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// An execution state change carried in a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ExecutionUpdate {
    #[serde(default)]
    pub execution_id: String,
    #[serde(default)]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// `POST /agents/heartbeat` and `POST /v1/heartbeat` (mTLS). Every field is optional; unknown fields
/// (and `tenant_id`, `site_id`, `host_id`, which the certificate decides) are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HeartbeatRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_available: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_hypervisor_available: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_facts: Option<HostFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netbird_status: Option<NetbirdStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub microvms: Vec<MicroVmReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub execution_updates: Vec<ExecutionUpdate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    /// The version this binary was built as, when it differs from `agent_version` (the version it was
    /// installed as: a promoted release reports the release version, its build version is the pre-release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_version: Option<String>,
    /// Self-update state (ARCHITECTURE §4.7). Absent from agents older than self-update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
}

/// One action of a leased plan, as the agent executes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeasedAction {
    pub action_id: String,
    #[serde(rename = "type")]
    pub action_type: String,
    pub params: serde_json::Value,
    pub timeout: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_id: Option<String>,
}

/// A plan handed to an agent under a lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeasedPlan {
    pub plan_id: String,
    pub execution_id: String,
    pub actions: Vec<LeasedAction>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub next_heartbeat_seconds: i64,
    pub pending_plans: Vec<LeasedPlan>,
    pub control_plane_version: String,
    /// Computed by the N/N-1 rule of [`crate::version`].
    pub minimum_supported_agent_version: String,
    /// Whether this agent's reported version is within N/N-1 of the control plane.
    pub agent_version_supported: bool,
    /// True when the agent's certificate is past two thirds of its life: renew with `POST /v1/renew`.
    pub rotate_certificate: bool,
    pub certificate_expires_at: String,
    /// The version this agent should run (set per agent, site, ring or fleet-wide). Absent when none is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    /// What to fetch to reach `desired_version`; absent when the agent already reports that version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateOffer>,
}

// ---------------------------------------------------------------------------------------------------------
// Releases and self-update (ARCHITECTURE §3, §4.7)

/// Phases of an agent's self-update, as its heartbeat reports them (kebab-case on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpdatePhase {
    /// No update under way (the agent runs the desired version, or none is set).
    #[default]
    Idle,
    Downloading,
    Verifying,
    Installing,
    /// The new version is current and must prove itself (a healthy heartbeat within the health window).
    Trial,
    /// The new version passed its trial: the update is done.
    Committed,
    /// The new version failed its trial and the host is back on the previous version (crash-loop guard).
    RolledBack,
    /// The update stopped before switching (download, signature, hash, version or install error).
    Failed,
}

impl UpdatePhase {
    pub const ALL: &'static [UpdatePhase] = &[
        UpdatePhase::Idle,
        UpdatePhase::Downloading,
        UpdatePhase::Verifying,
        UpdatePhase::Installing,
        UpdatePhase::Trial,
        UpdatePhase::Committed,
        UpdatePhase::RolledBack,
        UpdatePhase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePhase::Idle => "idle",
            UpdatePhase::Downloading => "downloading",
            UpdatePhase::Verifying => "verifying",
            UpdatePhase::Installing => "installing",
            UpdatePhase::Trial => "trial",
            UpdatePhase::Committed => "committed",
            UpdatePhase::RolledBack => "rolled-back",
            UpdatePhase::Failed => "failed",
        }
    }

    /// An attempt that reached this phase is over: its outcome is counted once.
    pub fn is_outcome(self) -> bool {
        matches!(
            self,
            UpdatePhase::Committed | UpdatePhase::RolledBack | UpdatePhase::Failed
        )
    }
}

/// The `update` object of a heartbeat: where the agent's self-update stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UpdateStatus {
    /// The version running now (as installed, see `HeartbeatRequest::build_version`).
    pub current_version: String,
    /// The version `previous` points at in the host layout (where a rollback goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    /// The desired version the control plane last named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    pub phase: UpdatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The version the last attempt started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_from: Option<String>,
    /// The version the last attempt aimed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_to: Option<String>,
    /// RFC 3339: when the last attempt started. With `attempt_to` it names the attempt, so that its outcome is
    /// counted once however many heartbeats repeat it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_started_at: Option<String>,
    /// Process starts of the current version beyond the first since it was installed (crash loops show here).
    #[serde(default)]
    pub restarts: u64,
}

/// Where an agent fetches the artifact of its architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactLocation {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// A path on the control plane (`/v1/releases/{version}/artifacts/{name}`, fetched over mTLS, resumable with
    /// `Range`) or an absolute `https://` URL (an external base URL registered with the release).
    pub url: String,
}

/// The `update` object of a heartbeat answer: everything the agent needs to move to the desired version. The
/// agent trusts none of it before the manifest signature verifies with one of its configured release keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOffer {
    pub version: String,
    /// The control plane names this version as a rollback target: the agent may install it even though it is
    /// below its current version (never otherwise).
    #[serde(default)]
    pub rollback: bool,
    /// `manifest.json` exactly as signed (canonical JSON text).
    pub manifest: String,
    /// `manifest.json.minisig`: the minisign signature file text.
    pub manifest_signature: String,
    pub artifact: ArtifactLocation,
}

/// `POST /admin/releases` (admin): register a signed release. Artifacts are then uploaded with
/// `PUT /admin/releases/{version}/artifacts/{name}`, or fetched by agents from `external_base_url` + `/` + name.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PublishReleaseRequest {
    /// `manifest.json` text as signed.
    pub manifest: String,
    /// `manifest.json.minisig` text.
    pub signature: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_base_url: Option<String>,
}

/// One artifact of a published release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseArtifactInfo {
    pub name: String,
    pub component: String,
    pub kind: String,
    pub os: String,
    pub arch: String,
    pub size: u64,
    pub sha256: String,
    /// The bytes were uploaded (and matched the manifest) or an external base URL serves them.
    pub available: bool,
}

/// A published release, as `GET /admin/releases[/{version}]` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub version: String,
    pub channel: String,
    pub git_commit: String,
    pub build_date: String,
    pub expires: String,
    pub minimum_supported_agent_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
    /// The minisign key id (16 upper-case hex digits) that signed the manifest.
    pub key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_base_url: Option<String>,
    pub published_at: String,
    /// Marked bad (rolled back by a rollout): never offered to an agent until an operator clears the mark.
    #[serde(default)]
    pub bad: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_reason: Option<String>,
    pub artifacts: Vec<ReleaseArtifactInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleasesResponse {
    pub releases: Vec<ReleaseInfo>,
}

/// What a desired version applies to. Resolution for an agent: its `agent` entry, else its site's, else its
/// ring's (the effective `ring` label), else the `fleet` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredScope {
    Fleet,
    Ring,
    Site,
    Agent,
}

impl DesiredScope {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredScope::Fleet => "fleet",
            DesiredScope::Ring => "ring",
            DesiredScope::Site => "site",
            DesiredScope::Agent => "agent",
        }
    }
}

/// `PUT /admin/desired-versions` (admin): set the desired agent version of one scope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDesiredVersionRequest {
    pub scope: DesiredScope,
    /// The ring name, site id or agent id; absent for `fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub version: String,
    /// Allow agents above `version` to go down to it (a signed rollback target).
    #[serde(default)]
    pub rollback: bool,
}

/// One desired-version entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredVersionEntry {
    pub scope: DesiredScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub version: String,
    pub rollback: bool,
    /// `admin`, or `rollout:<id>` when a rollout controller set it.
    pub set_by: String,
    pub set_at: String,
    /// Agents whose resolution currently lands on this entry.
    pub agents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DesiredVersionsResponse {
    pub desired_versions: Vec<DesiredVersionEntry>,
}

/// `PUT /sites/{site_id}/labels` (tenant) and `PUT /admin/sites/{site_id}/labels`,
/// `PUT /tenants/{tenant_id}/agents/{agent_id}/labels` and `PUT /admin/agents/{agent_id}/labels`: replace the
/// labels. Well-known keys: `ring` (lab, pilot, stable or any name) and `environment` (production, test, dev...).
/// An agent's effective labels are its site's overlaid with its own.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SetLabelsRequest {
    pub labels: BTreeMap<String, String>,
}

/// The well-known label naming an agent's rollout ring.
pub const LABEL_RING: &str = "ring";
/// The well-known label naming an agent's environment (`production` forbids pre-releases).
pub const LABEL_ENVIRONMENT: &str = "environment";
/// The environment value in which pre-releases are banned.
pub const ENVIRONMENT_PRODUCTION: &str = "production";

// ---------------------------------------------------------------------------------------------------------
// Rollouts (ARCHITECTURE §4.6; admin key)

/// `POST /admin/rollouts` (start) and `POST /admin/rollouts/plan` (dry run: nothing changes).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StartRolloutRequest {
    /// The policy file's text (TOML, see `nkudo_core::rollout`).
    pub policy: String,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Running,
    Paused,
    /// Stopped at a stage's manual gate until `approve`.
    WaitingApproval,
    Completed,
    /// A trigger fired (or a stage's agents did not report in time): every touched agent was sent back.
    RolledBack,
    /// An operator aborted it: every touched agent was sent back.
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::WaitingApproval => "waiting-approval",
            RolloutState::Completed => "completed",
            RolloutState::RolledBack => "rolled-back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// No further decisions are taken.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Completed | RolloutState::RolledBack | RolloutState::Aborted
        )
    }
}

/// One trigger's latest evaluation in a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerStatus {
    pub name: String,
    pub metric: String,
    pub compare: String,
    pub operator: String,
    pub threshold: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The control group's value or the baseline, by `compare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<f64>,
    /// pass, breach or inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    pub consecutive_breaches: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_at: Option<String>,
}

/// One stage of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStageStatus {
    pub index: u32,
    pub name: String,
    /// pending, switching, baking, waiting-approval, done, rolled-back.
    pub state: String,
    /// Agents the stage selects.
    pub agents: i64,
    /// Agents whose desired version the stage has set so far (the blast radius caps how fast this grows).
    pub switched: i64,
    /// Agents reporting the new version.
    pub on_new_version: i64,
    /// Agents per reported version.
    pub versions: BTreeMap<String, i64>,
    /// Agents per self-update phase.
    pub phases: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    pub manual_gate: bool,
    pub triggers: Vec<TriggerStatus>,
}

/// One entry of a rollout's append-only, hash-chained decision log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutDecision {
    pub seq: i64,
    pub at: String,
    /// `controller` or `admin`.
    pub actor: String,
    /// started, stage-started, agents-switched, stage-baked, gate-waiting, approved, paused, resumed, breach,
    /// report-timeout, rolled-back, aborted, completed, prerelease-refused.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The query as sent (placeholders filled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The values seen (value, reference, samples, ...).
    #[serde(default)]
    pub values: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// What was done.
    pub action: String,
    /// SHA-256 over the previous entry's hash and this entry (hex).
    pub hash: String,
}

/// A rollout as `GET /admin/rollouts/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    pub state: RolloutState,
    /// Index into `stages` of the stage in progress (absent before the first and after the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_stage: Option<u32>,
    /// `prometheus` or `builtin`: where the triggers' values come from.
    pub metrics_source: String,
    pub created_at: String,
    pub updated_at: String,
    pub stages: Vec<RolloutStageStatus>,
    /// The latest decisions (newest last); `GET /admin/rollouts/{id}/decisions` has all of them.
    #[serde(default)]
    pub decisions: Vec<RolloutDecision>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutsResponse {
    pub rollouts: Vec<Rollout>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutDecisionsResponse {
    pub decisions: Vec<RolloutDecision>,
    /// The hash chain verifies from the first entry to the last.
    pub chain_ok: bool,
}

/// One stage of a dry run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStage {
    pub name: String,
    /// Agents the stage would select (agents of earlier stages are not counted again).
    pub agents: i64,
    /// Of which already on the version.
    pub already_on_version: i64,
    /// Agents per site id.
    pub sites: BTreeMap<String, i64>,
    pub manual_gate: bool,
    pub bake_seconds: u64,
    pub report_timeout_seconds: u64,
    pub triggers: Vec<String>,
}

/// `POST /admin/rollouts/plan`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    pub version: String,
    pub metrics_source: String,
    pub stages: Vec<PlannedStage>,
    /// Agents no stage selects (they stay where they are).
    pub unselected_agents: i64,
    pub warnings: Vec<String>,
}

/// `POST /admin/rollback`: send the whole fleet, or a selection, to a version (a signed rollback target).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FleetRollbackRequest {
    pub version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rings: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetRollbackResponse {
    pub version: String,
    /// Agents whose desired version was set.
    pub agents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthResponse {
    pub status: String,
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_unique_upper_snake() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "duplicate code {s}");
            assert!(s.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_'), "{s}");
        }
    }

    #[test]
    fn enroll_request_accepts_what_the_earlier_agent_sends() {
        // The exact key set of the Go agent (reference §2), including host_fingerprint and bootstrap_nonce.
        let body = r#"{"enrollment_token":"t","agent_version":"dev","requested_hostname":"edge-1",
            "csr_pem":"-----BEGIN CERTIFICATE REQUEST-----","labels":{"arch":"amd64","os":"debian"},
            "host_fingerprint":{"machine_id_sha256":"ab","primary_mac_sha256":"cd"},
            "bootstrap_nonce":"1700000000000000000","something_new":1}"#;
        let req: EnrollRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.requested_hostname, "edge-1");
        assert_eq!(req.host_fingerprint.unwrap().machine_id_sha256.as_deref(), Some("ab"));
    }

    #[test]
    fn heartbeat_accepts_the_earlier_agent_body() {
        let body = r#"{"tenant_id":"t","site_id":"s","host_id":"h","agent_id":"a","sent_at":"2026-01-01T00:00:00Z",
          "host_facts":{"collected_at":"x","cpu_cores":4,"memory_total_bytes":100,"memory_free_bytes":50,
             "disks":[{"mountpoint":"/","total_bytes":10,"free_bytes":5}],"os":"debian","os_version":"12",
             "kernel":"6.1","arch":"amd64","kvm":{"present":true,"readable":true,"writable":false,"check_message":"x"},
             "interfaces":[{"name":"eth0","mac":"aa","addresses":["10.0.0.1/24"],"is_bridge":false}],"bridges":[]},
          "netbird_status":{"connected":true,"state":"Connected","raw":"..."},
          "microvms":[{"id":"vm-demo-001","name":"demo","kernel_path":"","rootfs_path":"/x","tap_iface":"tap0",
             "ch_pid":12,"status":"RUNNING","updated_at":"2026-01-01T00:00:00Z"}]}"#;
        let hb: HeartbeatRequest = serde_json::from_str(body).unwrap();
        assert_eq!(hb.microvms[0].status.as_deref(), Some("RUNNING"));
        assert_eq!(hb.host_facts.unwrap().cpu_cores, 4);
    }

    #[test]
    fn admin_requests_refuse_unknown_fields() {
        let err = serde_json::from_str::<CreateTenantRequest>(r#"{"slug":"a","name":"b","x":1}"#);
        assert!(err.is_err());
    }
}

// ---------------------------------------------------------------------------------------------------------
// Plans, executions, logs, microVMs

/// `POST /sites/{siteID}/plans` (api-key). The same `idempotency_key` with the same body returns the same
/// plan; with a different body it answers 409.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApplyPlanRequest {
    pub idempotency_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    pub actions: Vec<PlanActionSpec>,
}

/// One action of a plan as a tenant writes it: the reference's fields plus what a VM needs to boot.
/// `operation`: `CREATE`, `START`, `STOP` or `DELETE` (case-insensitive).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanActionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<i64>,
    /// Direct kernel boot: `kernel_path` (+ optional `initramfs_path`) and `cmdline`; or `firmware_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_path: Option<String>,
    /// Base disk image on the host (raw or qcow2); the VM gets its own copy or qcow2 overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_mib: Option<i64>,
    /// cloud-init user data (`#cloud-config …`), put into a NoCloud seed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Parameters of a `MicroVMCreate` action as the agent receives them in a lease. Key names follow the earlier
/// agent (`vcpu`, `rootfs_path` for the base disk, `tap_iface`). Start/Stop/Delete carry only `vm_id`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct MicroVmCreateParams {
    pub vm_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub vcpu: i64,
    #[serde(default)]
    pub memory_mib: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_mib: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_iface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Params of `MicroVMStart`, `MicroVMStop`, `MicroVMDelete`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct MicroVmRefParams {
    pub vm_id: String,
}

/// Action types in leases.
pub const ACTION_CREATE: &str = "MicroVMCreate";
pub const ACTION_START: &str = "MicroVMStart";
pub const ACTION_STOP: &str = "MicroVMStop";
pub const ACTION_DELETE: &str = "MicroVMDelete";

/// One execution (one per plan action).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Execution {
    pub id: String,
    pub tenant_id: String,
    pub site_id: String,
    pub plan_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    pub operation_id: String,
    /// `CREATE`, `START`, `STOP` or `DELETE`.
    pub operation_type: String,
    /// `PENDING`, `IN_PROGRESS`, `SUCCEEDED`, `FAILED` or `CANCELLED`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApplyPlanResponse {
    pub plan_id: String,
    pub plan_version: i64,
    pub plan_status: String,
    pub deduplicated: bool,
    pub executions: Vec<Execution>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionsResponse {
    pub executions: Vec<Execution>,
}

/// `GET /v1/plans/next` (mTLS).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NextPlansResponse {
    pub plans: Vec<LeasedPlan>,
}

/// The outcome of one action, as the agent reports it. Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ActionResult {
    /// The execution row id from the lease (the earlier agent sends the plan-level id here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_id: Option<String>,
    #[serde(default)]
    pub action_id: String,
    #[serde(default)]
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// `POST /v1/executions/result` (mTLS). Answers 202 `{"status":"accepted"}`; a repeated report is idempotent.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ExecutionResultRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_id: Option<String>,
    #[serde(default)]
    pub results: Vec<ActionResult>,
}

/// One log line of an execution.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct LogEntry {
    #[serde(default)]
    pub execution_id: String,
    /// Lets the control plane resolve a plan-level `execution_id` (earlier agents) to the action's execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    #[serde(default)]
    pub sequence: i64,
    /// `DEBUG`, `INFO`, `WARN` or `ERROR`.
    #[serde(default)]
    pub severity: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emitted_at: Option<String>,
}

/// `POST /agents/logs` (mTLS): a batch of log lines.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct AgentLogsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub entries: Vec<LogEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogIngestResponse {
    pub accepted_frames: i64,
    pub dropped_frames: i64,
}

/// `POST /v1/logs` (mTLS): one frame, as the earlier agent sends it (`level`, not `severity`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct LogFrame {
    #[serde(default)]
    pub execution_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    #[serde(default)]
    pub sequence: i64,
    #[serde(default)]
    pub level: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emitted_at: Option<String>,
}

/// A stored log line, as `GET /executions/{executionID}/logs` returns it (ordered by `sequence`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecutionLog {
    pub tenant_id: String,
    pub execution_id: String,
    pub sequence: i64,
    pub severity: String,
    pub message: String,
    pub emitted_at: String,
    pub ingested_at: String,
}

/// `GET /executions/{executionID}/logs?limit=N&after_sequence=S`: `next_after_sequence` is set when more
/// lines follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionLogsResponse {
    pub logs: Vec<ExecutionLog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after_sequence: Option<i64>,
}

/// A microVM as `GET /sites/{siteID}/vms` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MicroVm {
    pub id: String,
    pub tenant_id: String,
    pub site_id: String,
    /// `""` while no host runs it (the reference's shape).
    pub host_id: String,
    pub name: String,
    /// `CREATING`, `STOPPED`, `RUNNING`, `PAUSED`, `DELETING`, `DELETED` or `ERROR`.
    pub state: String,
    pub vcpu_count: i64,
    pub memory_mib: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_at: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicroVmsResponse {
    pub vms: Vec<MicroVm>,
}
