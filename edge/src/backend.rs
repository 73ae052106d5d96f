//! The provider the agent runs with: the Cloud Hypervisor provider ([`crate::provider::CloudHypervisor`]) behind
//! the executor's [`VmBackend`] seam. Provider error codes become execution error codes unchanged.

use crate::cli::ProviderSettings;
use crate::provider::{CloudHypervisor, ProviderConfig, ProviderError};
use crate::vm::{VmBackend, VmError};
use nkudo_core::api::{MicroVmCreateParams, MicroVmReport};

pub struct ProviderBackend {
    ch: CloudHypervisor,
}

pub fn provider_config(s: &ProviderSettings) -> ProviderConfig {
    ProviderConfig {
        runtime_dir: s.runtime_dir.clone(),
        images_dir: s.images_dir.clone(),
        cloud_hypervisor_bin: s.cloud_hypervisor_bin.clone(),
        qemu_img_bin: s.qemu_img_bin.clone(),
        default_bridge: s.bridge.clone(),
        stop_timeout: s.stop_timeout,
        boot_timeout: s.boot_timeout,
    }
}

impl ProviderBackend {
    pub fn new(settings: &ProviderSettings) -> Self {
        ProviderBackend {
            ch: CloudHypervisor::new(provider_config(settings)),
        }
    }
}

fn map(r: Result<(), ProviderError>) -> Result<(), VmError> {
    r.map_err(|e| VmError::new(e.code, e.message))
}

impl VmBackend for ProviderBackend {
    async fn create(&self, p: &MicroVmCreateParams) -> Result<(), VmError> {
        map(self.ch.create(p).await)
    }
    async fn start(&self, vm_id: &str) -> Result<(), VmError> {
        map(self.ch.start(vm_id).await)
    }
    async fn stop(&self, vm_id: &str) -> Result<(), VmError> {
        map(self.ch.stop(vm_id).await)
    }
    async fn delete(&self, vm_id: &str) -> Result<(), VmError> {
        map(self.ch.delete(vm_id).await)
    }
    async fn list(&self) -> Vec<MicroVmReport> {
        self.ch.list().await
    }
    async fn reconcile(&self) -> Vec<MicroVmReport> {
        self.ch.reconcile().await
    }
    fn binary_version(&self) -> Option<String> {
        self.ch.binary_version()
    }
}
