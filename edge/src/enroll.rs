//! `nkudo-edge enroll`: key and CSR, `POST /v1/enroll`, certificates and identity on disk.

use crate::cli::{ConnSettings, Dirs};
use crate::client::{CpClient, CpError, TlsSettings};
use crate::hostfacts;
use crate::pki::{self, Pki};
use crate::state::{now_rfc3339, CertInfo, Identity, StateStore};
use crate::{ExitError, EXIT_FAILURE, EXIT_UNREACHABLE};
use nkudo_core::api::{EnrollRequest, EnrollResponse};

pub struct EnrollInput {
    pub conn: ConnSettings,
    pub dirs: Dirs,
    pub token: String,
    pub hostname: String,
    pub force: bool,
}

pub async fn enroll(input: EnrollInput) -> Result<(), ExitError> {
    crate::agent::warn_insecure(input.conn.insecure_skip_verify);
    let cp = input
        .conn
        .require_control_plane()
        .map_err(ExitError::usage)?
        .to_string();
    let mut store = StateStore::open(&input.dirs.state_dir).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    if let Some(id) = &store.state.identity {
        if !input.force {
            return Err(ExitError::new(
                EXIT_FAILURE,
                format!(
                    "this host is already enrolled as agent {} (site {}); pass --force to replace that identity",
                    id.agent_id, id.site_id
                ),
            ));
        }
    }
    let mut roots = Vec::new();
    if let Some(f) = &input.conn.ca_file {
        roots.push(std::fs::read(f).map_err(|e| ExitError::usage(format!("read --ca-file {}: {e}", f.display())))?);
    }
    let tls = TlsSettings {
        system_roots: roots.is_empty(),
        roots_pem: roots,
        identity_pem: None,
        insecure_skip_verify: input.conn.insecure_skip_verify,
    };
    let client = CpClient::new(&cp, &tls).map_err(ExitError::usage)?;
    let (key_pem, csr_pem) =
        pki::new_key_and_csr(&input.hostname).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    let (os, _) = hostfacts::os_release();
    let arch = hostfacts::arch();
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("arch".to_string(), arch.clone());
    labels.insert("os".to_string(), os.clone());
    let req = EnrollRequest {
        enrollment_token: input.token.clone(),
        hostname: input.hostname.clone(),
        requested_hostname: input.hostname.clone(),
        agent_version: nkudo_core::installed::reported_version().version.clone(),
        os,
        arch,
        kernel_version: hostfacts::kernel(),
        csr_pem,
        labels,
        host_fingerprint: Some(hostfacts::host_fingerprint()),
        bootstrap_nonce: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default().to_string(),
    };
    let resp: EnrollResponse = client.post("/v1/enroll", &req).await.map_err(|e| match &e {
        CpError::Transport(_) => ExitError::new(EXIT_UNREACHABLE, format!("enroll: {e}")),
        _ => ExitError::new(EXIT_FAILURE, format!("enroll refused: {e}")),
    })?;
    if resp.agent_id.is_empty() || resp.site_id.is_empty() || resp.client_certificate_pem.is_empty() {
        return Err(ExitError::new(
            EXIT_FAILURE,
            "enroll: the answer lacks agent_id, site_id or the certificate",
        ));
    }
    let pki = Pki::new(&input.dirs.pki_dir);
    pki.write_all(&key_pem, &resp.client_certificate_pem, &resp.ca_certificate_pem)
        .map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    store.state.identity = Some(Identity {
        tenant_id: resp.tenant_id.clone(),
        site_id: resp.site_id.clone(),
        host_id: resp.host_id.clone(),
        agent_id: resp.agent_id.clone(),
        refresh_token: resp.refresh_token.clone(),
        control_plane: cp,
        hostname: input.hostname.clone(),
        saved_at: now_rfc3339(),
    });
    store.state.certificate = Some(CertInfo {
        expires_at: resp.certificate_expires_at.clone(),
        received_at: now_rfc3339(),
    });
    store.save().map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    println!(
        "enrolled agent_id={} site_id={} host_id={}",
        resp.agent_id, resp.site_id, resp.host_id
    );
    println!("pki written under {}", input.dirs.pki_dir.display());
    println!("state written to {}", store.path().display());
    Ok(())
}
