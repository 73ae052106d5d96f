//! Agent PKI and server TLS identity of the control plane.
//!
//! This module owns every certificate the control plane deals with:
//!
//! * the **agent CA**, which signs agent client certificates at enrollment and renewal
//!   ([`Pki::sign_agent_csr`]). The subject and extensions of an agent's CSR are ignored: the
//!   issued certificate carries CN = agent id, O = `n-kudo-agent`, the SAN URI
//!   `spiffe://nkudo/tenant/<tenant>/site/<site>/agent/<agent>` and EKU clientAuth;
//! * the **server certificate** of the HTTPS listener ([`Pki::server_tls_config`]): TLS 1.3 only,
//!   ALPN `h2` and `http/1.1`, client certificates optional at the handshake but, when presented,
//!   verified against the agent CA (a certificate from another CA fails the handshake);
//! * the **previous agent CAs** (`AGENT_CA_PREVIOUS_CERT_FILES`, certificates only): retired CAs
//!   kept during a rotation. Client certificates they issued still pass the handshake, but nothing
//!   new is issued by them; [`Pki::agent_ca_of`] tells which CA issued a client certificate, so a
//!   heartbeat on a previous CA's certificate asks the agent to renew at once (it then gets a
//!   certificate from the current CA);
//! * the **CA bundle** handed to agents ([`Pki::ca_bundle_pem`], in the enrollment and renewal
//!   answers and written to `<data_dir>/pki/ca-bundle.pem`): the agent CA, then the previous agent
//!   CAs, plus the trust anchor of the server chain when the server certificate was issued by none
//!   of them, so an agent trusting only the bundle verifies the server without skipping
//!   verification, whichever of these CAs issued the server certificate.
//!
//! Rotation without orphaning an agent (the steps are in `docs/control-plane.md`, "Rotating
//! certificates"): (1) restart with the new CA as `CA_CERT_FILE`/`CA_KEY_FILE` and the old one in
//! `AGENT_CA_PREVIOUS_CERT_FILES`, server certificate unchanged: agents keep working and renew at
//! their next heartbeat, receiving a new-CA certificate and the new bundle (new + old CA);
//! (2) once no agent is left on the old CA (`nkudo_agent_heartbeats_by_ca_total{ca="previous"}`
//! no longer grows, and `/admin/agents` shows no certificate issued before step 1), switch the
//! server certificate to one chained to the new CA; (3) drop the old CA from the list.
//! Certificates are read at start-up only: a restart applies new files (there is no reload).
//!
//! Two modes, chosen per pair of files:
//!
//! * **persistent**: `CA_CERT_FILE` + `CA_KEY_FILE` and/or `SERVER_CERT_FILE` + `SERVER_KEY_FILE`
//!   (PEM; keys PKCS#8, SEC1 EC or PKCS#1 RSA). Each pair is "both or neither". With
//!   `REQUIRE_PERSISTENT_PKI` all four are required.
//! * **dev**: whatever is not given is generated (ECDSA P-256) under `<data_dir>/pki/` (directory
//!   0700, keys 0600, atomic writes) and reloaded on the next start, so a restart keeps enrolled
//!   agents valid. The dev server certificate is signed by the agent CA and is re-issued (by the
//!   current CA) when it expires within 30 days, no longer covers the configured server names, or
//!   was issued neither by the current CA nor by a previous one (a dev server certificate of the
//!   previous CA is kept during a rotation, so agents that only trust that CA still connect).
//!
//! Everything uses rustls' *ring* provider explicitly; no process-wide default provider is needed.
//! Serial numbers are reported as lowercase hex of the big-endian bytes without leading zero bytes
//! ([`IssuedCert::serial_hex`] and [`peer_identity`] agree on this form).

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use prometheus::{IntCounterVec, Opts, Registry};
use rand::Rng as _;
use rcgen::{
    BasicConstraints, BmpString, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    UniversalString,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA1WITHRSA,
    OID_SHA1_WITH_RSA, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::time::ASN1Time;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

/// Environment variable names, used in error messages.
const ENV_CA_CERT: &str = "CA_CERT_FILE";
const ENV_CA_KEY: &str = "CA_KEY_FILE";
const ENV_SERVER_CERT: &str = "SERVER_CERT_FILE";
const ENV_SERVER_KEY: &str = "SERVER_KEY_FILE";
const ENV_PREVIOUS_CAS: &str = "AGENT_CA_PREVIOUS_CERT_FILES";

/// Files under `<data_dir>/pki/`.
const PKI_DIR: &str = "pki";
const DEV_CA_CERT: &str = "ca.crt";
const DEV_CA_KEY: &str = "ca.key";
const DEV_SERVER_CERT: &str = "server.crt";
const DEV_SERVER_KEY: &str = "server.key";
const CA_BUNDLE: &str = "ca-bundle.pem";

const DAY_SECS: i64 = 24 * 60 * 60;
/// Lifetime of a generated dev CA.
const DEV_CA_LIFETIME_SECS: i64 = 3650 * DAY_SECS;
/// Lifetime of a generated dev server certificate.
const DEV_SERVER_LIFETIME_SECS: i64 = 365 * DAY_SECS;
/// A dev server certificate expiring within this window is re-issued at start-up.
const SERVER_RENEW_BEFORE_SECS: i64 = 30 * DAY_SECS;
/// Back-dating of generated CA and server certificates (clock skew).
const DEV_BACKDATE_SECS: i64 = 5 * 60;
/// Back-dating of agent certificates (clock skew).
const AGENT_BACKDATE_SECS: i64 = 60;
/// Names always present in a generated server certificate.
const DEFAULT_SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const MODE_DIR: u32 = 0o700;
const MODE_KEY: u32 = 0o600;
const MODE_PUBLIC: u32 = 0o644;

/// How the PKI is sourced. Paths are the `*_FILE` variables; `data_dir` is `NKUDO_DATA_DIR`.
#[derive(Debug, Clone)]
pub struct PkiConfig {
    /// The dev PKI and the CA bundle live in `<data_dir>/pki/`.
    pub data_dir: PathBuf,
    /// `CA_CERT_FILE`: PEM agent CA certificate (the first certificate of the file is used).
    pub ca_cert_file: Option<PathBuf>,
    /// `CA_KEY_FILE`: PEM private key of the agent CA.
    pub ca_key_file: Option<PathBuf>,
    /// `SERVER_CERT_FILE`: PEM server certificate chain, leaf first.
    pub server_cert_file: Option<PathBuf>,
    /// `SERVER_KEY_FILE`: PEM private key of the server certificate.
    pub server_key_file: Option<PathBuf>,
    /// `AGENT_CA_PREVIOUS_CERT_FILES`: PEM certificates of retired agent CAs (every certificate of
    /// every file). Client certificates they issued are still accepted and they are part of the CA
    /// bundle, but no certificate is issued by them. A certificate equal to the current CA is ignored.
    pub previous_ca_cert_files: Vec<PathBuf>,
    /// `REQUIRE_PERSISTENT_PKI`: all four files are required.
    pub require_persistent: bool,
    /// Common name of a generated dev CA.
    pub ca_common_name: String,
    /// DNS names / IP literals the dev server certificate must cover (besides `localhost`,
    /// `127.0.0.1` and `::1`, which are always included).
    pub server_names: Vec<String>,
}

/// Errors of the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `REQUIRE_PERSISTENT_PKI` is set and some of the four files are not.
    #[error("REQUIRE_PERSISTENT_PKI is set but {} not set", describe_missing(.missing))]
    MissingPersistentFiles {
        /// The unset variables, e.g. `CA_KEY_FILE`.
        missing: Vec<&'static str>,
    },
    /// One file of a cert/key pair without the other.
    #[error("{set} is set but {unset} is not: set both or neither")]
    IncompletePair {
        /// The variable that is set.
        set: &'static str,
        /// The variable that is missing.
        unset: &'static str,
    },
    /// The dev CA on disk has a certificate without a key or the other way round.
    #[error(
        "dev PKI in {} is incomplete: {present} exists but {missing} does not; restore it, or \
         delete {present} to create a new CA (this invalidates every enrolled agent)",
        .dir.display()
    )]
    IncompleteDevCa {
        /// The dev PKI directory.
        dir: PathBuf,
        /// The file that exists.
        present: &'static str,
        /// The file that is missing.
        missing: &'static str,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A certificate or key file is unusable.
    #[error("{}: {reason}", .path.display())]
    InvalidFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configured server name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}: expected a DNS name or an IP address")]
    InvalidServerName(String),
    /// An agent identity field cannot be put into a certificate.
    #[error("invalid agent identity: {0}")]
    InvalidIdentity(String),
    /// The requested certificate lifetime is zero or out of range.
    #[error("invalid certificate lifetime {0:?}")]
    InvalidTtl(Duration),
    /// The certificate signing request is malformed, badly signed or uses an unsupported key.
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    /// Generating or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Building the TLS configuration failed (e.g. the server key does not match its certificate).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// An unexpected internal failure (a generated value that does not round-trip).
    #[error("internal PKI error: {0}")]
    Internal(String),
}

fn describe_missing(missing: &[&'static str]) -> String {
    match missing {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(", ")),
    }
}

/// The identity an agent certificate is issued for.
#[derive(Debug, Clone, Copy)]
pub struct AgentIdentity<'a> {
    /// Tenant id (UUID string).
    pub tenant_id: &'a str,
    /// Site id (UUID string).
    pub site_id: &'a str,
    /// Agent id (UUID string); becomes the certificate CN.
    pub agent_id: &'a str,
}

/// A freshly issued agent certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate (PEM, one block).
    pub cert_pem: String,
    /// Serial number: lowercase hex, big-endian, no leading zero bytes (same as [`peer_identity`]).
    pub serial_hex: String,
    /// `notAfter` in Unix milliseconds.
    pub not_after_ms: i64,
}

/// What the server learned from a client certificate at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject CN (the agent id for certificates this module issues).
    pub agent_id: String,
    /// Serial number in the same form as [`IssuedCert::serial_hex`].
    pub serial_hex: String,
    /// `notAfter` in Unix milliseconds.
    pub not_after_ms: i64,
    /// The key identifier of the authorityKeyIdentifier extension, when the certificate has one.
    pub authority_key_id: Option<Vec<u8>>,
    /// The issuer name (DER).
    pub issuer: Vec<u8>,
}

/// Which agent CA issued a client certificate that passed the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentCa {
    /// The CA that issues certificates now (`CA_CERT_FILE` or the dev CA).
    Current,
    /// A CA listed in `AGENT_CA_PREVIOUS_CERT_FILES`: the agent should renew.
    Previous,
}

impl AgentCa {
    /// The `ca` label value: `current` or `previous`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentCa::Current => "current",
            AgentCa::Previous => "previous",
        }
    }
}

/// The loaded PKI: agent CA, previous agent CAs, server TLS configuration and CA bundle.
pub struct Pki {
    ca: Ca,
    previous: Vec<PreviousCa>,
    /// The authorityKeyIdentifier every certificate issued by the current CA carries.
    current_key_id: Vec<u8>,
    /// The current CA's subject (DER), for certificates without authorityKeyIdentifier.
    current_subject: Vec<u8>,
    ca_bundle_pem: String,
    ca_bundle_path: PathBuf,
    server_config: Arc<ServerConfig>,
    /// `nkudo_agent_heartbeats_by_ca_total{ca}` (registered by [`Pki::register_metrics`]).
    heartbeats_by_ca: IntCounterVec,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca_bundle_path", &self.ca_bundle_path)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the persistent files and/or loads or creates the dev PKI under `<data_dir>/pki/`,
    /// writes `<data_dir>/pki/ca-bundle.pem` and builds the server TLS configuration.
    pub fn load_or_create(cfg: &PkiConfig) -> Result<Pki, PkiError> {
        if cfg.require_persistent {
            let missing: Vec<&'static str> = [
                (ENV_CA_CERT, &cfg.ca_cert_file),
                (ENV_CA_KEY, &cfg.ca_key_file),
                (ENV_SERVER_CERT, &cfg.server_cert_file),
                (ENV_SERVER_KEY, &cfg.server_key_file),
            ]
            .into_iter()
            .filter(|(_, path)| path.is_none())
            .map(|(name, _)| name)
            .collect();
            if !missing.is_empty() {
                return Err(PkiError::MissingPersistentFiles { missing });
            }
        }
        let ca_files = file_pair(&cfg.ca_cert_file, &cfg.ca_key_file, ENV_CA_CERT, ENV_CA_KEY)?;
        let server_files = file_pair(
            &cfg.server_cert_file,
            &cfg.server_key_file,
            ENV_SERVER_CERT,
            ENV_SERVER_KEY,
        )?;
        let names = required_server_names(&cfg.server_names)?;

        let dir = cfg.data_dir.join(PKI_DIR);
        ensure_private_dir(&dir)?;

        let ca = match ca_files {
            Some((cert, key)) => {
                let ca = Ca::from_pem(&read_file(cert)?, &read_file(key)?, cert, key)?;
                tracing::info!(cert = %cert.display(), "agent CA loaded");
                ca
            }
            None => load_or_create_dev_ca(&dir, &cfg.ca_common_name)?,
        };
        let previous = load_previous_cas(&cfg.previous_ca_cert_files, &ca)?;
        let server = match server_files {
            Some((cert, key)) => load_server_files(cert, key, &names)?,
            None => load_or_create_dev_server(&dir, &ca, &previous, &names)?,
        };

        let ca_bundle_pem = build_ca_bundle(&ca, &previous, &server.chain)?;
        let ca_bundle_path = dir.join(CA_BUNDLE);
        write_atomic(&ca_bundle_path, ca_bundle_pem.as_bytes(), MODE_PUBLIC)?;

        let client_roots: Vec<&CertificateDer<'static>> = std::iter::once(&ca.der)
            .chain(previous.iter().map(|p| &p.der))
            .collect();
        let server_config = build_server_config(&client_roots, server.chain, server.key).map_err(|e| {
            PkiError::Tls(format!(
                "server certificate {} with key {}: {e}",
                server.cert_path.display(),
                server.key_path.display()
            ))
        })?;

        let current_subject = x509_parser::parse_x509_certificate(ca.der.as_ref())
            .map(|(_, c)| c.subject().as_raw().to_vec())
            .map_err(|e| PkiError::Internal(format!("agent CA does not parse back: {e}")))?;
        let current_key_id = ca.issuer.key_identifier();
        let heartbeats_by_ca = IntCounterVec::new(
            Opts::new(
                "nkudo_agent_heartbeats_by_ca_total",
                "Agent heartbeats by the agent CA that issued the client certificate (previous: a CA of \
                 AGENT_CA_PREVIOUS_CERT_FILES; the agent is told to renew)",
            ),
            &["ca"],
        )
        .map_err(|e| PkiError::Internal(format!("metric: {e}")))?;
        for ca in [AgentCa::Current, AgentCa::Previous] {
            heartbeats_by_ca.with_label_values(&[ca.as_str()]);
        }

        Ok(Pki {
            ca,
            previous,
            current_key_id,
            current_subject,
            ca_bundle_pem,
            ca_bundle_path,
            server_config,
            heartbeats_by_ca,
        })
    }

    /// Registers the PKI's metrics (`nkudo_agent_heartbeats_by_ca_total`) into `registry`.
    pub fn register_metrics(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.heartbeats_by_ca.clone()))
    }

    /// Counts a heartbeat by the CA that issued the agent's certificate.
    pub fn count_heartbeat(&self, ca: AgentCa) {
        self.heartbeats_by_ca.with_label_values(&[ca.as_str()]).inc();
    }

    /// Which agent CA issued a client certificate the handshake accepted (so it chains to the
    /// current CA or to a previous one). Certificates issued by this module carry the issuing CA's
    /// key identifier (authorityKeyIdentifier): one that is not the current CA's comes from a
    /// previous CA, even when both CAs share their name. Without the extension, the issuer name
    /// decides. With no previous CA configured the answer is always [`AgentCa::Current`].
    pub fn agent_ca_of(&self, peer: &PeerIdentity) -> AgentCa {
        if self.previous.is_empty() {
            return AgentCa::Current;
        }
        let current = match &peer.authority_key_id {
            Some(key_id) => *key_id == self.current_key_id,
            None => peer.issuer == self.current_subject,
        };
        if current {
            AgentCa::Current
        } else {
            AgentCa::Previous
        }
    }

    /// The PEM bundle handed to agents: the current agent CA, the previous agent CAs and, when none
    /// of them issued the server certificate, the anchor of the server chain. It lets an agent verify
    /// the server whichever of these CAs issued its certificate.
    pub fn ca_bundle_pem(&self) -> &str {
        &self.ca_bundle_pem
    }

    /// The file holding [`Pki::ca_bundle_pem`]: `<data_dir>/pki/ca-bundle.pem`.
    pub fn ca_bundle_path(&self) -> &Path {
        &self.ca_bundle_path
    }

    /// The rustls server configuration (ring provider, TLS 1.3, ALPN `h2` + `http/1.1`, optional
    /// client certificates verified against the current and the previous agent CAs). Built once at
    /// load; each call returns
    /// the same shared configuration.
    pub fn server_tls_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        Ok(Arc::clone(&self.server_config))
    }

    /// Verifies the CSR's self-signature and issues an agent certificate for `id`, valid from one
    /// minute ago until `now + ttl`. The CSR only contributes its public key (ECDSA P-256/P-384,
    /// Ed25519 or RSA 2048–4096 bits); its subject and extensions are ignored.
    pub fn sign_agent_csr(&self, csr_pem: &str, id: &AgentIdentity, ttl: Duration) -> Result<IssuedCert, PkiError> {
        validate_identity(id)?;
        let key = CsrPublicKey::from_pem(csr_pem)?;

        let now = unix_now();
        let not_after = i64::try_from(ttl.as_secs())
            .ok()
            .filter(|secs| *secs > 0)
            .and_then(|secs| now.checked_add(secs))
            .and_then(|secs| ASN1Time::from_timestamp(secs).ok())
            .ok_or(PkiError::InvalidTtl(ttl))?;
        let not_before = asn1_time(now - AGENT_BACKDATE_SECS)?;

        let mut params = CertificateParams::default();
        params.serial_number = Some(random_serial());
        params.not_before = not_before.to_datetime();
        params.not_after = not_after.to_datetime();
        params.distinguished_name = distinguished_name(id.agent_id, "n-kudo-agent");
        let uri = format!(
            "spiffe://nkudo/tenant/{}/site/{}/agent/{}",
            id.tenant_id, id.site_id, id.agent_id
        );
        let uri = Ia5String::try_from(uri).map_err(|e| PkiError::InvalidIdentity(format!("SAN URI: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if key.is_rsa() {
            // keyEncipherment is meaningful (and allowed, RFC 5480/8410) for RSA keys only.
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;

        let cert = params.signed_by(&key, &self.ca.issuer, &self.ca.key)?;
        let issued = peer_identity(cert.der())
            .ok_or_else(|| PkiError::Internal("the issued certificate cannot be parsed back".to_string()))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial_hex: issued.serial_hex,
            not_after_ms: issued.not_after_ms,
        })
    }
}

/// Reads CN, serial and `notAfter` from a DER certificate (the client certificate presented at
/// the handshake). `None` when the DER does not parse or has no UTF-8 CN.
pub fn peer_identity(cert_der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let agent_id = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let not_after_ms = cert.validity().not_after.timestamp().checked_mul(1000)?;
    let authority_key_id = cert.iter_extensions().find_map(|ext| match ext.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|id| id.0.to_vec()),
        _ => None,
    });
    Some(PeerIdentity {
        agent_id,
        serial_hex: serial_hex(cert.raw_serial()),
        not_after_ms,
        authority_key_id,
        issuer: cert.issuer().as_raw().to_vec(),
    })
}

/// Lowercase hex of the serial's big-endian bytes without leading zero bytes (`00` for zero).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let trimmed = &raw[start..];
    if trimmed.is_empty() {
        "00".to_string()
    } else {
        hex::encode(trimmed)
    }
}

/// A random positive 128-bit serial whose first byte is in 0x01..=0x7f (16 DER bytes, no sign
/// padding, never zero).
fn random_serial() -> SerialNumber {
    let mut rng = rand::thread_rng();
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes[..]);
    bytes[0] = rng.gen_range(0x01..=0x7f);
    SerialNumber::from_slice(&bytes)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn asn1_time(secs: i64) -> Result<ASN1Time, PkiError> {
    ASN1Time::from_timestamp(secs).map_err(|e| PkiError::Internal(format!("time {secs}: {e}")))
}

fn distinguished_name(common_name: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    dn
}

/// Characters allowed in identity fields: URI "unreserved" (RFC 3986), so the SAN URI stays
/// well-formed and unambiguous.
fn validate_identity(id: &AgentIdentity) -> Result<(), PkiError> {
    for (field, value) in [
        ("tenant_id", id.tenant_id),
        ("site_id", id.site_id),
        ("agent_id", id.agent_id),
    ] {
        if value.is_empty() || value.len() > 64 {
            return Err(PkiError::InvalidIdentity(format!("{field} must be 1 to 64 characters")));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            return Err(PkiError::InvalidIdentity(format!(
                "{field} {value:?} may only contain letters, digits, '-', '.', '_' and '~'"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CSR handling
// ---------------------------------------------------------------------------------------------

/// The public key of a verified CSR, in the form rcgen needs to put it into a certificate.
struct CsrPublicKey {
    /// Content of the SubjectPublicKeyInfo BIT STRING.
    raw: Vec<u8>,
    /// rcgen algorithm whose key OIDs describe the key (rsaEncryption, id-ecPublicKey + curve,
    /// or Ed25519).
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &SignatureAlgorithm {
        self.alg
    }
}

impl CsrPublicKey {
    fn is_rsa(&self) -> bool {
        self.alg == &rcgen::PKCS_RSA_SHA256
    }

    fn from_pem(csr_pem: &str) -> Result<Self, PkiError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| PkiError::Csr(format!("no PEM \"CERTIFICATE REQUEST\" block found ({e})")))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| PkiError::Csr(format!("malformed DER: {e}")))?;
        if !rest.is_empty() {
            return Err(PkiError::Csr("trailing data after the request".to_string()));
        }
        let sig_alg = &csr.signature_algorithm.algorithm;
        if *sig_alg == OID_PKCS1_SHA1WITHRSA || *sig_alg == OID_SHA1_WITH_RSA {
            return Err(PkiError::Csr("SHA-1 signatures are not accepted".to_string()));
        }
        let spki = &csr.certification_request_info.subject_pki;
        let alg = classify_key(spki)?;
        csr.verify_signature()
            .map_err(|e| PkiError::Csr(format!("the request's self-signature does not verify ({e})")))?;
        Ok(CsrPublicKey {
            raw: spki.subject_public_key.data.to_vec(),
            alg,
        })
    }
}

/// Accepts ECDSA P-256/P-384, Ed25519 and RSA 2048–4096 bits.
fn classify_key(spki: &SubjectPublicKeyInfo) -> Result<&'static SignatureAlgorithm, PkiError> {
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(PkiError::Csr("malformed RSA public key".to_string()));
        };
        let bits = bit_length(rsa.modulus);
        if !(2048..=4096).contains(&bits) {
            return Err(PkiError::Csr(format!(
                "RSA key of {bits} bits: 2048 to 4096 bits are accepted"
            )));
        }
        Ok(&rcgen::PKCS_RSA_SHA256)
    } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => Ok(&rcgen::PKCS_ECDSA_P256_SHA256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(&rcgen::PKCS_ECDSA_P384_SHA384),
            _ => Err(PkiError::Csr(
                "unsupported elliptic curve: P-256 and P-384 are accepted".to_string(),
            )),
        }
    } else if *oid == OID_SIG_ED25519 {
        if spki.subject_public_key.data.len() != 32 {
            return Err(PkiError::Csr("malformed Ed25519 public key".to_string()));
        }
        Ok(&rcgen::PKCS_ED25519)
    } else {
        Err(PkiError::Csr(format!(
            "unsupported key algorithm {oid}: ECDSA P-256/P-384, Ed25519 and RSA are accepted"
        )))
    }
}

/// Bit length of a big-endian unsigned integer.
fn bit_length(bytes: &[u8]) -> usize {
    match bytes.iter().position(|b| *b != 0) {
        Some(i) => (bytes.len() - i - 1) * 8 + (8 - bytes[i].leading_zeros() as usize),
        None => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Agent CA
// ---------------------------------------------------------------------------------------------

/// The agent CA: its real certificate, and an rcgen issuer with the same subject and key.
struct Ca {
    der: CertificateDer<'static>,
    pem: String,
    /// Signing handle for rcgen (re-created from the CA's subject and key; only its subject,
    /// key identifier and key matter).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn from_pem(cert_pem: &[u8], key_pem: &[u8], cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let invalid_cert = |reason: String| PkiError::InvalidFile {
            path: cert_path.to_path_buf(),
            reason,
        };
        let der = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| invalid_cert(format!("no PEM certificate found ({e})")))?;
        let key = load_key_pair(key_pem).map_err(|reason| PkiError::InvalidFile {
            path: key_path.to_path_buf(),
            reason,
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| invalid_cert(format!("malformed certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(invalid_cert(
                "not a CA certificate (basicConstraints CA:TRUE is missing)".to_string(),
            ));
        }
        if let Ok(Some(ku)) = cert.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(invalid_cert(
                    "the key usage does not allow signing certificates (keyCertSign)".to_string(),
                ));
            }
        }
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::InvalidFile {
                path: key_path.to_path_buf(),
                reason: format!("the key does not match the certificate in {}", cert_path.display()),
            });
        }
        let now = unix_now();
        let not_after = cert.validity().not_after.timestamp();
        if not_after <= now {
            tracing::warn!(cert = %cert_path.display(), "the agent CA certificate has expired");
        } else if not_after - now < SERVER_RENEW_BEFORE_SECS {
            tracing::warn!(cert = %cert_path.display(), "the agent CA certificate expires within 30 days");
        }

        // rcgen signs "by a Certificate": re-create one with the CA's exact subject and key.
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen_name(cert.subject())
            .map_err(|e| invalid_cert(format!("subject name cannot be used for signing: {e}")))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ski = cert.iter_extensions().find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        });
        if let Some(ski) = ski {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        let issuer = params.self_signed(&key)?;
        // Issued certificates must name the CA byte for byte, or chains will not verify.
        let same_subject = x509_parser::parse_x509_certificate(issuer.der().as_ref())
            .map(|(_, c)| c.subject().as_raw() == cert.subject().as_raw())
            .unwrap_or(false);
        if !same_subject {
            return Err(invalid_cert(
                "subject name cannot be reproduced exactly when signing (repeated attribute \
                 types are not supported)"
                    .to_string(),
            ));
        }

        let pem = pem_encode("CERTIFICATE", der.as_ref());
        Ok(Ca {
            der: der.into_owned(),
            pem,
            issuer,
            key,
        })
    }

    /// Whether `cert` names this CA as issuer and carries a valid signature by its key.
    fn issued(&self, cert: &X509Certificate) -> bool {
        issued_by(&self.der, cert)
    }
}

/// Whether `cert` names the CA `ca_der` as issuer and carries a valid signature by its key.
fn issued_by(ca_der: &CertificateDer<'static>, cert: &X509Certificate) -> bool {
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca_der.as_ref()) else {
        return false;
    };
    cert.issuer().as_raw() == ca.subject().as_raw() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// A retired agent CA (certificate only, no key): trusted for client certificates and part of the
/// CA bundle, never used to issue.
struct PreviousCa {
    der: CertificateDer<'static>,
    pem: String,
}

/// Reads every certificate of every `AGENT_CA_PREVIOUS_CERT_FILES` file. Each must be a CA
/// certificate; the current CA and repeated certificates are skipped.
fn load_previous_cas(files: &[PathBuf], current: &Ca) -> Result<Vec<PreviousCa>, PkiError> {
    let mut previous: Vec<PreviousCa> = Vec::new();
    for path in files {
        let chain = read_cert_chain(path).map_err(|e| match e {
            PkiError::InvalidFile { path, reason } => PkiError::InvalidFile {
                path,
                reason: format!("{ENV_PREVIOUS_CAS}: {reason}"),
            },
            other => other,
        })?;
        for der in chain {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| PkiError::InvalidFile {
                path: path.clone(),
                reason: format!("{ENV_PREVIOUS_CAS}: malformed certificate: {e}"),
            })?;
            let subject = cert.subject().to_string();
            if !cert.is_ca() {
                return Err(PkiError::InvalidFile {
                    path: path.clone(),
                    reason: format!(
                        "{ENV_PREVIOUS_CAS}: {subject} is not a CA certificate (basicConstraints CA:TRUE is missing)"
                    ),
                });
            }
            if der.as_ref() == current.der.as_ref() {
                tracing::info!(cert = %path.display(), %subject, "previous agent CA is the current CA; ignored");
                continue;
            }
            if previous.iter().any(|p| p.der.as_ref() == der.as_ref()) {
                continue;
            }
            if cert.validity().not_after.timestamp() <= unix_now() {
                tracing::warn!(
                    cert = %path.display(),
                    %subject,
                    "previous agent CA has expired: the certificates it issued have expired too; remove it"
                );
            }
            tracing::info!(
                cert = %path.display(),
                %subject,
                "previous agent CA trusted for client certificates and in the CA bundle; nothing is issued by it"
            );
            let pem = pem_encode("CERTIFICATE", der.as_ref());
            previous.push(PreviousCa {
                der: der.into_owned(),
                pem,
            });
        }
    }
    Ok(previous)
}

/// Converts an X.509 name into rcgen's model, keeping string types (one attribute per RDN).
fn rcgen_name(name: &X509Name) -> Result<DistinguishedName, String> {
    use x509_parser::der_parser::asn1_rs::Tag;

    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("multi-valued or empty relative distinguished name".to_string());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| "attribute type OID out of range".to_string())?
            .collect();
        let value = attr.attr_value();
        let data = value.data;
        let text = || std::str::from_utf8(data).map_err(|_| "attribute is not valid text".to_string());
        let value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_string()),
            Tag::PrintableString => DnValue::PrintableString(text()?.try_into().map_err(|e| format!("{e}"))?),
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(|e| format!("{e}"))?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(|e| format!("{e}"))?),
            Tag::BmpString => DnValue::BmpString(BmpString::from_utf16be(data.to_vec()).map_err(|e| format!("{e}"))?),
            Tag::UniversalString => {
                DnValue::UniversalString(UniversalString::from_utf32be(data.to_vec()).map_err(|e| format!("{e}"))?)
            }
            other => return Err(format!("unsupported attribute string type {other}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn load_or_create_dev_ca(dir: &Path, common_name: &str) -> Result<Ca, PkiError> {
    let cert_path = dir.join(DEV_CA_CERT);
    let key_path = dir.join(DEV_CA_KEY);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => {
            tighten_key_permissions(&key_path)?;
            let ca = Ca::from_pem(&read_file(&cert_path)?, &read_file(&key_path)?, &cert_path, &key_path)?;
            tracing::info!(cert = %cert_path.display(), "dev agent CA loaded");
            Ok(ca)
        }
        (true, false) => Err(PkiError::IncompleteDevCa {
            dir: dir.to_path_buf(),
            present: DEV_CA_CERT,
            missing: DEV_CA_KEY,
        }),
        (false, true) => Err(PkiError::IncompleteDevCa {
            dir: dir.to_path_buf(),
            present: DEV_CA_KEY,
            missing: DEV_CA_CERT,
        }),
        (false, false) => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let now = unix_now();
            let mut params = CertificateParams::default();
            params.serial_number = Some(random_serial());
            params.not_before = asn1_time(now - DEV_BACKDATE_SECS)?.to_datetime();
            params.not_after = asn1_time(now + DEV_CA_LIFETIME_SECS)?.to_datetime();
            params.distinguished_name = distinguished_name(common_name, "n-kudo");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            let cert_pem = cert.pem();
            let key_pem = key.serialize_pem();
            write_atomic(&key_path, key_pem.as_bytes(), MODE_KEY)?;
            write_atomic(&cert_path, cert_pem.as_bytes(), MODE_PUBLIC)?;
            tracing::info!(cert = %cert_path.display(), "dev agent CA created");
            // Same path as a restart, so the first start behaves exactly like later ones.
            Ca::from_pem(cert_pem.as_bytes(), key_pem.as_bytes(), &cert_path, &key_path)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server certificate
// ---------------------------------------------------------------------------------------------

struct ServerMaterial {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// A name the server certificate must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SanName {
    Dns(String),
    Ip(IpAddr),
}

impl fmt::Display for SanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanName::Dns(name) => f.write_str(name),
            SanName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

fn required_server_names(configured: &[String]) -> Result<Vec<SanName>, PkiError> {
    let mut names: Vec<SanName> = Vec::new();
    let all = DEFAULT_SERVER_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(configured.iter().cloned());
    for raw in all {
        let trimmed = raw.trim();
        let bare = trimmed
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(trimmed);
        if bare.is_empty() {
            continue;
        }
        let name = match bare.parse::<IpAddr>() {
            Ok(ip) => SanName::Ip(ip),
            Err(_) => {
                let lower = bare.to_ascii_lowercase();
                if DnsName::try_from(lower.as_str()).is_err() {
                    return Err(PkiError::InvalidServerName(raw));
                }
                SanName::Dns(lower)
            }
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// The names in a certificate's SAN extension.
fn certificate_names(cert: &X509Certificate) -> Vec<SanName> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(SanName::Dns(dns.to_ascii_lowercase())),
            GeneralName::IPAddress(octets) => match octets.len() {
                4 => <[u8; 4]>::try_from(*octets).ok().map(|o| SanName::Ip(IpAddr::from(o))),
                16 => <[u8; 16]>::try_from(*octets).ok().map(|o| SanName::Ip(IpAddr::from(o))),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn missing_names(cert: &X509Certificate, required: &[SanName]) -> Vec<String> {
    let present = certificate_names(cert);
    required
        .iter()
        .filter(|name| !present.contains(name))
        .map(ToString::to_string)
        .collect()
}

fn load_server_files(cert_path: &Path, key_path: &Path, names: &[SanName]) -> Result<ServerMaterial, PkiError> {
    let chain = read_cert_chain(cert_path)?;
    let key = read_private_key(key_path)?;
    if let Some(leaf) = chain.first() {
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
            let left = cert.validity().not_after.timestamp() - unix_now();
            if left <= 0 {
                tracing::warn!(cert = %cert_path.display(), "the server certificate has expired");
            } else if left < SERVER_RENEW_BEFORE_SECS {
                tracing::warn!(cert = %cert_path.display(), "the server certificate expires within 30 days");
            }
            let missing = missing_names(&cert, names);
            if !missing.is_empty() {
                tracing::warn!(
                    cert = %cert_path.display(),
                    missing = %missing.join(", "),
                    "the server certificate does not cover every configured server name"
                );
            }
        }
    }
    tracing::info!(cert = %cert_path.display(), "server certificate loaded");
    Ok(ServerMaterial {
        chain,
        key,
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
    })
}

fn load_or_create_dev_server(
    dir: &Path,
    ca: &Ca,
    previous: &[PreviousCa],
    names: &[SanName],
) -> Result<ServerMaterial, PkiError> {
    let cert_path = dir.join(DEV_SERVER_CERT);
    let key_path = dir.join(DEV_SERVER_KEY);
    if exists(&cert_path)? && exists(&key_path)? {
        tighten_key_permissions(&key_path)?;
        match check_dev_server(&cert_path, &key_path, ca, previous, names)? {
            Ok(material) => {
                tracing::info!(cert = %cert_path.display(), "dev server certificate loaded");
                return Ok(material);
            }
            Err(reason) => {
                tracing::info!(cert = %cert_path.display(), %reason, "re-issuing the dev server certificate");
            }
        }
    }
    let (cert_pem, key_pem) = generate_server_cert(ca, names, unix_now(), DEV_SERVER_LIFETIME_SECS)?;
    write_atomic(&key_path, key_pem.as_bytes(), MODE_KEY)?;
    write_atomic(&cert_path, cert_pem.as_bytes(), MODE_PUBLIC)?;
    tracing::info!(cert = %cert_path.display(), "dev server certificate created");
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| PkiError::Internal(format!("generated server certificate: {e}")))?];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| PkiError::Internal(format!("generated server key: {e}")))?;
    Ok(ServerMaterial {
        chain,
        key,
        cert_path,
        key_path,
    })
}

/// Loads the persisted dev server certificate; `Ok(Err(reason))` when it must be re-issued.
fn check_dev_server(
    cert_path: &Path,
    key_path: &Path,
    ca: &Ca,
    previous: &[PreviousCa],
    names: &[SanName],
) -> Result<Result<ServerMaterial, String>, PkiError> {
    let cert_pem = read_file(cert_path)?;
    let key_pem = read_file(key_path)?;
    let Ok(leaf) = CertificateDer::from_pem_slice(&cert_pem) else {
        return Ok(Err("no certificate in the file".to_string()));
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Ok(Err("malformed certificate".to_string()));
    };
    // A certificate of a previous CA stays during a rotation: agents that only trust that CA keep
    // verifying the server until they renewed and received the new bundle.
    if !ca.issued(&cert) && !previous.iter().any(|p| issued_by(&p.der, &cert)) {
        return Ok(Err(
            "issued neither by the current nor by a previous agent CA".to_string()
        ));
    }
    if cert.validity().not_after.timestamp() - unix_now() < SERVER_RENEW_BEFORE_SECS {
        return Ok(Err("expires within 30 days".to_string()));
    }
    let missing = missing_names(&cert, names);
    if !missing.is_empty() {
        return Ok(Err(format!("does not cover {}", missing.join(", "))));
    }
    let Ok(key_pair) = load_key_pair(&key_pem) else {
        return Ok(Err("unusable private key".to_string()));
    };
    if key_pair.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Ok(Err("the private key does not match".to_string()));
    }
    let Ok(key) = PrivateKeyDer::from_pem_slice(&key_pem) else {
        return Ok(Err("unusable private key".to_string()));
    };
    Ok(Ok(ServerMaterial {
        chain: vec![leaf.into_owned()],
        key,
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
    }))
}

/// Issues an ECDSA P-256 server certificate for `names`, signed by the CA. Returns (cert, key) PEM.
fn generate_server_cert(
    ca: &Ca,
    names: &[SanName],
    now: i64,
    lifetime_secs: i64,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.serial_number = Some(random_serial());
    params.not_before = asn1_time(now - DEV_BACKDATE_SECS)?.to_datetime();
    params.not_after = asn1_time(now + lifetime_secs)?.to_datetime();
    params.distinguished_name = distinguished_name("n-kudo control plane", "n-kudo");
    params.subject_alt_names = names
        .iter()
        .map(|name| match name {
            SanName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            SanName::Dns(dns) => Ia5String::try_from(dns.as_str())
                .map(SanType::DnsName)
                .map_err(|_| PkiError::InvalidServerName(dns.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer, &ca.key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The agent CA, the previous agent CAs, plus the last certificate of the server chain when the
/// server certificate is issued by none of them.
fn build_ca_bundle(
    ca: &Ca,
    previous: &[PreviousCa],
    server_chain: &[CertificateDer<'static>],
) -> Result<String, PkiError> {
    let mut bundle = ca.pem.clone();
    for p in previous {
        bundle.push_str(&p.pem);
    }
    let Some(leaf) = server_chain.first() else {
        return Err(PkiError::Internal("empty server certificate chain".to_string()));
    };
    let issued_by_ca = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map(|(_, cert)| ca.issued(&cert) || previous.iter().any(|p| issued_by(&p.der, &cert)))
        .unwrap_or(false);
    if !issued_by_ca {
        if let Some(anchor) = server_chain.last() {
            let known =
                anchor.as_ref() == ca.der.as_ref() || previous.iter().any(|p| p.der.as_ref() == anchor.as_ref());
            if !known {
                bundle.push_str(&pem_encode("CERTIFICATE", anchor.as_ref()));
            }
        }
    }
    Ok(bundle)
}

fn build_server_config(
    client_roots: &[&CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for root in client_roots {
        roots
            .add((*root).clone())
            .map_err(|e| format!("agent CA as trust anchor: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Keys and PEM
// ---------------------------------------------------------------------------------------------

/// DER AlgorithmIdentifier of rsaEncryption (NULL parameters).
const ALG_RSA: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// DER AlgorithmIdentifier of id-ecPublicKey with prime256v1.
const ALG_EC_P256: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
    0x01, 0x07,
];
/// DER AlgorithmIdentifier of id-ecPublicKey with secp384r1.
const ALG_EC_P384: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22,
];

/// Loads a signing key for rcgen from PEM: PKCS#8 (ECDSA P-256/P-384, Ed25519, RSA), SEC1 EC or
/// PKCS#1 RSA (the latter two are re-wrapped as PKCS#8, which is what rcgen/ring accept).
fn load_key_pair(pem: &[u8]) -> Result<KeyPair, String> {
    let der = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no unencrypted PEM private key (PKCS#8, SEC1 or PKCS#1) found ({e})"))?;
    let unsupported = |e: rcgen::Error| format!("unsupported private key: {e}");
    match &der {
        PrivateKeyDer::Pkcs8(pkcs8) => KeyPair::try_from(pkcs8).map_err(unsupported),
        PrivateKeyDer::Pkcs1(pkcs1) => {
            let wrapped = PrivatePkcs8KeyDer::from(wrap_pkcs8(ALG_RSA, pkcs1.secret_pkcs1_der()));
            KeyPair::try_from(&wrapped).map_err(unsupported)
        }
        PrivateKeyDer::Sec1(sec1) => {
            let mut last = None;
            for alg in [ALG_EC_P256, ALG_EC_P384] {
                let wrapped = PrivatePkcs8KeyDer::from(wrap_pkcs8(alg, sec1.secret_sec1_der()));
                match KeyPair::try_from(&wrapped) {
                    Ok(key) => return Ok(key),
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) => {
                    format!("unsupported EC private key (P-256 and P-384 are supported): {e}")
                }
                None => "unsupported EC private key".to_string(),
            })
        }
        _ => Err("unsupported private key format".to_string()),
    }
}

/// PKCS#8 PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }.
fn wrap_pkcs8(algorithm: &[u8], private_key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm);
    body.extend(der_tlv(0x04, private_key));
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = read_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::InvalidFile {
            path: path.to_path_buf(),
            reason: format!("malformed PEM: {e}"),
        })?;
    if chain.is_empty() {
        return Err(PkiError::InvalidFile {
            path: path.to_path_buf(),
            reason: "no PEM certificate found".to_string(),
        });
    }
    Ok(chain)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| PkiError::InvalidFile {
        path: path.to_path_buf(),
        reason: format!("no unencrypted PEM private key (PKCS#8, SEC1 or PKCS#1) found ({e})"),
    })
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// "Both or neither" for a cert/key pair of variables.
fn file_pair<'a>(
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
    cert_var: &'static str,
    key_var: &'static str,
) -> Result<Option<(&'a Path, &'a Path)>, PkiError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert.as_path(), key.as_path()))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(PkiError::IncompletePair {
            set: cert_var,
            unset: key_var,
        }),
        (None, Some(_)) => Err(PkiError::IncompletePair {
            set: key_var,
            unset: cert_var,
        }),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(io_err(path))
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(io_err(path))
}

/// Creates `dir` (and missing parents) with mode 0700 and forces 0700 on `dir` itself.
fn ensure_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(MODE_DIR);
    }
    builder.create(dir).map_err(io_err(dir))?;
    set_mode(dir, MODE_DIR)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), PkiError> {
    Ok(())
}

/// Resets a dev key file readable by group or others to 0600.
fn tighten_key_permissions(path: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).map_err(io_err(path))?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(key = %path.display(), mode = format!("{:o}", mode & 0o777), "key file was readable by others; resetting to 0600");
            set_mode(path, MODE_KEY)?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes `data` to `path` atomically (see [`nkudo_core::fsutil::write_atomic`]).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    nkudo_core::fsutil::write_atomic(path, data, mode).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const TTL: Duration = Duration::from_secs(24 * 60 * 60);
    const ID: AgentIdentity<'static> = AgentIdentity {
        tenant_id: "7d9f1c3e-0000-4000-8000-000000000001",
        site_id: "7d9f1c3e-0000-4000-8000-000000000002",
        agent_id: "7d9f1c3e-0000-4000-8000-000000000003",
    };

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "nkudo-pki-{tag}-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dev_config(data_dir: &Path) -> PkiConfig {
        PkiConfig {
            data_dir: data_dir.to_path_buf(),
            ca_cert_file: None,
            ca_key_file: None,
            server_cert_file: None,
            server_key_file: None,
            previous_ca_cert_files: Vec::new(),
            require_persistent: false,
            ca_common_name: "n-kudo-agent-ca".to_string(),
            server_names: vec!["cp.example.com".to_string(), "10.1.2.3".to_string()],
        }
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).expect("parse certificate").1
    }

    fn first_cert_der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
    }

    fn rcgen_csr(alg: &'static SignatureAlgorithm) -> (String, KeyPair) {
        let key = KeyPair::generate_for(alg).expect("key");
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).expect("CSR params");
        params.distinguished_name = distinguished_name("admin", "evil corp");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).expect("CSR");
        (csr.pem().expect("CSR PEM"), key)
    }

    /// Runs openssl; `None` (with a loud message) when it is not installed, unless CI=true.
    fn openssl(args: &[&str]) -> Option<()> {
        match Command::new("openssl").args(args).output() {
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "openssl {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Some(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "openssl is required in CI");
                eprintln!("!!!!! SKIPPED: openssl is not installed; the openssl-based test did not run !!!!!");
                None
            }
            Err(e) => panic!("running openssl: {e}"),
        }
    }

    fn read_string(path: &Path) -> String {
        fs::read_to_string(path).expect("read file")
    }

    /// Checks an issued agent certificate: identity, extensions, serial, validity, issuer.
    fn assert_agent_cert(pki: &Pki, issued: &IssuedCert, key_encipherment: bool) {
        let der = first_cert_der(&issued.cert_pem);
        let cert = parse(der.as_ref());
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().expect("CN"))
            .collect();
        assert_eq!(cn, vec![ID.agent_id]);
        let o: Vec<_> = cert
            .subject()
            .iter_organization()
            .map(|a| a.as_str().expect("O"))
            .collect();
        assert_eq!(o, vec!["n-kudo-agent"]);
        let san = cert.subject_alternative_name().expect("SAN").expect("SAN present");
        let uri = format!(
            "spiffe://nkudo/tenant/{}/site/{}/agent/{}",
            ID.tenant_id, ID.site_id, ID.agent_id
        );
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(uri.as_str())],
            "only the SPIFFE URI, nothing from the CSR"
        );
        let eku = cert.extended_key_usage().expect("EKU").expect("EKU present");
        assert!(eku.value.client_auth);
        assert!(!eku.value.server_auth, "the CSR's EKU must be ignored");
        let ku = cert.key_usage().expect("KU").expect("KU present");
        assert!(ku.value.digital_signature());
        assert_eq!(ku.value.key_encipherment(), key_encipherment);
        assert!(!cert.is_ca());

        // Serial: 16 bytes, positive, first byte 0x01..=0x7f, same form everywhere.
        let raw = cert.raw_serial();
        assert_eq!(raw.len(), 16);
        assert!(raw[0] >= 1 && raw[0] < 0x80);
        assert_eq!(issued.serial_hex, hex::encode(raw));
        let peer = peer_identity(der.as_ref()).expect("peer identity");
        assert_eq!(peer.agent_id, ID.agent_id);
        assert_eq!(peer.serial_hex, issued.serial_hex);
        assert_eq!(peer.not_after_ms, issued.not_after_ms);

        // Validity: now - 1 min .. now + TTL.
        let now = unix_now();
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        assert!((now - 60 - 5..=now - 60 + 5).contains(&nb), "not_before {nb} now {now}");
        let want = now + TTL.as_secs() as i64;
        assert!((want - 5..=want + 5).contains(&na), "not_after {na} want {want}");
        assert_eq!(issued.not_after_ms, na * 1000);

        // Signed by the agent CA.
        assert!(pki.ca.issued(&cert), "agent certificate must be issued by the CA");
    }

    fn client_config(pki_bundle_pem: &str, client: Option<(&IssuedCert, &KeyPair)>) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pki_bundle_pem.as_bytes()) {
            roots.add(cert.expect("bundle PEM")).expect("trust anchor");
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots);
        let mut config = match client {
            Some((issued, key)) => builder
                .with_client_auth_cert(
                    vec![first_cert_der(&issued.cert_pem)],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A full TLS handshake plus one round trip over an in-memory pipe. Returns the identity
    /// the server saw, or the errors of both sides.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<Option<PeerIdentity>, String> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server)
                .accept(server_io)
                .await
                .map_err(|e| format!("server handshake: {e}"))?;
            let conn = tls.get_ref().1;
            assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
            let peer = conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| peer_identity(cert.as_ref()));
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| format!("server read: {e}"))?;
            tls.write_all(&buf).await.map_err(|e| format!("server write: {e}"))?;
            tls.shutdown().await.map_err(|e| format!("server shutdown: {e}"))?;
            Ok::<_, String>(peer)
        };
        let client_side = async move {
            let mut tls = TlsConnector::from(client)
                .connect(name, client_io)
                .await
                .map_err(|e| format!("client handshake: {e}"))?;
            tls.write_all(b"ping").await.map_err(|e| format!("client write: {e}"))?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| format!("client read: {e}"))?;
            if &buf != b"ping" {
                return Err("echo mismatch".to_string());
            }
            Ok::<_, String>(())
        };
        let (server_result, client_result) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(server_side, client_side)
        })
        .await
        .map_err(|_| "handshake timed out".to_string())?;
        match (server_result, client_result) {
            (Ok(peer), Ok(())) => Ok(peer),
            (s, c) => Err(format!("server: {:?}; client: {:?}", s.err(), c.err())),
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn pki_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pki>();
    }

    #[test]
    fn dev_pki_is_persisted_and_reloaded_with_the_same_ca() {
        let tmp = TempDir::new("reload");
        let cfg = dev_config(tmp.path());
        let first = Pki::load_or_create(&cfg).expect("create dev PKI");
        let dir = tmp.path().join("pki");
        for file in ["ca.crt", "ca.key", "server.crt", "server.key", "ca-bundle.pem"] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join("ca.key")), 0o600);
            assert_eq!(mode(&dir.join("server.key")), 0o600);
            assert_eq!(mode(&dir.join("ca.crt")), 0o644);
        }
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("read dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
        assert_eq!(first.ca_bundle_path(), dir.join("ca-bundle.pem"));
        assert_eq!(read_string(first.ca_bundle_path()), first.ca_bundle_pem());
        // The server certificate is issued by the CA, so the bundle is the CA alone.
        assert_eq!(first.ca_bundle_pem(), read_string(&dir.join("ca.crt")));
        assert_eq!(
            CertificateDer::pem_slice_iter(first.ca_bundle_pem().as_bytes()).count(),
            1
        );

        let ca_before = read_string(&dir.join("ca.crt"));
        let ca_key_before = read_string(&dir.join("ca.key"));
        let server_before = read_string(&dir.join("server.crt"));
        let (csr, _) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let issued = first.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        drop(first);

        let second = Pki::load_or_create(&cfg).expect("reload dev PKI");
        assert_eq!(read_string(&dir.join("ca.crt")), ca_before, "CA regenerated");
        assert_eq!(read_string(&dir.join("ca.key")), ca_key_before, "CA key regenerated");
        assert_eq!(
            read_string(&dir.join("server.crt")),
            server_before,
            "server certificate needlessly re-issued"
        );
        assert_eq!(second.ca_bundle_pem(), ca_before);
        // A certificate issued before the restart still chains to the reloaded CA.
        assert!(second.ca.issued(&parse(first_cert_der(&issued.cert_pem).as_ref())));
    }

    #[test]
    fn dev_ca_and_server_certificate_have_the_required_shape() {
        let tmp = TempDir::new("shape");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let dir = tmp.path().join("pki");

        let ca_der = first_cert_der(&read_string(&dir.join("ca.crt")));
        let ca = parse(ca_der.as_ref());
        assert!(ca.is_ca());
        let cn: Vec<_> = ca
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().expect("CN"))
            .collect();
        assert_eq!(cn, vec!["n-kudo-agent-ca"]);
        let o: Vec<_> = ca
            .subject()
            .iter_organization()
            .map(|a| a.as_str().expect("O"))
            .collect();
        assert_eq!(o, vec!["n-kudo"]);
        let ku = ca.key_usage().expect("KU").expect("KU present");
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert_eq!(ca.public_key().algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let ca_life = ca.validity().not_after.timestamp() - unix_now();
        assert!(ca_life > 3649 * DAY_SECS && ca_life <= 3650 * DAY_SECS);
        ca.verify_signature(None).expect("CA is self-signed");

        let server_der = first_cert_der(&read_string(&dir.join("server.crt")));
        let server = parse(server_der.as_ref());
        server
            .verify_signature(Some(ca.public_key()))
            .expect("server certificate signed by the CA");
        assert_eq!(server.issuer().as_raw(), ca.subject().as_raw());
        assert!(!server.is_ca());
        let eku = server.extended_key_usage().expect("EKU").expect("EKU present");
        assert!(eku.value.server_auth);
        let names = certificate_names(&server);
        for want in [
            SanName::Dns("localhost".into()),
            SanName::Dns("cp.example.com".into()),
            SanName::Ip("127.0.0.1".parse().expect("ip")),
            SanName::Ip("::1".parse().expect("ip")),
            SanName::Ip("10.1.2.3".parse().expect("ip")),
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let life = server.validity().not_after.timestamp() - unix_now();
        assert!(life > 364 * DAY_SECS && life <= 365 * DAY_SECS);
        // The Pki's own view agrees.
        assert!(pki.ca.issued(&server));
    }

    #[test]
    fn dev_server_certificate_is_reissued_by_the_same_ca_when_stale() {
        let tmp = TempDir::new("reissue");
        let dir = tmp.path().join("pki");
        let mut cfg = dev_config(tmp.path());
        let pki = Pki::load_or_create(&cfg).expect("create");
        let ca_pem = read_string(&dir.join("ca.crt"));
        let server_1 = read_string(&dir.join("server.crt"));

        // A new server name: re-issued, same CA.
        cfg.server_names.push("new.example.com".to_string());
        let _ = Pki::load_or_create(&cfg).expect("reload with a new name");
        let server_2 = read_string(&dir.join("server.crt"));
        assert_ne!(server_1, server_2);
        assert_eq!(read_string(&dir.join("ca.crt")), ca_pem);
        let der = first_cert_der(&server_2);

        let cert = parse(der.as_ref());
        assert!(certificate_names(&cert).contains(&SanName::Dns("new.example.com".into())));

        // Expiring within 30 days: re-issued.
        let names = required_server_names(&cfg.server_names).expect("names");
        let (short_pem, short_key) =
            generate_server_cert(&pki.ca, &names, unix_now(), 10 * DAY_SECS).expect("short cert");
        fs::write(dir.join("server.crt"), &short_pem).expect("write");
        fs::write(dir.join("server.key"), &short_key).expect("write");
        let _ = Pki::load_or_create(&cfg).expect("reload with an expiring cert");
        let server_3 = read_string(&dir.join("server.crt"));
        assert_ne!(server_3, short_pem, "expiring server certificate was kept");
        let der = first_cert_der(&server_3);

        let cert = parse(der.as_ref());
        assert!(cert.validity().not_after.timestamp() - unix_now() > 300 * DAY_SECS);
        assert_eq!(read_string(&dir.join("ca.crt")), ca_pem);

        // Unchanged configuration: kept.
        let _ = Pki::load_or_create(&cfg).expect("reload");
        assert_eq!(read_string(&dir.join("server.crt")), server_3);
    }

    #[test]
    fn dev_ca_with_a_missing_key_is_an_error_not_a_new_ca() {
        let tmp = TempDir::new("incomplete");
        let cfg = dev_config(tmp.path());
        let _ = Pki::load_or_create(&cfg).expect("create");
        fs::remove_file(tmp.path().join("pki/ca.key")).expect("remove key");
        let err = Pki::load_or_create(&cfg).expect_err("must refuse");
        assert!(matches!(err, PkiError::IncompleteDevCa { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn ecdsa_and_ed25519_csrs_are_signed_and_their_subject_is_ignored() {
        let tmp = TempDir::new("ecdsa");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let (csr, key) = rcgen_csr(alg);
            let issued = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
            assert_agent_cert(&pki, &issued, false);
            let cert_der = first_cert_der(&issued.cert_pem);
            let cert = parse(cert_der.as_ref());
            assert_eq!(
                cert.public_key().subject_public_key.data.as_ref(),
                key.public_key_raw(),
                "the certificate must carry the CSR's key"
            );
        }
    }

    #[test]
    fn serials_are_random() {
        let tmp = TempDir::new("serials");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let (csr, _) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let a = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let b = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_eq!(a.serial_hex.len(), 32);
        assert_eq!(a.serial_hex, a.serial_hex.to_ascii_lowercase());
    }

    #[test]
    fn openssl_rsa4096_csr_like_the_go_agent_is_signed() {
        let tmp = TempDir::new("rsa");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let csr_path = tmp.path().join("agent.csr");
        let key_path = tmp.path().join("agent.key");
        let csr_arg = csr_path.to_string_lossy().into_owned();
        let key_arg = key_path.to_string_lossy().into_owned();
        let args = [
            "req",
            "-new",
            "-newkey",
            "rsa:4096",
            "-nodes",
            "-subj",
            "/CN=edge-1",
            "-keyout",
            &key_arg,
            "-out",
            &csr_arg,
        ];
        if openssl(&args).is_none() {
            return;
        }
        let issued = pki
            .sign_agent_csr(&read_string(&csr_path), &ID, TTL)
            .expect("sign RSA-4096 CSR");
        assert_agent_cert(&pki, &issued, true);
        let der = first_cert_der(&issued.cert_pem);

        let cert = parse(der.as_ref());
        assert_eq!(cert.public_key().algorithm.algorithm, OID_PKCS1_RSAENCRYPTION);
        assert!(cert.subject().iter_common_name().all(|cn| cn.as_str() != Ok("edge-1")));
    }

    #[test]
    fn openssl_csr_with_extensions_rcgen_cannot_parse_is_signed_without_them() {
        let tmp = TempDir::new("exts");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let csr_path = tmp.path().join("agent.csr");
        let key_path = tmp.path().join("agent.key");
        let csr_arg = csr_path.to_string_lossy().into_owned();
        let key_arg = key_path.to_string_lossy().into_owned();
        let args = [
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-nodes",
            "-subj",
            "/CN=edge-2/O=evil",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=DNS:evil.example,IP:10.9.9.9",
            "-addext",
            "nsComment=ignored",
            "-keyout",
            &key_arg,
            "-out",
            &csr_arg,
        ];
        if openssl(&args).is_none() {
            return;
        }
        let issued = pki
            .sign_agent_csr(&read_string(&csr_path), &ID, TTL)
            .expect("sign CSR with foreign extensions");
        assert_agent_cert(&pki, &issued, false);
    }

    #[test]
    fn bad_csrs_are_refused() {
        let tmp = TempDir::new("badcsr");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let (csr, _) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .expect("CSR DER")
            .as_ref()
            .to_vec();

        // The untampered request is fine (the test below would be vacuous otherwise).
        pki.sign_agent_csr(&csr, &ID, TTL).expect("good CSR");

        // Flip a bit in the signature (last byte) and in the subject (inside the signed part).
        let mut bad_sig = der.clone();
        if let Some(last) = bad_sig.last_mut() {
            *last ^= 0x01;
        }
        let subject_at = der.windows(5).position(|w| w == b"admin").expect("subject CN in DER");
        let mut bad_subject = der.clone();
        bad_subject[subject_at] ^= 0x01;
        for (what, tampered) in [("signature", bad_sig), ("subject", bad_subject)] {
            let pem = pem_encode("CERTIFICATE REQUEST", &tampered);
            match pki.sign_agent_csr(&pem, &ID, TTL) {
                Err(PkiError::Csr(msg)) => assert!(msg.contains("signature"), "{what}: {msg}"),
                other => panic!("tampered {what} accepted or wrong error: {other:?}"),
            }
        }

        let cert_pem = pki.ca.pem.clone();
        let garbage_b64 = pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00");
        for (what, input) in [
            ("empty", String::new()),
            ("garbage", "not a csr at all".to_string()),
            ("wrong PEM type", cert_pem),
            ("garbage DER", garbage_b64),
            ("truncated", csr[..csr.len() / 2].to_string()),
        ] {
            match pki.sign_agent_csr(&input, &ID, TTL) {
                Err(PkiError::Csr(_)) => {}
                other => panic!("{what}: expected a CSR error, got {other:?}"),
            }
        }
    }

    #[test]
    fn weak_or_unsupported_csr_keys_are_refused() {
        let tmp = TempDir::new("weak");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        for (what, newkey) in [
            ("RSA 1024", vec!["-newkey", "rsa:1024"]),
            ("P-521", vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"]),
        ] {
            let csr_path = tmp.path().join("weak.csr");
            let key_path = tmp.path().join("weak.key");
            let csr_arg = csr_path.to_string_lossy().into_owned();
            let key_arg = key_path.to_string_lossy().into_owned();
            let mut args = vec!["req", "-new"];
            args.extend(newkey);
            args.extend(["-nodes", "-subj", "/CN=x", "-keyout", &key_arg, "-out", &csr_arg]);
            if openssl(&args).is_none() {
                return;
            }
            match pki.sign_agent_csr(&read_string(&csr_path), &ID, TTL) {
                Err(PkiError::Csr(_)) => {}
                other => panic!("{what}: expected a CSR error, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_identity_or_ttl_is_refused() {
        let tmp = TempDir::new("ident");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let (csr, _) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let bad = AgentIdentity { tenant_id: "a/b", ..ID };
        assert!(matches!(
            pki.sign_agent_csr(&csr, &bad, TTL),
            Err(PkiError::InvalidIdentity(_))
        ));
        let empty = AgentIdentity { agent_id: "", ..ID };
        assert!(matches!(
            pki.sign_agent_csr(&csr, &empty, TTL),
            Err(PkiError::InvalidIdentity(_))
        ));
        assert!(matches!(
            pki.sign_agent_csr(&csr, &ID, Duration::ZERO),
            Err(PkiError::InvalidTtl(_))
        ));
        assert!(matches!(
            pki.sign_agent_csr(&csr, &ID, Duration::MAX),
            Err(PkiError::InvalidTtl(_))
        ));
    }

    #[test]
    fn require_persistent_without_files_names_the_missing_variables() {
        let tmp = TempDir::new("require");
        let mut cfg = dev_config(tmp.path());
        cfg.require_persistent = true;
        let err = Pki::load_or_create(&cfg).expect_err("must fail");
        let msg = err.to_string();
        for var in ["CA_CERT_FILE", "CA_KEY_FILE", "SERVER_CERT_FILE", "SERVER_KEY_FILE"] {
            assert!(msg.contains(var), "{var} not named in {msg:?}");
        }
        assert!(!tmp.path().join("pki/ca.key").exists(), "no dev CA in production mode");

        cfg.ca_cert_file = Some(tmp.path().join("ca.pem"));
        cfg.ca_key_file = Some(tmp.path().join("ca.key"));
        let msg = Pki::load_or_create(&cfg).expect_err("must fail").to_string();
        assert!(
            msg.contains("SERVER_CERT_FILE") && msg.contains("SERVER_KEY_FILE"),
            "{msg}"
        );
        assert!(!msg.contains("CA_CERT_FILE"), "{msg}");
    }

    type SetFile = fn(&mut PkiConfig, PathBuf);

    #[test]
    fn one_file_of_a_pair_alone_is_an_error() {
        let tmp = TempDir::new("pair");
        let cases: [(&str, &str, SetFile); 4] = [
            ("CA_CERT_FILE", "CA_KEY_FILE", |c, p| c.ca_cert_file = Some(p)),
            ("CA_KEY_FILE", "CA_CERT_FILE", |c, p| c.ca_key_file = Some(p)),
            ("SERVER_CERT_FILE", "SERVER_KEY_FILE", |c, p| {
                c.server_cert_file = Some(p)
            }),
            ("SERVER_KEY_FILE", "SERVER_CERT_FILE", |c, p| {
                c.server_key_file = Some(p)
            }),
        ];
        for (set_var, unset_var, set) in cases {
            let mut cfg = dev_config(tmp.path());
            set(&mut cfg, tmp.path().join("x.pem"));
            match Pki::load_or_create(&cfg) {
                Err(err @ PkiError::IncompletePair { set, unset }) => {
                    assert_eq!((set, unset), (set_var, unset_var));
                    assert!(err.to_string().contains(unset_var));
                }
                other => panic!("{set_var} alone: {other:?}"),
            }
        }
    }

    /// Writes a CA (rcgen, any algorithm) as PEM files; returns (cert path, key path).
    fn write_rcgen_ca(
        dir: &Path,
        name: &str,
        alg: &'static SignatureAlgorithm,
    ) -> (PathBuf, PathBuf, rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate_for(alg).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name, "ops");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA");
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        fs::write(&cert_path, cert.pem()).expect("write");
        fs::write(&key_path, key.serialize_pem()).expect("write");
        (cert_path, key_path, cert, key)
    }

    /// Writes a server certificate for localhost signed by `issuer` (the file holds the chain
    /// leaf + issuer when `with_issuer`); returns (cert, key) paths.
    fn write_server_cert(
        dir: &Path,
        name: &str,
        issuer: &rcgen::Certificate,
        issuer_key: &KeyPair,
        with_issuer: bool,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, issuer, issuer_key).expect("server cert");
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        let mut chain = cert.pem();
        if with_issuer {
            chain.push_str(&issuer.pem());
        }
        fs::write(&cert_path, chain).expect("write");
        fs::write(&key_path, key.serialize_pem()).expect("write");
        (cert_path, key_path)
    }

    #[tokio::test]
    async fn persistent_files_are_loaded_and_the_bundle_covers_a_foreign_server_ca() {
        let tmp = TempDir::new("persist");
        let files = tmp.path().join("files");
        fs::create_dir_all(&files).expect("mkdir");
        let (ca_crt, ca_key, _, _) = write_rcgen_ca(&files, "agent-ca", &rcgen::PKCS_ECDSA_P384_SHA384);
        let (_, _, public_ca, public_key) = write_rcgen_ca(&files, "public-ca", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (srv_crt, srv_key) = write_server_cert(&files, "server", &public_ca, &public_key, true);

        let mut cfg = dev_config(tmp.path());
        cfg.require_persistent = true;
        cfg.ca_cert_file = Some(ca_crt.clone());
        cfg.ca_key_file = Some(ca_key);
        cfg.server_cert_file = Some(srv_crt);
        cfg.server_key_file = Some(srv_key);
        let pki = Pki::load_or_create(&cfg).expect("load persistent PKI");
        assert!(
            !tmp.path().join("pki/ca.key").exists(),
            "no dev CA when files are given"
        );

        // Bundle: agent CA first, then the root of the foreign server chain.
        let bundle: Vec<_> = CertificateDer::pem_slice_iter(pki.ca_bundle_pem().as_bytes())
            .collect::<Result<_, _>>()
            .expect("bundle");
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[0], first_cert_der(&read_string(&ca_crt)));
        assert_eq!(bundle[1], *public_ca.der());
        assert_eq!(read_string(pki.ca_bundle_path()), pki.ca_bundle_pem());

        // Agents get certificates from the file CA and can talk to the server with the bundle.
        let (csr, key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let issued = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        assert_agent_cert(&pki, &issued, false);
        let der = first_cert_der(&issued.cert_pem);

        let cert = parse(der.as_ref());
        let file_ca_der = first_cert_der(&read_string(&ca_crt));
        let file_ca = parse(file_ca_der.as_ref());
        cert.verify_signature(Some(file_ca.public_key()))
            .expect("signed by the file CA");
        assert_eq!(cert.issuer().as_raw(), file_ca.subject().as_raw());

        let server = pki.server_tls_config().expect("server config");
        let client = client_config(pki.ca_bundle_pem(), Some((&issued, &key)));
        let peer = handshake(server, client, "localhost").await.expect("handshake");
        assert_eq!(peer.map(|p| p.serial_hex), Some(issued.serial_hex));
    }

    #[tokio::test]
    async fn a_self_signed_server_certificate_is_added_to_the_bundle() {
        let tmp = TempDir::new("selfsigned");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.self_signed(&key).expect("self-signed");
        let crt = tmp.path().join("server.crt");
        let key_file = tmp.path().join("server.key");
        fs::write(&crt, cert.pem()).expect("write");
        fs::write(&key_file, key.serialize_pem()).expect("write");

        let mut cfg = dev_config(tmp.path());
        cfg.server_cert_file = Some(crt);
        cfg.server_key_file = Some(key_file);
        let pki = Pki::load_or_create(&cfg).expect("load");
        let bundle: Vec<_> = CertificateDer::pem_slice_iter(pki.ca_bundle_pem().as_bytes())
            .collect::<Result<_, _>>()
            .expect("bundle");
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[0].as_ref(), pki.ca.der.as_ref(), "dev agent CA first");
        assert_eq!(bundle[1], *cert.der());
        assert!(
            !tmp.path().join("pki/server.key").exists(),
            "no dev server cert when files are given"
        );

        let (csr, agent_key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let issued = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let client = client_config(pki.ca_bundle_pem(), Some((&issued, &agent_key)));
        let server = pki.server_tls_config().expect("config");
        let peer = handshake(server, client, "localhost").await.expect("handshake");
        assert_eq!(peer.map(|p| p.agent_id), Some(ID.agent_id.to_string()));
    }

    #[test]
    fn persistent_ca_key_must_match_its_certificate() {
        let tmp = TempDir::new("mismatch");
        let (ca_crt, _, _, _) = write_rcgen_ca(tmp.path(), "a", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, other_key, _, _) = write_rcgen_ca(tmp.path(), "b", &rcgen::PKCS_ECDSA_P256_SHA256);
        let mut cfg = dev_config(tmp.path());
        cfg.ca_cert_file = Some(ca_crt);
        cfg.ca_key_file = Some(other_key.clone());
        match Pki::load_or_create(&cfg) {
            Err(PkiError::InvalidFile { path, reason }) => {
                assert_eq!(path, other_key);
                assert!(reason.contains("does not match"), "{reason}");
            }
            other => panic!("mismatched CA key accepted: {other:?}"),
        }
    }

    #[test]
    fn a_non_ca_certificate_is_refused_as_agent_ca() {
        let tmp = TempDir::new("nonca");
        let (_, _, ca, ca_key) = write_rcgen_ca(tmp.path(), "root", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (leaf_crt, leaf_key) = write_server_cert(tmp.path(), "leaf", &ca, &ca_key, false);
        let mut cfg = dev_config(tmp.path());
        cfg.ca_cert_file = Some(leaf_crt);
        cfg.ca_key_file = Some(leaf_key);
        let err = Pki::load_or_create(&cfg).expect_err("leaf accepted as CA");
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[tokio::test]
    async fn openssl_ca_keys_in_sec1_and_pkcs1_form_are_usable() {
        for (what, genkey) in [
            (
                "SEC1 P-256",
                vec!["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out"],
            ),
            (
                "SEC1 P-384",
                vec!["ecparam", "-genkey", "-name", "secp384r1", "-noout", "-out"],
            ),
            ("PKCS#1 RSA", vec!["genrsa", "-traditional", "-out"]),
        ] {
            let tmp = TempDir::new("opensslca");
            let key_path = tmp.path().join("ca.key");
            let crt_path = tmp.path().join("ca.crt");
            let key_arg = key_path.to_string_lossy().into_owned();
            let crt_arg = crt_path.to_string_lossy().into_owned();
            let mut args = genkey.clone();
            args.push(&key_arg);
            if what.contains("RSA") {
                args.push("2048");
            }
            if openssl(&args).is_none() {
                return;
            }
            let key_pem = read_string(&key_path);
            let label = if what.contains("RSA") {
                "RSA PRIVATE KEY"
            } else {
                "EC PRIVATE KEY"
            };
            assert!(key_pem.contains(label), "{what}: {key_pem}");
            let req = [
                "req",
                "-x509",
                "-new",
                "-key",
                &key_arg,
                "-subj",
                "/C=DE/O=Example Ops/OU=PKI/CN=Example Agent CA",
                "-days",
                "30",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                &crt_arg,
            ];
            openssl(&req).expect("openssl present");

            let mut cfg = dev_config(tmp.path());
            cfg.ca_cert_file = Some(crt_path.clone());
            cfg.ca_key_file = Some(key_path.clone());
            let pki = Pki::load_or_create(&cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
            // Dev server cert signed by the file CA; the bundle is that CA alone.
            assert_eq!(
                CertificateDer::pem_slice_iter(pki.ca_bundle_pem().as_bytes()).count(),
                1,
                "{what}"
            );
            let (csr, key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
            let issued = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
            assert_agent_cert(&pki, &issued, false);

            // openssl agrees that the agent certificate chains to the CA file.
            let agent_path = tmp.path().join("agent.crt");
            fs::write(&agent_path, &issued.cert_pem).expect("write");
            let agent_arg = agent_path.to_string_lossy().into_owned();
            openssl(&["verify", "-CAfile", &crt_arg, "-purpose", "sslclient", &agent_arg]).expect("openssl verify");

            let server = pki.server_tls_config().expect("config");
            let client = client_config(pki.ca_bundle_pem(), Some((&issued, &key)));
            let peer = handshake(server, client, "127.0.0.1")
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(peer.map(|p| p.agent_id), Some(ID.agent_id.to_string()));
        }
    }

    #[tokio::test]
    async fn handshake_accepts_agent_ca_clients_and_anonymous_ones_and_refuses_foreign_ones() {
        let tmp = TempDir::new("handshake");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("create");
        let server = pki.server_tls_config().expect("config");
        let (csr, key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let issued = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");

        // Agent certificate from our CA, every name of the server certificate.
        for name in ["localhost", "cp.example.com", "127.0.0.1", "::1", "10.1.2.3"] {
            let client = client_config(pki.ca_bundle_pem(), Some((&issued, &key)));
            let peer = handshake(Arc::clone(&server), client, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let peer = peer.expect("the server sees the client certificate");
            assert_eq!(peer.agent_id, ID.agent_id);
            assert_eq!(peer.serial_hex, issued.serial_hex);
            assert_eq!(peer.not_after_ms, issued.not_after_ms);
        }

        // No client certificate: allowed at the handshake.
        let anonymous = client_config(pki.ca_bundle_pem(), None);
        let peer = handshake(Arc::clone(&server), anonymous, "localhost")
            .await
            .expect("anonymous handshake");
        assert_eq!(peer, None);

        // A client certificate from another CA: the handshake fails.
        let other_tmp = TempDir::new("foreign");
        let foreign = Pki::load_or_create(&dev_config(other_tmp.path())).expect("foreign PKI");
        let (csr, key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let foreign_cert = foreign.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let client = client_config(pki.ca_bundle_pem(), Some((&foreign_cert, &key)));
        let err = handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect_err("foreign client certificate accepted");
        assert!(err.contains("server handshake"), "{err}");

        // A client trusting only another CA bundle does not trust our server.
        let client = client_config(foreign.ca_bundle_pem(), None);
        let err = handshake(server, client, "localhost")
            .await
            .expect_err("server verified with a foreign bundle");
        assert!(err.contains("client handshake"), "{err}");
    }

    #[test]
    fn peer_identity_normalises_serials_and_rejects_garbage() {
        assert_eq!(peer_identity(b"garbage"), None);
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x00, 0x00, 0x0a]), "0a");
        assert_eq!(serial_hex(&[0x00]), "00");

        // A serial with the high bit set is DER-encoded with a leading zero byte.
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name("agent-x", "n-kudo-agent");
        params.serial_number = Some(SerialNumber::from_slice(&[0x80, 0xab, 0xcd]));
        let cert = params.self_signed(&key).expect("cert");
        let x509 = parse(cert.der().as_ref());
        assert_eq!(x509.raw_serial(), &[0x00, 0x80, 0xab, 0xcd]);
        let peer = peer_identity(cert.der().as_ref()).expect("identity");
        assert_eq!(peer.agent_id, "agent-x");
        assert_eq!(peer.serial_hex, "80abcd");
    }

    #[test]
    fn rsa_modulus_bit_length() {
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01, 0xff]), 9);
        assert_eq!(bit_length(&[0x00]), 0);
        let mut modulus = vec![0x00, 0xc0];
        modulus.extend([0u8; 511]);
        assert_eq!(bit_length(&modulus), 4096);
        modulus.insert(1, 0x01);
        assert_eq!(bit_length(&modulus), 4097, "just over the accepted range");
    }

    fn bundle_ders(pki: &Pki) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pki.ca_bundle_pem().as_bytes())
            .collect::<Result<_, _>>()
            .expect("bundle")
    }

    /// The three stages of an agent CA rotation (docs/control-plane.md, "Rotating certificates"),
    /// with an old and a new CA of the very same name, and the dev server certificate.
    #[tokio::test]
    async fn agent_ca_rotation_keeps_old_agents_working_until_the_old_ca_is_dropped() {
        let tmp = TempDir::new("rotation");
        let (old_dir, new_dir) = (tmp.path().join("old"), tmp.path().join("new"));
        fs::create_dir_all(&old_dir).expect("mkdir");
        fs::create_dir_all(&new_dir).expect("mkdir");
        let (old_crt, old_key, old_ca, _) = write_rcgen_ca(&old_dir, "agent-ca", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (new_crt, new_key, new_ca, _) = write_rcgen_ca(&new_dir, "agent-ca", &rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            parse(old_ca.der()).subject().as_raw(),
            parse(new_ca.der()).subject().as_raw(),
            "both CAs have the same name"
        );
        let data = tmp.path().join("data");

        // Before: the old CA issues; an agent enrolls and keeps the old bundle.
        let mut cfg = dev_config(&data);
        cfg.ca_cert_file = Some(old_crt.clone());
        cfg.ca_key_file = Some(old_key);
        let before = Pki::load_or_create(&cfg).expect("old CA");
        let (csr, old_agent_key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let old_agent = before.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let old_bundle = before.ca_bundle_pem().to_string();
        let old_server = read_string(&data.join("pki/server.crt"));
        assert_eq!(
            before.agent_ca_of(&peer_identity(first_cert_der(&old_agent.cert_pem).as_ref()).expect("peer")),
            AgentCa::Current
        );

        // Stage 1: the new CA is current, the old one previous.
        cfg.ca_cert_file = Some(new_crt.clone());
        cfg.ca_key_file = Some(new_key);
        cfg.previous_ca_cert_files = vec![old_crt.clone(), new_crt.clone()];
        let stage1 = Pki::load_or_create(&cfg).expect("stage 1");
        assert_eq!(
            read_string(&data.join("pki/server.crt")),
            old_server,
            "the old CA's dev server certificate is kept while that CA is previous"
        );
        assert_eq!(
            bundle_ders(&stage1),
            vec![new_ca.der().clone(), old_ca.der().clone()],
            "new CA first, then the old one (the current CA listed as previous is ignored)"
        );
        assert_eq!(read_string(stage1.ca_bundle_path()), stage1.ca_bundle_pem());
        let server = stage1.server_tls_config().expect("config");
        // An agent that still trusts the old bundle only, with its old certificate, is served.
        let client = client_config(&old_bundle, Some((&old_agent, &old_agent_key)));
        let peer = handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect("old agent during the rotation")
            .expect("client certificate");
        assert_eq!(peer.serial_hex, old_agent.serial_hex);
        assert_eq!(stage1.agent_ca_of(&peer), AgentCa::Previous, "same name, other key");
        // It renews: the new certificate comes from the new CA.
        let (csr, new_agent_key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let new_agent = stage1.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let new_der = first_cert_der(&new_agent.cert_pem);
        let cert = parse(new_der.as_ref());
        cert.verify_signature(Some(parse(new_ca.der()).public_key()))
            .expect("issued by the new CA");
        assert!(cert.verify_signature(Some(parse(old_ca.der()).public_key())).is_err());
        let peer_new = peer_identity(new_der.as_ref()).expect("peer");
        assert_eq!(peer_new.authority_key_id.as_deref(), Some(&stage1.current_key_id[..]));
        assert_eq!(stage1.agent_ca_of(&peer_new), AgentCa::Current);
        let client = client_config(stage1.ca_bundle_pem(), Some((&new_agent, &new_agent_key)));
        handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect("renewed agent");
        // A client certificate of an unknown CA is still refused.
        let foreign_tmp = TempDir::new("rotation-foreign");
        let foreign = Pki::load_or_create(&dev_config(foreign_tmp.path())).expect("foreign");
        let (csr, foreign_key) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let foreign_cert = foreign.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let client = client_config(stage1.ca_bundle_pem(), Some((&foreign_cert, &foreign_key)));
        handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect_err("foreign client certificate accepted");

        // Stage 2 (dev server certificate): removing it re-issues it from the new CA; the renewed
        // agent verifies it with the bundle it received, and the old agent still authenticates.
        fs::remove_file(data.join("pki/server.crt")).expect("rm");
        let stage2 = Pki::load_or_create(&cfg).expect("stage 2");
        let server_der = first_cert_der(&read_string(&data.join("pki/server.crt")));
        parse(server_der.as_ref())
            .verify_signature(Some(parse(new_ca.der()).public_key()))
            .expect("server certificate from the new CA");
        let server = stage2.server_tls_config().expect("config");
        let client = client_config(stage1.ca_bundle_pem(), Some((&new_agent, &new_agent_key)));
        handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect("renewed agent, new server certificate");
        let client = client_config(stage1.ca_bundle_pem(), Some((&old_agent, &old_agent_key)));
        handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect("old certificate still accepted in stage 2");
        let client = client_config(&old_bundle, None);
        handshake(server, client, "localhost")
            .await
            .expect_err("an agent that never renewed cannot verify the new server certificate");

        // Stage 3: the old CA is dropped; its certificates are refused.
        cfg.previous_ca_cert_files.clear();
        let stage3 = Pki::load_or_create(&cfg).expect("stage 3");
        assert_eq!(bundle_ders(&stage3), vec![new_ca.der().clone()]);
        let server = stage3.server_tls_config().expect("config");
        let client = client_config(stage3.ca_bundle_pem(), Some((&old_agent, &old_agent_key)));
        let err = handshake(Arc::clone(&server), client, "localhost")
            .await
            .expect_err("old CA certificate accepted after the old CA was dropped");
        assert!(err.contains("server handshake"), "{err}");
        let client = client_config(stage1.ca_bundle_pem(), Some((&new_agent, &new_agent_key)));
        let peer = handshake(server, client, "localhost")
            .await
            .expect("renewed agent after the rotation")
            .expect("client certificate");
        assert_eq!(stage3.agent_ca_of(&peer), AgentCa::Current);
    }

    #[test]
    fn a_dev_server_certificate_of_a_dropped_ca_is_reissued() {
        let tmp = TempDir::new("dropped");
        let files = tmp.path().join("files");
        fs::create_dir_all(&files).expect("mkdir");
        let (old_crt, old_key, _, _) = write_rcgen_ca(&files, "old", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (new_crt, new_key, new_ca, _) = write_rcgen_ca(&files, "new", &rcgen::PKCS_ECDSA_P256_SHA256);
        let mut cfg = dev_config(tmp.path());
        cfg.ca_cert_file = Some(old_crt);
        cfg.ca_key_file = Some(old_key);
        Pki::load_or_create(&cfg).expect("old");
        cfg.ca_cert_file = Some(new_crt);
        cfg.ca_key_file = Some(new_key);
        Pki::load_or_create(&cfg).expect("new CA without the old one as previous");
        let server_der = first_cert_der(&read_string(&tmp.path().join("pki/server.crt")));
        parse(server_der.as_ref())
            .verify_signature(Some(parse(new_ca.der()).public_key()))
            .expect("re-issued by the new CA");
    }

    #[test]
    fn previous_ca_files_must_hold_ca_certificates() {
        let tmp = TempDir::new("prevbad");
        let (_, _, ca, ca_key) = write_rcgen_ca(tmp.path(), "root", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (leaf_crt, _) = write_server_cert(tmp.path(), "leaf", &ca, &ca_key, false);
        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "no certificate here\n").expect("write");
        let missing = tmp.path().join("missing.pem");
        for (file, want) in [
            (&leaf_crt, "not a CA certificate"),
            (&empty, "no PEM certificate"),
            (&missing, "missing.pem"),
        ] {
            let mut cfg = dev_config(tmp.path());
            cfg.previous_ca_cert_files = vec![file.clone()];
            let err = Pki::load_or_create(&cfg).expect_err("bad previous CA file accepted");
            let text = err.to_string();
            assert!(text.contains(want), "{text}");
            if !matches!(err, PkiError::Io { .. }) {
                assert!(text.contains("AGENT_CA_PREVIOUS_CERT_FILES"), "{text}");
            }
        }

        // Several CAs in one file, repeated across files: each is trusted once; no previous CA
        // means every certificate counts as current.
        let (a_crt, _, a, _) = write_rcgen_ca(tmp.path(), "a", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, _, b, _) = write_rcgen_ca(tmp.path(), "b", &rcgen::PKCS_ECDSA_P256_SHA256);
        let both = tmp.path().join("both.pem");
        fs::write(&both, format!("{}{}", a.pem(), b.pem())).expect("write");
        let mut cfg = dev_config(tmp.path());
        cfg.previous_ca_cert_files = vec![both, a_crt];
        let pki = Pki::load_or_create(&cfg).expect("load");
        let bundle = bundle_ders(&pki);
        assert_eq!(bundle.len(), 3, "dev CA, a, b");
        assert_eq!(&bundle[1..], &[a.der().clone(), b.der().clone()]);
        let none = Pki::load_or_create(&dev_config(tmp.path())).expect("load");
        let peer = PeerIdentity {
            agent_id: "x".into(),
            serial_hex: "01".into(),
            not_after_ms: 0,
            authority_key_id: Some(vec![1, 2, 3]),
            issuer: Vec::new(),
        };
        assert_eq!(none.agent_ca_of(&peer), AgentCa::Current);
        assert_eq!(pki.agent_ca_of(&peer), AgentCa::Previous);
        // Without authorityKeyIdentifier the issuer name decides.
        let by_name = PeerIdentity {
            authority_key_id: None,
            issuer: pki.current_subject.clone(),
            ..peer.clone()
        };
        assert_eq!(pki.agent_ca_of(&by_name), AgentCa::Current);
        let other_name = PeerIdentity {
            authority_key_id: None,
            issuer: parse(a.der()).subject().as_raw().to_vec(),
            ..peer
        };
        assert_eq!(pki.agent_ca_of(&other_name), AgentCa::Previous);
    }

    /// A CA certificate without subjectKeyIdentifier (rcgen then derives the key identifier it
    /// writes into issued certificates from the key): its certificates still count as current
    /// while a previous CA is listed.
    #[test]
    fn a_current_ca_without_subject_key_identifier_is_recognised() {
        let tmp = TempDir::new("noski");
        let key_path = tmp.path().join("ca.key");
        let crt_path = tmp.path().join("ca.crt");
        let key_arg = key_path.to_string_lossy().into_owned();
        let crt_arg = crt_path.to_string_lossy().into_owned();
        let genkey = ["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", &key_arg];
        if openssl(&genkey).is_none() {
            return;
        }
        let req = [
            "req",
            "-x509",
            "-new",
            "-key",
            &key_arg,
            "-subj",
            "/CN=agent CA without SKI",
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-addext",
            "subjectKeyIdentifier=none",
            "-addext",
            "authorityKeyIdentifier=none",
            "-out",
            &crt_arg,
        ];
        openssl(&req).expect("openssl present");
        let ca_der = first_cert_der(&read_string(&crt_path));
        let no_ski = parse(ca_der.as_ref())
            .iter_extensions()
            .all(|e| !matches!(e.parsed_extension(), ParsedExtension::SubjectKeyIdentifier(_)));
        assert!(no_ski, "openssl wrote a subjectKeyIdentifier");
        let (prev_crt, _, _, _) = write_rcgen_ca(tmp.path(), "previous", &rcgen::PKCS_ECDSA_P256_SHA256);

        let mut cfg = dev_config(tmp.path());
        cfg.ca_cert_file = Some(crt_path);
        cfg.ca_key_file = Some(key_path);
        cfg.previous_ca_cert_files = vec![prev_crt];
        let pki = Pki::load_or_create(&cfg).expect("load");
        let (csr, _) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let issued = pki.sign_agent_csr(&csr, &ID, TTL).expect("sign");
        let peer = peer_identity(first_cert_der(&issued.cert_pem).as_ref()).expect("peer");
        assert!(
            peer.authority_key_id.is_some(),
            "issued certificates name their CA's key"
        );
        assert_eq!(pki.agent_ca_of(&peer), AgentCa::Current);
    }

    #[test]
    fn heartbeats_by_ca_are_counted_in_the_registry() {
        let tmp = TempDir::new("metric");
        let pki = Pki::load_or_create(&dev_config(tmp.path())).expect("load");
        let registry = Registry::new();
        pki.register_metrics(&registry).expect("register");
        pki.count_heartbeat(AgentCa::Previous);
        pki.count_heartbeat(AgentCa::Previous);
        let families = registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == "nkudo_agent_heartbeats_by_ca_total")
            .expect("metric family");
        let value = |ca: &str| {
            family
                .get_metric()
                .iter()
                .find(|m| m.get_label().iter().any(|l| l.value() == ca))
                .map(|m| m.get_counter().get_value())
        };
        assert_eq!(value("previous"), Some(2.0));
        assert_eq!(value("current"), Some(0.0), "both series exist from the start");
    }

    #[test]
    fn invalid_server_names_are_refused() {
        let tmp = TempDir::new("names");
        let mut cfg = dev_config(tmp.path());
        cfg.server_names = vec!["not a host name".to_string()];
        assert!(matches!(Pki::load_or_create(&cfg), Err(PkiError::InvalidServerName(_))));
        let names = required_server_names(&["[::1]".to_string(), " Example.COM ".to_string()]).expect("names");
        assert_eq!(
            names,
            vec![
                SanName::Dns("localhost".into()),
                SanName::Ip("127.0.0.1".parse().expect("ip")),
                SanName::Ip("::1".parse().expect("ip")),
                SanName::Dns("example.com".into()),
            ]
        );
    }
}
