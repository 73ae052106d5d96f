//! Plans, executions, logs and microVMs: request builders and typed calls used by `tests/tests/plans.rs`.
//!
//! Agents are simulated with mTLS clients ([`crate::EnrolledAgent::client`]); tenants use `X-API-Key`.

use crate::client::{expect_json, tenant, Fixture};
use crate::harness::ControlPlane;
use anyhow::Context;
use nkudo_core::api::{
    ApplyPlanRequest, ApplyPlanResponse, Execution, ExecutionLogsResponse, ExecutionsResponse, HeartbeatResponse,
    LeasedPlan, MicroVm, MicroVmsResponse, NextPlansResponse, PlanActionSpec,
};
use reqwest::{Client, Response, StatusCode};
use serde::Deserialize;

/// Boot payload of [`create_action`].
pub const KERNEL_PATH: &str = "/var/lib/nkudo/images/vmlinux";
pub const CMDLINE: &str = "console=ttyS0 root=/dev/vda rw";
pub const DISK_IMAGE: &str = "/var/lib/nkudo/images/rootfs.raw";
pub const INITRAMFS_PATH: &str = "/var/lib/nkudo/images/initrd.img";
pub const FIRMWARE_PATH: &str = "/usr/share/cloud-hypervisor/hypervisor-fw";
pub const VCPU: i64 = 2;
pub const MEMORY_MIB: i64 = 256;

/// A unique id made of `[A-Za-z0-9-]` (VM ids, idempotency keys).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A CREATE that can boot: kernel + command line + disk image, [`VCPU`] vCPUs, [`MEMORY_MIB`] MiB.
pub fn create_action(vm_id: &str) -> PlanActionSpec {
    PlanActionSpec {
        operation: "CREATE".into(),
        vm_id: Some(vm_id.to_string()),
        vcpu_count: Some(VCPU),
        memory_mib: Some(MEMORY_MIB),
        kernel_path: Some(KERNEL_PATH.into()),
        cmdline: Some(CMDLINE.into()),
        disk_image: Some(DISK_IMAGE.into()),
        ..Default::default()
    }
}

/// START, STOP or DELETE of `vm_id`.
pub fn vm_action(operation: &str, vm_id: &str) -> PlanActionSpec {
    PlanActionSpec {
        operation: operation.to_string(),
        vm_id: Some(vm_id.to_string()),
        ..Default::default()
    }
}

pub fn plan_request(idempotency_key: &str, actions: Vec<PlanActionSpec>) -> ApplyPlanRequest {
    ApplyPlanRequest {
        idempotency_key: idempotency_key.to_string(),
        client_request_id: None,
        actions,
    }
}

/// `POST /sites/{siteID}/plans` with any JSON body.
pub async fn apply_raw(cp: &ControlPlane, api_key: &str, site_id: &str, body: &serde_json::Value) -> Response {
    tenant(cp, api_key)
        .post(cp.url(&format!("/sites/{site_id}/plans")))
        .json(body)
        .send()
        .await
        .expect("POST /sites/{id}/plans: transport error")
}

/// `POST /sites/{siteID}/plans` expecting 200.
pub async fn apply_plan(cp: &ControlPlane, fx: &Fixture, req: &ApplyPlanRequest) -> anyhow::Result<ApplyPlanResponse> {
    let body = serde_json::to_value(req)?;
    expect_json(
        apply_raw(cp, &fx.api_key, fx.site_id(), &body).await,
        StatusCode::OK,
        "POST /sites/{id}/plans",
    )
    .await
}

/// `GET /sites/{siteID}/plans/{planID}` expecting 200.
pub async fn get_plan(cp: &ControlPlane, fx: &Fixture, plan_id: &str) -> anyhow::Result<ApplyPlanResponse> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/sites/{}/plans/{plan_id}", fx.site_id())))
        .send()
        .await?;
    expect_json(r, StatusCode::OK, "GET /sites/{id}/plans/{planID}").await
}

/// Every execution of the fixture's site (`GET /sites/{siteID}/executions?limit=1000`).
pub async fn site_executions(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Vec<Execution>> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/sites/{}/executions?limit=1000", fx.site_id())))
        .send()
        .await?;
    Ok(
        expect_json::<ExecutionsResponse>(r, StatusCode::OK, "GET /sites/{id}/executions")
            .await?
            .executions,
    )
}

/// `GET /sites/{siteID}/vms`.
pub async fn site_vms(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Vec<MicroVm>> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/sites/{}/vms", fx.site_id())))
        .send()
        .await?;
    Ok(
        expect_json::<MicroVmsResponse>(r, StatusCode::OK, "GET /sites/{id}/vms")
            .await?
            .vms,
    )
}

/// The VM `vm_id` as `GET /sites/{siteID}/vms` lists it (an error when it is not listed exactly once).
pub async fn site_vm(cp: &ControlPlane, fx: &Fixture, vm_id: &str) -> anyhow::Result<MicroVm> {
    let vms = site_vms(cp, fx).await?;
    let found: Vec<&MicroVm> = vms.iter().filter(|v| v.id == vm_id).collect();
    anyhow::ensure!(found.len() == 1, "VM {vm_id} listed {} times in {vms:#?}", found.len());
    Ok(found[0].clone())
}

/// `GET /v1/plans/next` with an agent's client, expecting 200.
pub async fn next_plans(cp: &ControlPlane, agent: &Client) -> anyhow::Result<Vec<LeasedPlan>> {
    let r = agent.get(cp.url("/v1/plans/next")).send().await?;
    Ok(
        expect_json::<NextPlansResponse>(r, StatusCode::OK, "GET /v1/plans/next")
            .await?
            .plans,
    )
}

/// `POST /v1/heartbeat` with an agent's client, expecting 200.
pub async fn heartbeat(
    cp: &ControlPlane,
    agent: &Client,
    body: &serde_json::Value,
) -> anyhow::Result<HeartbeatResponse> {
    let r = agent.post(cp.url("/v1/heartbeat")).json(body).send().await?;
    expect_json(r, StatusCode::OK, "POST /v1/heartbeat").await
}

/// `POST /v1/executions/result` with any JSON body.
pub async fn report_raw(cp: &ControlPlane, agent: &Client, body: &serde_json::Value) -> Response {
    agent
        .post(cp.url("/v1/executions/result"))
        .json(body)
        .send()
        .await
        .expect("POST /v1/executions/result: transport error")
}

/// The 202 answer of `POST /v1/executions/result`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ResultAck {
    pub status: String,
    pub applied: i64,
    pub unknown: i64,
}

/// `POST /v1/executions/result` expecting 202.
pub async fn report(cp: &ControlPlane, agent: &Client, body: &serde_json::Value) -> anyhow::Result<ResultAck> {
    expect_json(
        report_raw(cp, agent, body).await,
        StatusCode::ACCEPTED,
        &format!("POST /v1/executions/result {body}"),
    )
    .await
}

/// One reported result: `(execution_id, action_id, ok, error_code, message)`.
pub type ReportedResult<'a> = (&'a str, &'a str, bool, Option<&'a str>, Option<&'a str>);

/// A result body in the current form: one result per [`ReportedResult`].
pub fn result_body(results: &[ReportedResult<'_>]) -> serde_json::Value {
    let results: Vec<serde_json::Value> = results
        .iter()
        .map(|(exec, action, ok, code, msg)| {
            let mut r = serde_json::json!({
                "execution_id": exec,
                "action_id": action,
                "ok": ok,
                "finished_at": chrono::Utc::now().to_rfc3339(),
            });
            if let Some(c) = code {
                r["error_code"] = serde_json::json!(c);
            }
            if let Some(m) = msg {
                r["message"] = serde_json::json!(m);
            }
            r
        })
        .collect();
    serde_json::json!({ "results": results })
}

/// `GET /executions/{executionID}/logs{query}` with `api_key`.
pub async fn execution_logs_raw(cp: &ControlPlane, api_key: &str, execution_id: &str, query: &str) -> Response {
    tenant(cp, api_key)
        .get(cp.url(&format!("/executions/{execution_id}/logs{query}")))
        .send()
        .await
        .expect("GET /executions/{id}/logs: transport error")
}

/// `GET /executions/{executionID}/logs{query}` expecting 200.
pub async fn execution_logs(
    cp: &ControlPlane,
    api_key: &str,
    execution_id: &str,
    query: &str,
) -> anyhow::Result<ExecutionLogsResponse> {
    expect_json(
        execution_logs_raw(cp, api_key, execution_id, query).await,
        StatusCode::OK,
        &format!("GET /executions/{execution_id}/logs{query}"),
    )
    .await
}

/// The execution of `plan` whose `operation_id` is `op`.
pub fn execution_of<'a>(plan: &'a ApplyPlanResponse, op: &str) -> &'a Execution {
    plan.executions
        .iter()
        .find(|e| e.operation_id == op)
        .with_context(|| format!("plan {} has no execution {op}: {:#?}", plan.plan_id, plan.executions))
        .unwrap()
}
