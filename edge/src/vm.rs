//! The seam between the executor and the microVM provider: [`VmBackend`], implemented for E2's Cloud Hypervisor
//! provider ([`crate::provider::CloudHypervisor`]) and by test doubles.

use nkudo_core::api::{MicroVmCreateParams, MicroVmReport};
use std::future::Future;

/// A provider failure: `code` becomes the execution's `error_code`, `message` its `error_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmError {
    pub code: String,
    pub message: String,
}

impl VmError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> VmError {
        VmError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for VmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What the executor needs from a microVM provider. Every operation is idempotent: creating a VM that exists,
/// starting a running one, stopping a stopped one and deleting a missing one all succeed.
pub trait VmBackend: Send + Sync + 'static {
    fn create(&self, params: &MicroVmCreateParams) -> impl Future<Output = Result<(), VmError>> + Send;
    fn start(&self, vm_id: &str) -> impl Future<Output = Result<(), VmError>> + Send;
    fn stop(&self, vm_id: &str) -> impl Future<Output = Result<(), VmError>> + Send;
    fn delete(&self, vm_id: &str) -> impl Future<Output = Result<(), VmError>> + Send;
    /// The VMs this host runs, for the heartbeat.
    fn list(&self) -> impl Future<Output = Vec<MicroVmReport>> + Send;
    /// Rediscovers VMs that outlived the agent (runtime directories, sockets) and settles their state.
    fn reconcile(&self) -> impl Future<Output = Vec<MicroVmReport>> + Send;
    /// The hypervisor binary's version, if it runs.
    fn binary_version(&self) -> Option<String>;
}
