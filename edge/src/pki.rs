//! The agent's key and certificates in the PKI directory (0700): `client.key` (0600, PKCS#8 ECDSA P-256),
//! `client.crt` and `ca.crt` (0644), each written atomically. The private key never leaves the host.
//!
//! Renewal writes the new key to `client.key.next` before asking the control plane, and the new certificate to
//! `client.crt.next` as soon as the answer arrives; both are then renamed into place. If the agent dies in
//! between, [`Pki::recover`] completes the switch on the next start (the control plane already refuses the old
//! certificate at that point).
//!
//! `ca.crt` is the only trust anchor set of the agent for the control plane's server certificate. Every renewal
//! answer carries the control plane's current CA bundle (current agent CA, previous agent CAs during a CA
//! rotation, the server chain's anchor), and the agent replaces `ca.crt` with it (atomically, before the new
//! certificate is switched in): that is how an agent learns a new CA before the server certificate moves to it.
//! A bundle without a single usable certificate is ignored and the old one kept, so a bad answer cannot leave
//! the agent unable to verify the server.

use crate::fsutil;
use std::path::{Path, PathBuf};

pub const KEY_FILE: &str = "client.key";
pub const CERT_FILE: &str = "client.crt";
pub const CA_FILE: &str = "ca.crt";
const NEXT_KEY: &str = "client.key.next";
const NEXT_CERT: &str = "client.crt.next";

#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

#[derive(Debug)]
pub struct PkiError(pub String);

impl std::fmt::Display for PkiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PkiError {}

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> PkiError {
    PkiError(format!("{what} {}: {e}", path.display()))
}

/// What a renewal did with the CA bundle of the control plane's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleUpdate {
    /// `ca.crt` now holds the answer's bundle of this many certificates.
    Replaced(usize),
    /// The answer's bundle is the one `ca.crt` already holds.
    Unchanged,
    /// The answer carried no bundle; `ca.crt` is kept.
    Absent,
    /// The answer's bundle is unusable (the reason); `ca.crt` is kept.
    Ignored(String),
}

/// The number of certificates in a PEM bundle; an error when there is none or one is not usable as a trust
/// anchor (checked by building a TLS client that trusts exactly the bundle, as the agent does).
pub fn bundle_certificates(pem: &str) -> Result<usize, String> {
    let certs =
        reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| format!("unreadable CA bundle: {e}"))?;
    if certs.is_empty() {
        return Err("the CA bundle holds no certificate".into());
    }
    let count = certs.len();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false);
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build()
        .map_err(|e| format!("the CA bundle is not usable as trust anchors: {e}"))?;
    Ok(count)
}

/// A fresh ECDSA P-256 key (PKCS#8 PEM) and a CSR for it whose subject CN is `common_name`.
pub fn new_key_and_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PkiError(format!("generate key: {e}")))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| PkiError(format!("CSR params: {e}")))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| PkiError(format!("create CSR: {e}")))?;
    let csr_pem = csr.pem().map_err(|e| PkiError(format!("encode CSR: {e}")))?;
    Ok((key.serialize_pem(), csr_pem))
}

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Pki {
        Pki { dir: dir.into() }
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    pub fn ensure_dir(&self) -> Result<(), PkiError> {
        fsutil::ensure_dir(&self.dir, 0o700).map_err(|e| err("create pki dir", &self.dir, e))
    }

    /// Writes the three files of a fresh enrollment (key first, so that a certificate never exists without it).
    pub fn write_all(&self, key_pem: &str, cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
        self.ensure_dir()?;
        let (k, c, a) = (self.key_path(), self.cert_path(), self.ca_path());
        fsutil::write_atomic(&k, key_pem.as_bytes(), 0o600).map_err(|e| err("write", &k, e))?;
        fsutil::write_atomic(&c, cert_pem.as_bytes(), 0o644).map_err(|e| err("write", &c, e))?;
        fsutil::write_atomic(&a, ca_pem.as_bytes(), 0o644).map_err(|e| err("write", &a, e))?;
        Ok(())
    }

    /// Renewal step 1: the new key, durably on disk before the control plane is asked.
    pub fn stage_next_key(&self, key_pem: &str) -> Result<(), PkiError> {
        let p = self.dir.join(NEXT_KEY);
        fsutil::write_atomic(&p, key_pem.as_bytes(), 0o600).map_err(|e| err("write", &p, e))
    }

    /// Renewal step 2 (the control plane answered): stage the certificate and CA, then switch both files.
    pub fn commit_renewal(&self, cert_pem: &str, ca_pem: &str) -> Result<BundleUpdate, PkiError> {
        let update = self.stage_next_cert(cert_pem, ca_pem)?;
        self.recover()?;
        Ok(update)
    }

    /// Renewal step 2a: the new certificate on disk next to the staged key, and the CA bundle of the answer in
    /// place of `ca.crt` (see [`BundleUpdate`]); [`Pki::recover`] then switches key and certificate (also on the
    /// next start, after a crash).
    pub fn stage_next_cert(&self, cert_pem: &str, ca_pem: &str) -> Result<BundleUpdate, PkiError> {
        let p = self.dir.join(NEXT_CERT);
        fsutil::write_atomic(&p, cert_pem.as_bytes(), 0o644).map_err(|e| err("write", &p, e))?;
        if ca_pem.trim().is_empty() {
            return Ok(BundleUpdate::Absent);
        }
        let count = match bundle_certificates(ca_pem) {
            Ok(n) => n,
            Err(reason) => return Ok(BundleUpdate::Ignored(reason)),
        };
        let a = self.ca_path();
        if std::fs::read(&a).is_ok_and(|old| old == ca_pem.as_bytes()) {
            return Ok(BundleUpdate::Unchanged);
        }
        fsutil::write_atomic(&a, ca_pem.as_bytes(), 0o644).map_err(|e| err("write", &a, e))?;
        Ok(BundleUpdate::Replaced(count))
    }

    /// Completes an interrupted renewal: a staged certificate means the control plane answered, so the staged
    /// key and certificate replace the current ones; a staged key alone (no answer) is discarded.
    pub fn recover(&self) -> Result<(), PkiError> {
        let (nk, nc) = (self.dir.join(NEXT_KEY), self.dir.join(NEXT_CERT));
        if nc.exists() {
            if nk.exists() {
                let k = self.key_path();
                fsutil::rename_durable(&nk, &k).map_err(|e| err("install", &k, e))?;
            }
            let c = self.cert_path();
            fsutil::rename_durable(&nc, &c).map_err(|e| err("install", &c, e))?;
        } else if nk.exists() {
            let _ = std::fs::remove_file(&nk);
        }
        Ok(())
    }

    /// The PEM of the client certificate followed by the key, as reqwest's `Identity::from_pem` wants it.
    pub fn identity_pem(&self) -> Result<Vec<u8>, PkiError> {
        let (c, k) = (self.cert_path(), self.key_path());
        let cert = std::fs::read_to_string(&c).map_err(|e| err("read", &c, e))?;
        let key = std::fs::read_to_string(&k).map_err(|e| err("read", &k, e))?;
        Ok(format!("{}\n{}\n", cert.trim_end(), key.trim_end()).into_bytes())
    }

    pub fn ca_pem(&self) -> Result<Vec<u8>, PkiError> {
        let a = self.ca_path();
        std::fs::read(&a).map_err(|e| err("read", &a, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn csr_is_pem_and_key_is_pkcs8() {
        let (key, csr) = new_key_and_csr("edge-1").unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    }

    #[test]
    fn files_have_their_modes_and_renewal_recovers() {
        let dir = std::env::temp_dir().join(format!("nkudo-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir);
        pki.write_all("KEY1", "CERT1", "CA").unwrap();
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.clone()), 0o700);
        assert_eq!(mode(pki.key_path()), 0o600);
        assert_eq!(mode(pki.cert_path()), 0o644);
        assert_eq!(mode(pki.ca_path()), 0o644);
        // Crash after staging the key but before any answer: the old pair stays.
        pki.stage_next_key("KEY2").unwrap();
        pki.recover().unwrap();
        assert_eq!(std::fs::read_to_string(pki.key_path()).unwrap(), "KEY1");
        // A full renewal switches both.
        pki.stage_next_key("KEY3").unwrap();
        assert_eq!(pki.commit_renewal("CERT3", "").unwrap(), BundleUpdate::Absent);
        assert_eq!(std::fs::read_to_string(pki.key_path()).unwrap(), "KEY3");
        assert_eq!(std::fs::read_to_string(pki.cert_path()).unwrap(), "CERT3");
        assert_eq!(mode(pki.key_path()), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn ca_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn renewal_replaces_the_ca_bundle_only_with_a_usable_one() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path().join("pki"));
        let (old_ca, new_ca) = (ca_pem("old"), ca_pem("new"));
        pki.write_all("KEY1", "CERT1", &old_ca).unwrap();

        // A CA rotation: the answer's bundle (new + old CA) replaces the one from enrollment.
        let rotated = format!("{new_ca}{old_ca}");
        pki.stage_next_key("KEY2").unwrap();
        assert_eq!(
            pki.commit_renewal("CERT2", &rotated).unwrap(),
            BundleUpdate::Replaced(2)
        );
        assert_eq!(std::fs::read_to_string(pki.ca_path()).unwrap(), rotated);
        assert_eq!(std::fs::read_to_string(pki.cert_path()).unwrap(), "CERT2");

        // The same bundle again: unchanged.
        pki.stage_next_key("KEY3").unwrap();
        assert_eq!(pki.commit_renewal("CERT3", &rotated).unwrap(), BundleUpdate::Unchanged);

        // Garbage or a bundle without a certificate: the certificate is installed, the trusted bundle kept.
        let not_a_certificate = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
        for bad in [
            "not a bundle",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            not_a_certificate,
        ] {
            pki.stage_next_key("KEY4").unwrap();
            match pki.commit_renewal("CERT4", bad).unwrap() {
                BundleUpdate::Ignored(reason) => assert!(reason.contains("CA bundle"), "{reason}"),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
            assert_eq!(std::fs::read_to_string(pki.ca_path()).unwrap(), rotated);
            assert_eq!(std::fs::read_to_string(pki.cert_path()).unwrap(), "CERT4");
        }
        let mode = std::fs::metadata(pki.ca_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
