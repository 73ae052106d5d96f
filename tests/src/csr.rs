//! Keys, CSRs, a throw-away CA, and certificate inspection.

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use std::path::Path;
use std::process::Command;
use x509_parser::prelude::*;

/// A fresh ECDSA P-256 key and a CSR (subject CN = `hostname`, no SANs, like the earlier agent's).
/// Returns `(key_pem /* PKCS#8 */, csr_pem)`.
pub fn make_csr(hostname: &str) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate P-256 key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("csr params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hostname);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).expect("serialize CSR");
    (key.serialize_pem(), csr.pem().expect("CSR PEM"))
}

/// Whether `openssl` can be run.
pub fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// An RSA-4096 key and CSR made by `openssl req` (as the earlier Go agent makes them: RSA 4096, CN = host).
/// Returns `(key_pem, csr_pem)`. `dir` receives the files.
pub fn openssl_rsa_csr(dir: &Path, hostname: &str) -> anyhow::Result<(String, String)> {
    let key = dir.join("rsa.key");
    let csr = dir.join("rsa.csr");
    let out = Command::new("openssl")
        .args(["req", "-new", "-newkey", "rsa:4096", "-nodes", "-sha256", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", &format!("/CN={hostname}")])
        .output()
        .context("run openssl req")?;
    if !out.status.success() {
        bail!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((std::fs::read_to_string(key)?, std::fs::read_to_string(csr)?))
}

/// A CA made by the test (an "other CA" for mTLS refusals, or the persistent CA of production mode).
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "nkudo-tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa { cert, key }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A client certificate (EKU clientAuth, CN = `common_name`, optional serial). Returns `(key_pem, cert_pem)`.
    pub fn issue_client_cert(&self, common_name: &str, serial: Option<u64>) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        if let Some(s) = serial {
            params.serial_number = Some(SerialNumber::from(s));
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        (key.serialize_pem(), cert.pem())
    }

    /// A server certificate for `127.0.0.1` and `localhost` (EKU serverAuth). Returns `(key_pem, cert_pem)`.
    pub fn issue_server_cert(&self) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign server cert");
        (key.serialize_pem(), cert.pem())
    }
}

/// What the tests check in an issued certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject_cn: Option<String>,
    pub san_uris: Vec<String>,
    /// Serial as lowercase hex without leading zeros.
    pub serial_hex: String,
    /// Serial as a decimal string.
    pub serial_decimal: String,
    pub not_before: i64,
    pub not_after: i64,
    pub eku_client_auth: bool,
    pub eku_server_auth: bool,
    pub is_ca: bool,
    /// SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
}

/// Every certificate of a PEM bundle, as DER.
pub fn pem_certs_der(pem: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for p in Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.context("parse PEM")?;
        if p.label == "CERTIFICATE" {
            out.push(p.contents);
        }
    }
    Ok(out)
}

fn first_cert_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    pem_certs_der(pem)?.into_iter().next().context("no CERTIFICATE in PEM")
}

/// Parses the first certificate of `pem`.
pub fn inspect_cert(pem: &str) -> anyhow::Result<CertInfo> {
    let der = first_cert_der(pem)?;
    let (_, cert) = X509Certificate::from_der(&der).context("parse certificate DER")?;
    let subject_cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let mut san_uris = Vec::new();
    if let Some(san) = cert.subject_alternative_name().context("SAN extension")? {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                san_uris.push(u.to_string());
            }
        }
    }
    let (eku_client_auth, eku_server_auth) = match cert.extended_key_usage().context("EKU extension")? {
        Some(e) => (e.value.client_auth, e.value.server_auth),
        None => (false, false),
    };
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .map(|b| b.value.ca)
        .unwrap_or(false);
    Ok(CertInfo {
        subject_cn,
        san_uris,
        serial_hex: cert.tbs_certificate.serial.to_str_radix(16),
        serial_decimal: cert.tbs_certificate.serial.to_str_radix(10),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        eku_client_auth,
        eku_server_auth,
        is_ca,
        spki_der: cert.public_key().raw.to_vec(),
    })
}

/// SubjectPublicKeyInfo DER of a CSR (after checking the CSR's own signature).
pub fn csr_spki_der(csr_pem: &str) -> anyhow::Result<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).context("parse CSR PEM")?;
    let (_, csr) = X509CertificationRequest::from_der(&pem.contents).context("parse CSR DER")?;
    csr.verify_signature().context("CSR self-signature")?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// Verifies that the first certificate of `leaf_pem` chains, by signatures, to a self-signed certificate of
/// `bundle_pem` (through intermediates of the bundle, if any). Returns the chain length (leaf excluded).
pub fn verify_chain(leaf_pem: &str, bundle_pem: &str) -> anyhow::Result<usize> {
    let bundle_der = pem_certs_der(bundle_pem)?;
    if bundle_der.is_empty() {
        bail!("CA bundle holds no certificate");
    }
    let bundle: Vec<X509Certificate<'_>> = bundle_der
        .iter()
        .map(|d| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c)
                .context("parse bundle certificate")
        })
        .collect::<anyhow::Result<_>>()?;
    let leaf_der = first_cert_der(leaf_pem)?;
    let (_, leaf) = X509Certificate::from_der(&leaf_der).context("parse leaf")?;
    let mut current = leaf;
    for depth in 1..=8 {
        let issuer = bundle
            .iter()
            .find(|c| c.subject() == current.issuer() && current.verify_signature(Some(c.public_key())).is_ok())
            .with_context(|| {
                format!(
                    "no certificate in the bundle signed {} (issuer {})",
                    current.subject(),
                    current.issuer()
                )
            })?;
        if !issuer.is_ca() {
            bail!("issuer {} is not a CA certificate", issuer.subject());
        }
        if issuer.subject() == issuer.issuer() && issuer.verify_signature(None).is_ok() {
            return Ok(depth);
        }
        current = issuer.clone();
    }
    bail!("chain longer than 8")
}

/// Corrupts the signature of a PEM CSR (flips the last byte of the DER, which lies in the signature).
pub fn corrupt_csr_signature(csr_pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).expect("parse CSR PEM");
    let mut der = pem.contents.clone();
    let last = der.len() - 1;
    der[last] ^= 0x5a;
    to_pem("CERTIFICATE REQUEST", &der)
}

/// PEM-encodes DER with `label`.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_round_trips_and_corruption_is_detected() {
        let (_key, csr) = make_csr("edge-1");
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        csr_spki_der(&csr).expect("valid CSR");
        // Re-encoding unchanged DER must still verify (checks to_pem), the corrupted one must not.
        let (_, pem) = x509_parser::pem::parse_x509_pem(csr.as_bytes()).unwrap();
        csr_spki_der(&to_pem("CERTIFICATE REQUEST", &pem.contents)).expect("re-encoded CSR");
        assert!(csr_spki_der(&corrupt_csr_signature(&csr)).is_err());
    }

    #[test]
    fn test_ca_chain_verifies_and_foreign_does_not() {
        let ca = TestCa::new("ca-a");
        let other = TestCa::new("ca-b");
        let (_k, leaf) = ca.issue_client_cert("agent-x", Some(42));
        assert_eq!(verify_chain(&leaf, &ca.cert_pem()).unwrap(), 1);
        assert!(verify_chain(&leaf, &other.cert_pem()).is_err());
        let info = inspect_cert(&leaf).unwrap();
        assert_eq!(info.subject_cn.as_deref(), Some("agent-x"));
        assert_eq!(info.serial_decimal, "42");
        assert!(info.eku_client_auth && !info.is_ca);
    }
}
