//! Plans against the real control plane (both backends): apply validation, idempotency, leasing (one agent per
//! plan, also across two replicas on one Postgres database), execution results and the VM states they imply,
//! execution logs, and the audit trail. Agents are simulated with mTLS clients.

use anyhow::Context;
use nkudo_core::api::{
    ApplyPlanResponse, LeasedPlan, LogIngestResponse, ACTION_CREATE, ACTION_DELETE, ACTION_START, ACTION_STOP,
};
use nkudo_tests::*;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339()
}

fn ids(plans: &[LeasedPlan]) -> Vec<String> {
    plans.iter().map(|p| p.plan_id.clone()).collect()
}

/// The fixture's tenant and API key with another site of the same tenant.
async fn second_site(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Fixture> {
    let site = create_site(cp, &fx.api_key, fx.tenant_id(), &unique("site")).await?;
    Ok(Fixture {
        tenant: fx.tenant.clone(),
        api_key: fx.api_key.clone(),
        site,
    })
}

/// Applies `body` expecting 400 `VALIDATION_FAILED` whose message names `field`; returns the message.
async fn expect_refused(cp: &ControlPlane, fx: &Fixture, what: &str, body: &Value, field: &str) -> String {
    let r = apply_raw(cp, &fx.api_key, fx.site_id(), body).await;
    let err = expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert!(
        err.error.contains(field),
        "{what}: the error must name {field:?}, got {:?} (body {body})",
        err.error
    );
    err.error
}

fn create_json(vm_id: &str) -> Value {
    json!({
        "operation": "CREATE",
        "vm_id": vm_id,
        "vcpu_count": VCPU,
        "memory_mib": MEMORY_MIB,
        "kernel_path": KERNEL_PATH,
        "cmdline": CMDLINE,
        "disk_image": DISK_IMAGE,
    })
}

/// `create_json` with `changes` applied (a `null` value removes the key).
fn create_with(vm_id: &str, changes: Value) -> Value {
    let mut a = create_json(vm_id);
    for (k, v) in changes.as_object().expect("changes object") {
        if v.is_null() {
            a.as_object_mut().unwrap().remove(k);
        } else {
            a[k] = v.clone();
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------------------
// 1. Apply validation

async fn apply_validation(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let vm = unique("vm");
    // Every refused body uses the same idempotency key: a refused apply must store nothing, so the key stays free.
    let key = unique("key");
    let body = |actions: Value| json!({ "idempotency_key": key, "actions": actions });

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "CREATE without kernel_path and without firmware_path",
            body(json!([create_with(&vm, json!({"kernel_path": null}))])),
            "actions[0].kernel_path",
        ),
        (
            "CREATE without cmdline",
            body(json!([create_with(&vm, json!({"cmdline": null}))])),
            "actions[0].cmdline",
        ),
        (
            "CREATE without disk_image and without initramfs_path",
            body(json!([create_with(&vm, json!({"disk_image": null}))])),
            "actions[0].disk_image",
        ),
        (
            "relative kernel_path",
            body(json!([create_with(&vm, json!({"kernel_path": "images/vmlinux"}))])),
            "actions[0].kernel_path",
        ),
        (
            "relative disk_image",
            body(json!([create_with(&vm, json!({"disk_image": "rootfs.raw"}))])),
            "actions[0].disk_image",
        ),
        (
            "relative initramfs_path",
            body(json!([create_with(&vm, json!({"initramfs_path": "boot/initrd"}))])),
            "actions[0].initramfs_path",
        ),
        (
            "relative firmware_path",
            body(json!([create_with(
                &vm,
                json!({"kernel_path": null, "cmdline": null, "firmware_path": "hypervisor-fw"})
            )])),
            "actions[0].firmware_path",
        ),
        (
            "kernel_path escaping with ..",
            body(json!([create_with(
                &vm,
                json!({"kernel_path": "/var/lib/nkudo/../../etc/shadow"})
            )])),
            "actions[0].kernel_path",
        ),
        (
            "the second action cannot boot",
            body(json!([
                create_json(&vm),
                create_with(&unique("vm"), json!({"cmdline": null}))
            ])),
            "actions[1].cmdline",
        ),
        (
            "START on an unknown VM",
            body(json!([{"operation": "START", "vm_id": unique("vm-unknown")}])),
            "actions[0].vm_id",
        ),
        (
            "unknown operation",
            body(json!([{"operation": "REBOOT", "vm_id": vm}])),
            "actions[0].operation",
        ),
        (
            "unknown field in an action",
            body(json!([create_with(&vm, json!({"kernal_path": "/boot/vmlinux"}))])),
            "kernal_path",
        ),
        ("empty actions", body(json!([])), "actions"),
        ("no actions at all", json!({ "idempotency_key": key }), "actions"),
    ];
    for (what, b, field) in &cases {
        expect_refused(&cp, &fx, what, b, field).await;
    }
    assert!(
        site_executions(&cp, &fx).await?.is_empty(),
        "refused plans must create no execution"
    );
    assert!(site_vms(&cp, &fx).await?.is_empty(), "refused plans must create no VM");

    // Another tenant's key on this site: 404, nothing created.
    let other = bootstrap(&cp).await?;
    let valid = json!({ "idempotency_key": key, "actions": [create_json(&vm)] });
    let r = apply_raw(&cp, &other.api_key, fx.site_id(), &valid).await;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;

    // A valid plan, under the key the refused bodies used: CREATE (no operation id), start (lower case, own
    // operation id), STOP (no operation id).
    let body = json!({
        "idempotency_key": key,
        "client_request_id": "req-1",
        "actions": [
            create_json(&vm),
            {"operation": "start", "vm_id": vm, "operation_id": "boot-it"},
            {"operation": "STOP", "vm_id": vm},
        ]
    });
    let r = apply_raw(&cp, &fx.api_key, fx.site_id(), &body).await;
    let plan: ApplyPlanResponse = expect_json(r, StatusCode::OK, "POST /sites/{id}/plans (valid)").await?;
    assert!(!plan.plan_id.is_empty());
    assert!(
        !plan.deduplicated,
        "the key was only used by refused bodies: this is a new plan"
    );
    assert_eq!(plan.plan_status, "PENDING");
    assert_eq!(plan.plan_version, 1, "first plan of the site");
    assert_eq!(
        plan.executions.len(),
        3,
        "one execution per action: {:#?}",
        plan.executions
    );
    let want = [("create-1", "CREATE"), ("boot-it", "START"), ("stop-3", "STOP")];
    for (e, (op_id, op)) in plan.executions.iter().zip(want) {
        assert_eq!(e.operation_id, op_id, "operation id (generated when missing): {e:#?}");
        assert_eq!(e.operation_type, op);
        assert_eq!(e.state, "PENDING", "{e:#?}");
        assert_eq!(e.plan_id, plan.plan_id);
        assert_eq!(e.site_id, fx.site.id);
        assert_eq!(e.tenant_id, fx.tenant.id);
        assert_eq!(e.vm_id.as_deref(), Some(vm.as_str()));
        assert!(e.error_code.is_none() && e.error_message.is_none(), "{e:#?}");
        assert!(e.agent_id.is_none() && e.host_id.is_none(), "not run yet: {e:#?}");
        assert!(e.started_at.is_none() && e.completed_at.is_none(), "{e:#?}");
    }
    let distinct: BTreeSet<&str> = plan.executions.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(distinct.len(), 3, "execution ids must differ");
    let read = get_plan(&cp, &fx, &plan.plan_id).await?;
    assert_eq!(read.executions, plan.executions, "GET plan returns the same executions");
    assert_eq!(read.plan_status, "PENDING");
    assert!(!read.deduplicated);
    let listed = site_executions(&cp, &fx).await?;
    assert_eq!(listed.len(), 3);
    let vmrow = site_vm(&cp, &fx, &vm).await?;
    assert_eq!((vmrow.vcpu_count, vmrow.memory_mib), (VCPU, MEMORY_MIB));
    assert_eq!(vmrow.host_id, "", "no host runs it yet");
    assert_eq!(vmrow.site_id, fx.site.id);

    // Other boot forms are valid: kernel + initramfs without a disk, firmware + disk; a CREATE without vm_id gets one.
    let r = apply_raw(
        &cp,
        &fx.api_key,
        fx.site_id(),
        &json!({"idempotency_key": unique("key"), "actions": [
            {"operation": "CREATE", "kernel_path": KERNEL_PATH, "cmdline": CMDLINE, "initramfs_path": INITRAMFS_PATH},
            {"operation": "Create", "firmware_path": FIRMWARE_PATH, "disk_image": DISK_IMAGE},
        ]}),
    )
    .await;
    let p2: ApplyPlanResponse = expect_json(r, StatusCode::OK, "initramfs and firmware boots").await?;
    assert_eq!(p2.plan_version, 2);
    assert_eq!(p2.executions.len(), 2);
    for e in &p2.executions {
        assert!(
            e.vm_id.as_deref().is_some_and(|v| !v.is_empty()),
            "a CREATE without vm_id gets one: {e:#?}"
        );
    }
    assert_ne!(p2.executions[0].vm_id, p2.executions[1].vm_id);

    // Reading a plan: another tenant's key, and another site of the same tenant, get 404.
    let r = tenant(&cp, &other.api_key)
        .get(cp.url(&format!("/sites/{}/plans/{}", fx.site_id(), plan.plan_id)))
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let site2 = second_site(&cp, &fx).await?;
    let r = tenant(&cp, &fx.api_key)
        .get(cp.url(&format!("/sites/{}/plans/{}", site2.site_id(), plan.plan_id)))
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    Ok(())
}
both_backends!(apply_validation => apply_validation_sqlite, apply_validation_postgres);

// ---------------------------------------------------------------------------------------------------------
// 2. Idempotency

async fn apply_idempotency(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let vm = unique("vm");
    let key = unique("key");
    let req = plan_request(&key, vec![create_action(&vm), vm_action("START", &vm)]);
    let first = apply_plan(&cp, &fx, &req).await?;
    assert!(!first.deduplicated);
    let count = site_executions(&cp, &fx).await?.len();
    assert_eq!(count, 2);

    let again = apply_plan(&cp, &fx, &req).await?;
    assert_eq!(again.plan_id, first.plan_id, "same key + same body → same plan");
    assert!(again.deduplicated, "a repeat must say deduplicated=true");
    assert_eq!(again.plan_version, first.plan_version);
    assert_eq!(again.executions, first.executions, "the same executions");
    assert_eq!(
        site_executions(&cp, &fx).await?.len(),
        count,
        "a repeat creates no execution"
    );

    // The same body with its keys in another order is the same request.
    let reordered = json!({
        "actions": [
            {"disk_image": DISK_IMAGE, "cmdline": CMDLINE, "kernel_path": KERNEL_PATH, "memory_mib": MEMORY_MIB,
             "vcpu_count": VCPU, "vm_id": vm, "operation": "CREATE"},
            {"vm_id": vm, "operation": "START"}
        ],
        "idempotency_key": key
    });
    let r = apply_raw(&cp, &fx.api_key, fx.site_id(), &reordered).await;
    let third: ApplyPlanResponse = expect_json(r, StatusCode::OK, "same body, keys reordered").await?;
    assert_eq!(third.plan_id, first.plan_id);
    assert!(third.deduplicated);

    // Same key, another body: 409, nothing created.
    let other_body = plan_request(&key, vec![create_action(&vm)]);
    let r = apply_raw(&cp, &fx.api_key, fx.site_id(), &serde_json::to_value(&other_body)?).await;
    expect_error(r, StatusCode::CONFLICT, "CONFLICT").await;
    let mut changed = req.clone();
    changed.actions[0].memory_mib = Some(MEMORY_MIB * 2);
    let r = apply_raw(&cp, &fx.api_key, fx.site_id(), &serde_json::to_value(&changed)?).await;
    expect_error(r, StatusCode::CONFLICT, "CONFLICT").await;
    assert_eq!(site_executions(&cp, &fx).await?.len(), count);
    assert_eq!(
        site_vm(&cp, &fx, &vm).await?.memory_mib,
        MEMORY_MIB,
        "a conflicting body changes nothing"
    );

    // 8 concurrent applies with one key and one body: one plan, one set of executions.
    const N: usize = 8;
    let race_vm = unique("vm-race");
    let race = plan_request(
        &unique("key-race"),
        vec![
            create_action(&race_vm),
            vm_action("START", &race_vm),
            vm_action("STOP", &race_vm),
        ],
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..N {
        // Each contender opens its TLS connection before the barrier.
        let client = tenant(&cp, &fx.api_key);
        client.get(cp.url("/healthz")).send().await?;
        let url = cp.url(&format!("/sites/{}/plans", fx.site_id()));
        let body = race.clone();
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            let r = client.post(url).json(&body).send().await?;
            expect_json::<ApplyPlanResponse>(r, StatusCode::OK, "concurrent apply").await
        });
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        answers.push(r??);
    }
    let plan_ids: BTreeSet<&str> = answers.iter().map(|a| a.plan_id.as_str()).collect();
    assert_eq!(
        plan_ids.len(),
        1,
        "{N} concurrent applies made several plans: {plan_ids:?}"
    );
    let fresh = answers.iter().filter(|a| !a.deduplicated).count();
    assert_eq!(fresh, 1, "exactly one answer creates the plan, the others are repeats");
    let race_plan = plan_ids.into_iter().next().unwrap().to_string();
    for a in &answers {
        assert_eq!(
            a.executions, answers[0].executions,
            "every answer shows the same executions"
        );
    }
    let all = site_executions(&cp, &fx).await?;
    assert_eq!(
        all.iter().filter(|e| e.plan_id == race_plan).count(),
        3,
        "one set of executions"
    );
    assert_eq!(all.len(), count + 3, "no other execution appeared: {all:#?}");
    assert_eq!(site_vms(&cp, &fx).await?.iter().filter(|v| v.id == race_vm).count(), 1);

    // 4 concurrent applies with one key and different bodies: one plan, the others 409.
    const M: usize = 4;
    let key = unique("key-race-diff");
    let barrier = Arc::new(tokio::sync::Barrier::new(M));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..M {
        let client = tenant(&cp, &fx.api_key);
        client.get(cp.url("/healthz")).send().await?;
        let url = cp.url(&format!("/sites/{}/plans", fx.site_id()));
        let body = plan_request(&key, vec![create_action(&unique("vm-diff"))]);
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            let r = client.post(url).json(&body).send().await?;
            let status = r.status();
            Ok::<_, anyhow::Error>((status, r.text().await?))
        });
    }
    let mut created = Vec::new();
    while let Some(r) = set.join_next().await {
        let (status, text) = r??;
        match status {
            StatusCode::OK => created.push(serde_json::from_str::<ApplyPlanResponse>(&text)?),
            StatusCode::CONFLICT => assert!(text.contains("\"CONFLICT\""), "{text}"),
            other => panic!("concurrent apply with another body: {other} {text}"),
        }
    }
    assert_eq!(created.len(), 1, "one body wins, the others get 409: {created:#?}");
    assert!(!created[0].deduplicated);
    let all = site_executions(&cp, &fx).await?;
    assert_eq!(all.len(), count + 3 + 1, "one execution for the winner only: {all:#?}");
    Ok(())
}
both_backends!(apply_idempotency => apply_idempotency_sqlite, apply_idempotency_postgres);

// ---------------------------------------------------------------------------------------------------------
// 3. Leasing

fn check_leased(lp: &LeasedPlan, plan: &ApplyPlanResponse) {
    assert_eq!(lp.plan_id, plan.plan_id);
    assert_eq!(
        lp.execution_id, plan.plan_id,
        "the plan-level execution_id is the plan id"
    );
    let leased_ids: Vec<Option<&str>> = lp.actions.iter().map(|a| a.execution_id.as_deref()).collect();
    let plan_ids: Vec<Option<&str>> = plan.executions.iter().map(|e| Some(e.id.as_str())).collect();
    assert_eq!(
        leased_ids, plan_ids,
        "each leased action carries its execution's id, in order"
    );
    for (a, e) in lp.actions.iter().zip(&plan.executions) {
        assert_eq!(a.action_id, e.operation_id);
        assert!(a.timeout > 0, "{a:?}");
    }
}

async fn leasing(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::builder(backend).env("MAX_PENDING_PLANS", "1").start());
    let fx = bootstrap(&cp).await?;
    let a1 = enroll_agent(&cp, &fx, "edge-lease-1").await?;
    let a2 = enroll_agent(&cp, &fx, "edge-lease-2").await?;
    let a3 = enroll_agent(&cp, &fx, "edge-lease-3").await?;
    let (c1, c2, c3) = (a1.client(&cp), a2.client(&cp), a3.client(&cp));
    // Another site of the same tenant, and another tenant, each with an agent and a plan of their own.
    let fx_site2 = second_site(&cp, &fx).await?;
    let b1 = enroll_agent(&cp, &fx_site2, "edge-site2").await?.client(&cp);
    let fx_other = bootstrap(&cp).await?;
    let o1 = enroll_agent(&cp, &fx_other, "edge-other").await?.client(&cp);

    let vm = unique("vm");
    let plan_a = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&vm), vm_action("START", &vm)]),
    )
    .await?;

    // The heartbeat answer carries the lease: the plan with both actions and their parameters.
    let hb = heartbeat(&cp, &c1, &json!({"agent_id": a1.agent_id()})).await?;
    assert_eq!(hb.pending_plans.len(), 1, "{:#?}", hb.pending_plans);
    let lp = &hb.pending_plans[0];
    check_leased(lp, &plan_a);
    assert_eq!(lp.actions.len(), 2);
    let (create, start) = (&lp.actions[0], &lp.actions[1]);
    assert_eq!(create.action_type, ACTION_CREATE);
    assert_eq!(start.action_type, ACTION_START);
    assert_eq!(create.action_id, "create-1");
    assert_eq!(start.action_id, "start-2");
    let p = &create.params;
    assert_eq!(p["vm_id"], json!(vm));
    assert_eq!(p["kernel_path"], json!(KERNEL_PATH));
    assert_eq!(p["cmdline"], json!(CMDLINE));
    assert_eq!(
        p["rootfs_path"],
        json!(DISK_IMAGE),
        "the disk image is sent as rootfs_path"
    );
    assert_eq!(p["vcpu"], json!(VCPU));
    assert_eq!(p["memory_mib"], json!(MEMORY_MIB));
    assert!(p["name"].as_str().is_some_and(|n| !n.is_empty()), "{p}");
    assert_eq!(start.params, json!({"vm_id": vm}), "START carries only vm_id");

    // While the lease holds, the site's other agents get nothing (plans/next and heartbeat alike).
    assert!(next_plans(&cp, &c2).await?.is_empty(), "a2 must not get a1's plan");
    let hb2 = heartbeat(&cp, &c2, &json!({})).await?;
    assert!(hb2.pending_plans.is_empty(), "{:#?}", hb2.pending_plans);
    assert!(next_plans(&cp, &c3).await?.is_empty());
    // The holder gets it again, unchanged.
    let again = next_plans(&cp, &c1).await?;
    assert_eq!(again, hb.pending_plans, "the holder gets its plan again");
    // Leasing starts nothing: the executions are still PENDING.
    let read = get_plan(&cp, &fx, &plan_a.plan_id).await?;
    assert!(read.executions.iter().all(|e| e.state == "PENDING"), "{read:#?}");

    // Agents of another site or tenant never see it, and get their own plans.
    let vm2 = unique("vm");
    let plan_s2 = apply_plan(&cp, &fx_site2, &plan_request(&unique("key"), vec![create_action(&vm2)])).await?;
    let vm3 = unique("vm");
    let plan_o = apply_plan(&cp, &fx_other, &plan_request(&unique("key"), vec![create_action(&vm3)])).await?;
    let got = next_plans(&cp, &b1).await?;
    assert_eq!(
        ids(&got),
        vec![plan_s2.plan_id.clone()],
        "an agent of another site gets only its site's plan"
    );
    let got = heartbeat(&cp, &o1, &json!({})).await?.pending_plans;
    assert_eq!(
        ids(&got),
        vec![plan_o.plan_id.clone()],
        "an agent of another tenant gets only its tenant's plan"
    );

    // MAX_PENDING_PLANS=1: one plan per lease, oldest first.
    let plan_b = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&unique("vm"))]),
    )
    .await?;
    let plan_c = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&unique("vm"))]),
    )
    .await?;
    assert_eq!(
        ids(&next_plans(&cp, &c1).await?),
        vec![plan_a.plan_id.clone()],
        "a1 holds A; one plan per lease"
    );
    let got = next_plans(&cp, &c2).await?;
    assert_eq!(
        ids(&got),
        vec![plan_b.plan_id.clone()],
        "a2 gets the oldest free plan, one only"
    );
    check_leased(&got[0], &plan_b);
    assert_eq!(ids(&next_plans(&cp, &c3).await?), vec![plan_c.plan_id.clone()]);
    assert_eq!(ids(&next_plans(&cp, &c2).await?), vec![plan_b.plan_id.clone()]);
    assert_eq!(ids(&next_plans(&cp, &c1).await?), vec![plan_a.plan_id.clone()]);
    for c in [&b1, &o1] {
        let seen = ids(&next_plans(&cp, c).await?);
        for p in [&plan_a, &plan_b, &plan_c] {
            assert!(!seen.contains(&p.plan_id), "foreign agent saw {}: {seen:?}", p.plan_id);
        }
    }
    Ok(())
}
both_backends!(leasing => leasing_sqlite, leasing_postgres);

async fn lease_expiry(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::builder(backend).env("PLAN_LEASE_TTL", "2s").start());
    let fx = bootstrap(&cp).await?;
    let a1 = enroll_agent(&cp, &fx, "edge-ttl-1").await?.client(&cp);
    let a2 = enroll_agent(&cp, &fx, "edge-ttl-2").await?.client(&cp);
    let plan = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&unique("vm"))]),
    )
    .await?;
    let got = next_plans(&cp, &a1).await?;
    let leased_at = Instant::now();
    assert_eq!(ids(&got), vec![plan.plan_id.clone()]);
    let other = next_plans(&cp, &a2).await?;
    if leased_at.elapsed() < Duration::from_millis(1500) {
        assert!(other.is_empty(), "the lease holds for 2 s: {other:?}");
    } else {
        eprintln!("note: machine too slow to check the 2 s lease before it expired");
    }
    tokio::time::sleep(Duration::from_millis(2600).saturating_sub(leased_at.elapsed())).await;
    let got = next_plans(&cp, &a2).await?;
    assert_eq!(
        ids(&got),
        vec![plan.plan_id.clone()],
        "after expiry another agent gets it"
    );
    let taken_at = Instant::now();
    let back = next_plans(&cp, &a1).await?;
    if taken_at.elapsed() < Duration::from_millis(1500) {
        assert!(back.is_empty(), "the plan now belongs to a2's lease: {back:?}");
    }

    // Default MAX_PENDING_PLANS (2): two plans per lease, oldest first (own site so that timing cannot matter).
    let fx2 = second_site(&cp, &fx).await?;
    let b = enroll_agent(&cp, &fx2, "edge-ttl-3").await?.client(&cp);
    let mut want = Vec::new();
    for _ in 0..3 {
        let p = apply_plan(
            &cp,
            &fx2,
            &plan_request(&unique("key"), vec![create_action(&unique("vm"))]),
        )
        .await?;
        want.push(p.plan_id);
    }
    assert_eq!(ids(&next_plans(&cp, &b).await?), want[..2].to_vec());
    Ok(())
}
both_backends!(lease_expiry => lease_expiry_sqlite, lease_expiry_postgres);

// ---------------------------------------------------------------------------------------------------------
// 4. Concurrent leasing: 4 agents, 20 plans, one or two replicas

const CONCURRENT_PLANS: usize = 20;
const CONCURRENT_AGENTS: usize = 4;

#[derive(Default)]
struct LeaseLog {
    /// plan id → agents (index) that were handed it.
    holders: BTreeMap<String, BTreeSet<usize>>,
    /// Human-readable description of every plan handed to a second agent.
    violations: Vec<String>,
    completed: BTreeSet<String>,
    /// plan id → agent that completed it.
    completed_by: BTreeMap<String, usize>,
    lease_calls: usize,
}

/// Applies [`CONCURRENT_PLANS`] plans (CREATE + START of a new VM each) and lets [`CONCURRENT_AGENTS`] agents
/// lease them concurrently, alternating between `replicas` (and between `GET /v1/plans/next` and the heartbeat).
/// An agent completes a plan (reports both actions) only the second time it is handed it, so plans stay leased
/// while the others keep asking. Asserts that every plan went to exactly one agent and that all were handed out.
async fn lease_concurrently(replicas: &[&ControlPlane], fx: &Fixture, agents: &[EnrolledAgent]) -> anyhow::Result<()> {
    let mut applied: BTreeMap<String, ApplyPlanResponse> = BTreeMap::new();
    for i in 0..CONCURRENT_PLANS {
        let cp = replicas[i % replicas.len()];
        let vm = unique("vm-conc");
        let p = apply_plan(
            cp,
            fx,
            &plan_request(&unique("key"), vec![create_action(&vm), vm_action("START", &vm)]),
        )
        .await?;
        applied.insert(p.plan_id.clone(), p);
    }
    let applied = Arc::new(applied);
    let log = Arc::new(Mutex::new(LeaseLog::default()));
    let barrier = Arc::new(tokio::sync::Barrier::new(agents.len()));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut set = tokio::task::JoinSet::new();
    for (idx, agent) in agents.iter().enumerate() {
        // One client per replica, connected before the barrier.
        let mut clients: Vec<(String, Client)> = Vec::new();
        for cp in replicas {
            let c = agent.client(cp);
            c.get(cp.url("/healthz")).send().await?;
            clients.push((cp.base_url.clone(), c));
        }
        let (log, applied, barrier) = (log.clone(), applied.clone(), barrier.clone());
        let agent_id = agent.agent_id().to_string();
        set.spawn(async move {
            barrier.wait().await;
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let mut round = 0usize;
            loop {
                if log.lock().unwrap().completed.len() == applied.len() {
                    return Ok::<(), anyhow::Error>(());
                }
                anyhow::ensure!(Instant::now() < deadline, "agent {idx}: plans still open after 90 s");
                let (base, client) = &clients[(idx + round) % clients.len()];
                let plans: Vec<LeasedPlan> = if round.is_multiple_of(2) {
                    let r = client.get(format!("{base}/v1/plans/next")).send().await?;
                    expect_json::<nkudo_core::api::NextPlansResponse>(r, StatusCode::OK, "GET /v1/plans/next")
                        .await?
                        .plans
                } else {
                    let r = client
                        .post(format!("{base}/v1/heartbeat"))
                        .json(&json!({"agent_id": agent_id}))
                        .send()
                        .await?;
                    expect_json::<nkudo_core::api::HeartbeatResponse>(r, StatusCode::OK, "POST /v1/heartbeat")
                        .await?
                        .pending_plans
                };
                let mut to_complete = Vec::new();
                {
                    let mut l = log.lock().unwrap();
                    l.lease_calls += 1;
                    for p in &plans {
                        let holders = l.holders.entry(p.plan_id.clone()).or_default();
                        holders.insert(idx);
                        if holders.len() > 1 {
                            let msg = format!(
                                "plan {} handed to agents {holders:?} (latest: agent {idx} via {base}, round {round})",
                                p.plan_id
                            );
                            l.violations.push(msg);
                        }
                        if l.completed.contains(&p.plan_id) {
                            l.violations.push(format!(
                                "plan {} handed to agent {idx} after it was completed",
                                p.plan_id
                            ));
                        }
                        let n = seen.entry(p.plan_id.clone()).or_default();
                        *n += 1;
                        if *n >= 2 {
                            to_complete.push(p.clone());
                        }
                    }
                }
                for p in &plans {
                    let Some(ap) = applied.get(&p.plan_id) else {
                        anyhow::bail!("agent {idx} was handed an unknown plan {}", p.plan_id);
                    };
                    // Only unfinished actions are handed out; the ids are the plan's execution ids.
                    for a in &p.actions {
                        anyhow::ensure!(
                            ap.executions
                                .iter()
                                .any(|e| Some(e.id.as_str()) == a.execution_id.as_deref()
                                    && e.operation_id == a.action_id),
                            "leased action {a:?} is not an execution of plan {}",
                            p.plan_id
                        );
                    }
                }
                for p in to_complete {
                    // Report through the other replica.
                    let (base, client) = &clients[(idx + round + 1) % clients.len()];
                    let results: Vec<Value> = p
                        .actions
                        .iter()
                        .map(|a| json!({"execution_id": a.execution_id, "action_id": a.action_id, "ok": true}))
                        .collect();
                    let r = client
                        .post(format!("{base}/v1/executions/result"))
                        .json(&json!({"plan_id": p.plan_id, "results": results}))
                        .send()
                        .await?;
                    let ack: ResultAck = expect_json(r, StatusCode::ACCEPTED, "POST /v1/executions/result").await?;
                    anyhow::ensure!(
                        ack.unknown == 0,
                        "agent {idx}: results of {} unknown: {ack:?}",
                        p.plan_id
                    );
                    let mut l = log.lock().unwrap();
                    l.completed.insert(p.plan_id.clone());
                    l.completed_by.insert(p.plan_id.clone(), idx);
                }
                round += 1;
            }
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Err(e) = r.context("agent task panicked")? {
            errors.push(format!("{e:#}"));
        }
    }
    let l = std::mem::take(&mut *log.lock().unwrap());
    let per_agent: Vec<usize> = (0..agents.len())
        .map(|i| l.holders.values().filter(|h| h.contains(&i)).count())
        .collect();
    eprintln!(
        "concurrent leasing over {} replica(s): {} lease calls, plans per agent {per_agent:?}",
        replicas.len(),
        l.lease_calls
    );
    assert!(
        l.violations.is_empty(),
        "plans handed to more than one agent while leased:\n{}",
        l.violations.join("\n")
    );
    assert!(errors.is_empty(), "agent errors:\n{}", errors.join("\n"));
    let handed: BTreeSet<&String> = l.holders.keys().collect();
    let want: BTreeSet<&String> = applied.keys().collect();
    assert_eq!(handed, want, "all {CONCURRENT_PLANS} plans must be handed out");
    for (plan, holders) in &l.holders {
        assert_eq!(holders.len(), 1, "plan {plan} went to agents {holders:?}");
    }
    assert_eq!(l.completed.len(), CONCURRENT_PLANS, "every plan was completed");

    // Every plan ended SUCCEEDED, its executions run by the one agent that held it.
    for (plan_id, idx) in &l.completed_by {
        assert!(l.holders[plan_id].contains(idx));
        let p = get_plan(replicas[0], fx, plan_id).await?;
        assert_eq!(p.plan_status, "SUCCEEDED", "{p:#?}");
        for e in &p.executions {
            assert_eq!(e.state, "SUCCEEDED", "{e:#?}");
            assert_eq!(e.agent_id.as_deref(), Some(agents[*idx].agent_id()), "{e:#?}");
        }
    }
    Ok(())
}

async fn two_replicas_lease_each_plan_once(backend: Backend) -> anyhow::Result<()> {
    if backend != Backend::Postgres {
        print_skip("two replicas need a shared Postgres database; this scenario runs on Postgres only");
        return Ok(());
    }
    let cp1 = start_or_skip!(ControlPlane::builder(backend)
        .env("PLAN_LEASE_TTL", "60s")
        .env("MAX_PENDING_PLANS", "2")
        .start());
    let url = cp1
        .database_url
        .clone()
        .context("postgres control plane without database_url")?;
    let cp2 = ControlPlane::builder(backend)
        .replica_of(&cp1)?
        .env("PLAN_LEASE_TTL", "60s")
        .env("MAX_PENDING_PLANS", "2")
        .start()
        .await?
        .context("second replica")?;
    assert_eq!(cp2.database_url.as_deref(), Some(url.as_str()));
    assert_ne!(cp1.base_url, cp2.base_url);

    let fx = bootstrap(&cp1).await?;
    // Enroll through both replicas; every agent then talks to both.
    let mut agents = Vec::new();
    for i in 0..CONCURRENT_AGENTS {
        let cp = if i % 2 == 0 { &cp1 } else { &cp2 };
        agents.push(enroll_agent(cp, &fx, &format!("edge-replica-{i}")).await?);
    }
    for a in &agents {
        for cp in [&cp1, &cp2] {
            let r = a
                .client(cp)
                .post(cp.url("/v1/heartbeat"))
                .json(&json!({}))
                .send()
                .await?;
            assert_eq!(
                r.status(),
                StatusCode::OK,
                "agent trusted by both replicas: {}",
                r.text().await?
            );
        }
    }
    lease_concurrently(&[&cp1, &cp2], &fx, &agents).await?;
    let out = cp1.run_cli(["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify after concurrent work on two replicas:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
both_backends!(two_replicas_lease_each_plan_once => two_replicas_lease_each_plan_once_sqlite, two_replicas_lease_each_plan_once_postgres);

async fn concurrent_leasing_one_replica(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::builder(backend).env("PLAN_LEASE_TTL", "60s").start());
    let fx = bootstrap(&cp).await?;
    let mut agents = Vec::new();
    for i in 0..CONCURRENT_AGENTS {
        agents.push(enroll_agent(&cp, &fx, &format!("edge-conc-{i}")).await?);
    }
    lease_concurrently(&[&cp], &fx, &agents).await
}
both_backends!(concurrent_leasing_one_replica => concurrent_leasing_one_replica_sqlite, concurrent_leasing_one_replica_postgres);

// ---------------------------------------------------------------------------------------------------------
// 5. Results

async fn results_and_vm_states(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let a1 = enroll_agent(&cp, &fx, "edge-res-1").await?;
    let a2 = enroll_agent(&cp, &fx, "edge-res-2").await?;
    let (c1, c2) = (a1.client(&cp), a2.client(&cp));
    let fx_site2 = second_site(&cp, &fx).await?;
    let foreign = enroll_agent(&cp, &fx_site2, "edge-res-site2").await?.client(&cp);

    // Plan 1: CREATE + START; the START fails.
    let vm1 = unique("vm");
    let p1 = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&vm1), vm_action("START", &vm1)]),
    )
    .await?;
    let (e_create, e_start) = (p1.executions[0].id.clone(), p1.executions[1].id.clone());

    // Heartbeat execution_updates: IN_PROGRESS is written before the answer (checked at once, no polling).
    let hb = heartbeat(
        &cp,
        &c1,
        &json!({"agent_id": a1.agent_id(), "execution_updates": [
            {"execution_id": e_create, "state": "IN_PROGRESS", "updated_at": now_rfc3339()}
        ]}),
    )
    .await?;
    let read = get_plan(&cp, &fx, &p1.plan_id).await?;
    let ec = execution_of(&read, "create-1");
    assert_eq!(
        ec.state, "IN_PROGRESS",
        "the heartbeat's update must be written before its answer: {ec:#?}"
    );
    assert!(ec.started_at.is_some(), "{ec:#?}");
    assert!(ec.completed_at.is_none());
    assert_eq!(ec.agent_id.as_deref(), Some(a1.agent_id()));
    assert_eq!(execution_of(&read, "start-2").state, "PENDING");
    assert_eq!(read.plan_status, "IN_PROGRESS");
    assert_eq!(ids(&hb.pending_plans), vec![p1.plan_id.clone()]);

    // Another site's agent cannot report on it (404, nothing changes), nor move it by heartbeat.
    let before = get_plan(&cp, &fx, &p1.plan_id).await?;
    let r = report_raw(
        &cp,
        &foreign,
        &result_body(&[(&e_create, "create-1", false, Some("EVIL"), Some("x"))]),
    )
    .await;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let r = report_raw(
        &cp,
        &foreign,
        &json!({"execution_id": p1.plan_id, "results": [{"action_id": "start-2", "ok": true}]}),
    )
    .await;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    heartbeat(
        &cp,
        &foreign,
        &json!({"execution_updates": [{"execution_id": e_start, "state": "IN_PROGRESS"}]}),
    )
    .await?;
    assert_eq!(
        get_plan(&cp, &fx, &p1.plan_id).await?,
        before,
        "a foreign agent's reports change nothing"
    );
    assert_eq!(site_vm(&cp, &fx, &vm1).await?.state, "CREATING");

    // CREATE succeeded → execution SUCCEEDED, VM STOPPED on a1's host; the lease now carries only START.
    let ack = report(&cp, &c1, &result_body(&[(&e_create, "create-1", true, None, None)])).await?;
    assert_eq!(
        ack,
        ResultAck {
            status: "accepted".into(),
            applied: 1,
            unknown: 0
        }
    );
    let read = get_plan(&cp, &fx, &p1.plan_id).await?;
    let ec = execution_of(&read, "create-1");
    assert_eq!(ec.state, "SUCCEEDED");
    assert!(ec.completed_at.is_some() && ec.error_code.is_none() && ec.error_message.is_none());
    assert_eq!(ec.host_id.as_deref(), Some(a1.enrollment.host_id.as_str()));
    assert_eq!(read.plan_status, "IN_PROGRESS");
    let v = site_vm(&cp, &fx, &vm1).await?;
    assert_eq!(v.state, "STOPPED", "CREATE ok → STOPPED");
    assert_eq!(v.host_id, a1.enrollment.host_id);
    let lease = next_plans(&cp, &c1).await?;
    assert_eq!(lease.len(), 1);
    let left: Vec<&str> = lease[0].actions.iter().map(|a| a.action_id.as_str()).collect();
    assert_eq!(left, vec!["start-2"], "only unfinished actions are leased again");
    assert_eq!(lease[0].actions[0].action_type, ACTION_START);

    // START failed → plan FAILED, VM ERROR.
    let ack = report(
        &cp,
        &c1,
        &result_body(&[(
            &e_start,
            "start-2",
            false,
            Some("BOOT_FAILED"),
            Some("kernel panic: VFS"),
        )]),
    )
    .await?;
    assert_eq!(ack.applied, 1);
    let failed = get_plan(&cp, &fx, &p1.plan_id).await?;
    assert_eq!(failed.plan_status, "FAILED");
    let es = execution_of(&failed, "start-2");
    assert_eq!(es.state, "FAILED");
    assert_eq!(es.error_code.as_deref(), Some("BOOT_FAILED"));
    assert_eq!(es.error_message.as_deref(), Some("kernel panic: VFS"));
    assert!(es.completed_at.is_some());
    assert_eq!(execution_of(&failed, "create-1").state, "SUCCEEDED");
    assert_eq!(site_vm(&cp, &fx, &vm1).await?.state, "ERROR", "failure → ERROR");
    assert!(
        next_plans(&cp, &c1).await?.is_empty(),
        "a finished plan is not leased any more"
    );

    // A later success for the failed execution changes nothing; an identical repeat changes nothing.
    let ack = report(&cp, &c1, &result_body(&[(&e_start, "start-2", true, None, None)])).await?;
    assert_eq!(ack.applied, 0, "{ack:?}");
    let ack = report(
        &cp,
        &c1,
        &result_body(&[(
            &e_start,
            "start-2",
            false,
            Some("BOOT_FAILED"),
            Some("kernel panic: VFS"),
        )]),
    )
    .await?;
    assert_eq!((ack.status.as_str(), ack.applied), ("accepted", 0), "{ack:?}");
    let ack = report(&cp, &c1, &result_body(&[(&e_create, "create-1", true, None, None)])).await?;
    assert_eq!(ack.applied, 0);
    assert_eq!(
        get_plan(&cp, &fx, &p1.plan_id).await?,
        failed,
        "states move only forward; repeats change nothing"
    );
    assert_eq!(site_vm(&cp, &fx, &vm1).await?.state, "ERROR");

    // A report without results is refused.
    let r = report_raw(&cp, &c1, &json!({"results": []})).await;
    expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;

    // Plan 2: three actions, the first fails without code or message → defaults, the others CANCELLED.
    let vm2 = unique("vm");
    let p2 = apply_plan(
        &cp,
        &fx,
        &plan_request(
            &unique("key"),
            vec![create_action(&vm2), vm_action("START", &vm2), vm_action("STOP", &vm2)],
        ),
    )
    .await?;
    assert_eq!(ids(&next_plans(&cp, &c2).await?), vec![p2.plan_id.clone()]);
    let ack = report(
        &cp,
        &c2,
        &json!({"results": [{"execution_id": p2.executions[0].id, "action_id": "create-1", "ok": false}]}),
    )
    .await?;
    assert_eq!(ack.applied, 1);
    let p2r = get_plan(&cp, &fx, &p2.plan_id).await?;
    assert_eq!(p2r.plan_status, "FAILED");
    let e0 = &p2r.executions[0];
    assert_eq!(e0.state, "FAILED");
    assert!(
        e0.error_code.as_deref().is_some_and(|c| !c.is_empty()),
        "a failure without code gets a default code: {e0:#?}"
    );
    assert_eq!(e0.error_code.as_deref(), Some("ACTION_FAILED"), "documented default");
    assert!(
        e0.error_message.as_deref().is_some_and(|m| !m.trim().is_empty()),
        "a failure without message gets a default message: {e0:#?}"
    );
    for e in &p2r.executions[1..] {
        assert_eq!(e.state, "CANCELLED", "actions after a failure are cancelled: {e:#?}");
    }
    assert_eq!(site_vm(&cp, &fx, &vm2).await?.state, "ERROR");

    // Plan 3: CREATE + START reported in the earlier agent's form (execution_id = plan id, action_id,
    // started_at, no per-result execution_id) → STOPPED then RUNNING, plan SUCCEEDED.
    let vm3 = unique("vm");
    let p3 = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&vm3), vm_action("START", &vm3)]),
    )
    .await?;
    assert_eq!(ids(&next_plans(&cp, &c1).await?), vec![p3.plan_id.clone()]);
    let legacy = |action: &str| {
        json!({"execution_id": p3.plan_id, "results": [{
            "action_id": action, "ok": true, "message": "done",
            "started_at": now_rfc3339(), "finished_at": now_rfc3339()
        }]})
    };
    let legacy_http1 = legacy_agent_client(&cp, &a1.cert_pem, &a1.key_pem);
    let ack = report(&cp, &legacy_http1, &legacy("create-1")).await?;
    assert_eq!(
        (ack.applied, ack.unknown),
        (1, 0),
        "earlier agent's form must resolve: {ack:?}"
    );
    assert_eq!(site_vm(&cp, &fx, &vm3).await?.state, "STOPPED");
    assert_eq!(
        execution_of(&get_plan(&cp, &fx, &p3.plan_id).await?, "create-1").state,
        "SUCCEEDED"
    );
    let ack = report(&cp, &legacy_http1, &legacy("start-2")).await?;
    assert_eq!(ack.applied, 1);
    assert_eq!(site_vm(&cp, &fx, &vm3).await?.state, "RUNNING", "START ok → RUNNING");
    let p3r = get_plan(&cp, &fx, &p3.plan_id).await?;
    assert_eq!(p3r.plan_status, "SUCCEEDED");
    assert!(p3r.executions.iter().all(|e| e.state == "SUCCEEDED"));
    // One known and one unknown result: applied 1, unknown 1 (a repeat applies nothing).
    let ack = report(
        &cp,
        &c1,
        &json!({"results": [
            {"execution_id": p3.executions[0].id, "action_id": "create-1", "ok": true},
            {"execution_id": uuid::Uuid::new_v4().to_string(), "action_id": "x", "ok": true}
        ]}),
    )
    .await?;
    assert_eq!((ack.applied, ack.unknown), (0, 1), "{ack:?}");

    // Plan 4: STOP of vm3, placed on a1's host: only a1 gets it.
    let p4 = apply_plan(&cp, &fx, &plan_request(&unique("key"), vec![vm_action("STOP", &vm3)])).await?;
    assert!(
        next_plans(&cp, &c2).await?.is_empty(),
        "a VM placed on a1's host is leased only to a1"
    );
    let lease = next_plans(&cp, &c1).await?;
    assert_eq!(ids(&lease), vec![p4.plan_id.clone()]);
    assert_eq!(lease[0].actions[0].action_type, ACTION_STOP);
    report(
        &cp,
        &c1,
        &result_body(&[(&p4.executions[0].id, "stop-1", true, None, None)]),
    )
    .await?;
    assert_eq!(site_vm(&cp, &fx, &vm3).await?.state, "STOPPED", "STOP ok → STOPPED");

    // Plan 5: DELETE of vm3: IN_PROGRESS by heartbeat, then ok → DELETED, and still listed.
    let p5 = apply_plan(&cp, &fx, &plan_request(&unique("key"), vec![vm_action("DELETE", &vm3)])).await?;
    let lease = next_plans(&cp, &c1).await?;
    assert_eq!(ids(&lease), vec![p5.plan_id.clone()]);
    assert_eq!(lease[0].actions[0].action_type, ACTION_DELETE);
    heartbeat(
        &cp,
        &c1,
        &json!({"execution_updates": [{"execution_id": p5.executions[0].id, "state": "IN_PROGRESS"}]}),
    )
    .await?;
    assert_eq!(
        execution_of(&get_plan(&cp, &fx, &p5.plan_id).await?, "delete-1").state,
        "IN_PROGRESS"
    );
    report(
        &cp,
        &c1,
        &result_body(&[(&p5.executions[0].id, "delete-1", true, None, None)]),
    )
    .await?;
    let v = site_vm(&cp, &fx, &vm3).await?;
    assert_eq!(v.state, "DELETED", "DELETE ok → DELETED, and the VM stays listed");
    assert_eq!(get_plan(&cp, &fx, &p5.plan_id).await?.plan_status, "SUCCEEDED");
    Ok(())
}
both_backends!(results_and_vm_states => results_and_vm_states_sqlite, results_and_vm_states_postgres);

// ---------------------------------------------------------------------------------------------------------
// 6. Logs

fn log_entry(execution_id: &str, sequence: i64, message: &str) -> Value {
    json!({"execution_id": execution_id, "sequence": sequence, "severity": "INFO", "message": message,
           "emitted_at": now_rfc3339()})
}

async fn post_logs(cp: &ControlPlane, agent: &Client, entries: Vec<Value>) -> anyhow::Result<LogIngestResponse> {
    let r = agent
        .post(cp.url("/agents/logs"))
        .json(&json!({"entries": entries}))
        .send()
        .await?;
    expect_json(r, StatusCode::OK, "POST /agents/logs").await
}

async fn execution_logs_flow(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let a1 = enroll_agent(&cp, &fx, "edge-logs").await?;
    let c1 = a1.client(&cp);
    let vm = unique("vm");
    let plan = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&vm), vm_action("START", &vm)]),
    )
    .await?;
    next_plans(&cp, &c1).await?;
    let (e1, e2) = (plan.executions[0].id.clone(), plan.executions[1].id.clone());

    // Out of order in: in order out.
    let ack = post_logs(
        &cp,
        &c1,
        vec![
            log_entry(&e1, 3, "three"),
            log_entry(&e1, 1, "one"),
            log_entry(&e1, 2, "two"),
        ],
    )
    .await?;
    assert_eq!(
        ack,
        LogIngestResponse {
            accepted_frames: 3,
            dropped_frames: 0
        }
    );
    let got = execution_logs(&cp, &fx.api_key, &e1, "").await?;
    let seqs: Vec<(i64, &str)> = got.logs.iter().map(|l| (l.sequence, l.message.as_str())).collect();
    assert_eq!(seqs, vec![(1, "one"), (2, "two"), (3, "three")]);
    assert!(got.next_after_sequence.is_none(), "nothing more follows");
    for l in &got.logs {
        assert_eq!(l.execution_id, e1);
        assert_eq!(l.tenant_id, fx.tenant.id);
        assert_eq!(l.severity, "INFO");
    }

    // Duplicates (against stored lines and within the batch) are dropped and counted.
    let ack = post_logs(
        &cp,
        &c1,
        vec![
            log_entry(&e1, 2, "two again"),
            log_entry(&e1, 4, "four"),
            log_entry(&e1, 4, "four again"),
            log_entry(&e1, 5, "five"),
        ],
    )
    .await?;
    assert_eq!(
        ack,
        LogIngestResponse {
            accepted_frames: 2,
            dropped_frames: 2
        }
    );
    let got = execution_logs(&cp, &fx.api_key, &e1, "").await?;
    let msgs: Vec<&str> = got.logs.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(
        msgs,
        vec!["one", "two", "three", "four", "five"],
        "the first line of a sequence wins"
    );

    // Pagination: limit=2 walks 1,2 | 3,4 | 5.
    let mut walked = Vec::new();
    let mut after: Option<i64> = None;
    let mut pages = 0;
    loop {
        let q = match after {
            Some(s) => format!("?limit=2&after_sequence={s}"),
            None => "?limit=2".to_string(),
        };
        let page = execution_logs(&cp, &fx.api_key, &e1, &q).await?;
        pages += 1;
        assert!(page.logs.len() <= 2, "limit=2 returned {}", page.logs.len());
        walked.extend(page.logs.iter().map(|l| l.sequence));
        match page.next_after_sequence {
            Some(next) => {
                assert_eq!(
                    Some(next),
                    page.logs.last().map(|l| l.sequence),
                    "next_after_sequence = last sequence"
                );
                after = Some(next);
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(walked, vec![1, 2, 3, 4, 5]);
    assert_eq!(pages, 3);
    let page = execution_logs(&cp, &fx.api_key, &e1, "?limit=2&after_sequence=3").await?;
    assert_eq!(page.logs.iter().map(|l| l.sequence).collect::<Vec<_>>(), vec![4, 5]);
    let r = execution_logs_raw(&cp, &fx.api_key, &e1, "?limit=0").await;
    expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    let r = execution_logs_raw(&cp, &fx.api_key, &e1, "?limit=2001").await;
    expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;

    // The earlier agent's frame on /v1/logs: execution_id = plan id + action_id, `level`.
    let r = legacy_agent_client(&cp, &a1.cert_pem, &a1.key_pem)
        .post(cp.url("/v1/logs"))
        .json(
            &json!({"execution_id": plan.plan_id, "action_id": "start-2", "sequence": 1, "level": "warn",
                      "message": "booting", "emitted_at": now_rfc3339()}),
        )
        .send()
        .await?;
    let ack: LogIngestResponse = expect_json(r, StatusCode::ACCEPTED, "POST /v1/logs").await?;
    assert_eq!(ack.accepted_frames, 1);
    let got = execution_logs(&cp, &fx.api_key, &e2, "").await?;
    assert_eq!(got.logs.len(), 1, "{:#?}", got.logs);
    assert_eq!(
        (
            got.logs[0].sequence,
            got.logs[0].severity.as_str(),
            got.logs[0].message.as_str()
        ),
        (1, "WARN", "booting")
    );
    assert_eq!(
        got.logs[0].execution_id, e2,
        "the frame lands on the action's execution"
    );
    assert_eq!(execution_logs(&cp, &fx.api_key, &e1, "").await?.logs.len(), 5);

    // Another tenant's key: 404. Another site's agent cannot write to it. A body agent_id of another agent: 403.
    let other = bootstrap(&cp).await?;
    let r = execution_logs_raw(&cp, &other.api_key, &e1, "").await;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let site2 = second_site(&cp, &fx).await?;
    let foreign = enroll_agent(&cp, &site2, "edge-logs-site2").await?.client(&cp);
    let ack = post_logs(&cp, &foreign, vec![log_entry(&e1, 6, "intruder")]).await?;
    assert_eq!(ack.accepted_frames, 0, "{ack:?}");
    assert_eq!(execution_logs(&cp, &fx.api_key, &e1, "").await?.logs.len(), 5);
    let r = c1
        .post(cp.url("/agents/logs"))
        .json(&json!({"agent_id": uuid::Uuid::new_v4().to_string(), "entries": [log_entry(&e1, 7, "x")]}))
        .send()
        .await?;
    expect_error(r, StatusCode::FORBIDDEN, "AGENT_ID_MISMATCH").await;
    Ok(())
}
both_backends!(execution_logs_flow => execution_logs_flow_sqlite, execution_logs_flow_postgres);

/// `next_after_sequence` is documented as "set when more lines follow": a full last page must not set it.
async fn logs_next_after_sequence_only_when_more_follow(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let a1 = enroll_agent(&cp, &fx, "edge-logs-page").await?;
    let c1 = a1.client(&cp);
    let plan = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&unique("vm"))]),
    )
    .await?;
    let e = plan.executions[0].id.clone();
    let entries = (1..=4).map(|s| log_entry(&e, s, &format!("line {s}"))).collect();
    assert_eq!(post_logs(&cp, &c1, entries).await?.accepted_frames, 4);
    let page = execution_logs(&cp, &fx.api_key, &e, "?limit=2").await?;
    assert_eq!(page.next_after_sequence, Some(2), "lines 3 and 4 follow");
    let last = execution_logs(&cp, &fx.api_key, &e, "?limit=2&after_sequence=2").await?;
    assert_eq!(last.logs.iter().map(|l| l.sequence).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(
        last.next_after_sequence, None,
        "regression: the last page of 4 lines must not announce more (next_after_sequence={:?}); the contract \
         (docs/control-plane.md, core::api::ExecutionLogsResponse) sets it only when more lines follow",
        last.next_after_sequence
    );
    Ok(())
}
both_backends!(logs_next_after_sequence_only_when_more_follow => logs_next_after_sequence_only_when_more_follow_sqlite, logs_next_after_sequence_only_when_more_follow_postgres);

/// Regressions: a CREATE of a VM that exists (and is not deleted) is a conflict, a VM created twice in one
/// plan is refused, and the idempotency key is compared trimmed.
async fn create_conflicts_and_trimmed_keys(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let vm = unique("vm");
    let key = unique("key");
    let first = apply_raw(
        &cp,
        &fx.api_key,
        fx.site_id(),
        &json!({"idempotency_key": key, "actions": [create_json(&vm)]}),
    )
    .await;
    let first: ApplyPlanResponse = expect_json(first, StatusCode::OK, "first create").await?;
    // The same request with surrounding blanks in the key is the same request.
    let again = apply_raw(
        &cp,
        &fx.api_key,
        fx.site_id(),
        &json!({"idempotency_key": format!(" {key} "), "actions": [create_json(&vm)]}),
    )
    .await;
    let again: ApplyPlanResponse = expect_json(again, StatusCode::OK, "same key with blanks").await?;
    assert_eq!(again.plan_id, first.plan_id);
    assert!(again.deduplicated);
    // Another plan creating the same VM: 409, and nothing is stored.
    let before = site_executions(&cp, &fx).await?.len();
    let r = apply_raw(
        &cp,
        &fx.api_key,
        fx.site_id(),
        &json!({"idempotency_key": unique("key"), "actions": [create_json(&vm)]}),
    )
    .await;
    let err = expect_error(r, StatusCode::CONFLICT, "CONFLICT").await;
    assert!(err.error.contains("already exists"), "{}", err.error);
    assert_eq!(site_executions(&cp, &fx).await?.len(), before);
    // One plan creating one VM twice: 400 naming the second action.
    let other = unique("vm");
    let r = apply_raw(
        &cp,
        &fx.api_key,
        fx.site_id(),
        &json!({"idempotency_key": unique("key"), "actions": [create_json(&other), create_json(&other)]}),
    )
    .await;
    let err = expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert!(err.error.contains("actions[1].vm_id"), "{}", err.error);
    Ok(())
}
both_backends!(create_conflicts_and_trimmed_keys => create_conflicts_and_trimmed_keys_sqlite, create_conflicts_and_trimmed_keys_postgres);

/// Regression: a heartbeat snapshot taken before a DELETE but written after it (heartbeats are coalesced and
/// flushed later) must not bring the deleted VM back.
async fn late_snapshot_does_not_undelete(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::builder(backend)
        .env("HEARTBEAT_FLUSH_INTERVAL", "2s")
        .start());
    let fx = bootstrap(&cp).await?;
    let agent = enroll_agent(&cp, &fx, "edge-undelete").await?;
    let c = agent.client(&cp);
    let vm = unique("vm");
    let plan = apply_plan(&cp, &fx, &plan_request(&unique("key"), vec![create_action(&vm)])).await?;
    assert_eq!(next_plans(&cp, &c).await?.len(), 1);
    let create = &plan.executions[0];
    report(
        &cp,
        &c,
        &result_body(&[(&create.id, &create.operation_id, true, None, None)]),
    )
    .await?;
    let del = apply_plan(&cp, &fx, &plan_request(&unique("key"), vec![vm_action("DELETE", &vm)])).await?;
    assert_eq!(next_plans(&cp, &c).await?.len(), 1);
    // The snapshot (VM still STOPPED) is buffered, then the DELETE result lands before the flush.
    heartbeat(
        &cp,
        &c,
        &json!({"microvms": [{"id": vm, "state": "STOPPED", "vcpu_count": 1, "memory_mib": 512}]}),
    )
    .await?;
    let d = &del.executions[0];
    report(&cp, &c, &result_body(&[(&d.id, &d.operation_id, true, None, None)])).await?;
    assert_eq!(site_vm(&cp, &fx, &vm).await?.state, "DELETED");
    // Wait past the flush interval: the stale snapshot is written, and must not undo the delete.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert_eq!(
        site_vm(&cp, &fx, &vm).await?.state,
        "DELETED",
        "a late snapshot undeleted the VM"
    );
    Ok(())
}
both_backends!(late_snapshot_does_not_undelete => late_snapshot_does_not_undelete_sqlite, late_snapshot_does_not_undelete_postgres);

// ---------------------------------------------------------------------------------------------------------
// 7. Audit

async fn plans_are_audited(backend: Backend) -> anyhow::Result<()> {
    let mut cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let a1 = enroll_agent(&cp, &fx, "edge-audit-plans").await?;
    let c1 = a1.client(&cp);
    let vm = unique("vm");
    let plan = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create_action(&vm), vm_action("START", &vm)]),
    )
    .await?;
    next_plans(&cp, &c1).await?;
    report(
        &cp,
        &c1,
        &result_body(&[
            (&plan.executions[0].id, "create-1", true, None, None),
            (&plan.executions[1].id, "start-2", true, None, None),
        ]),
    )
    .await?;
    assert_eq!(site_vm(&cp, &fx, &vm).await?.state, "RUNNING");
    // A repeated apply is not a new plan: no second plan.apply event.
    let req = plan_request(&unique("key"), vec![vm_action("STOP", &vm)]);
    let failed = apply_plan(&cp, &fx, &req).await?;
    assert!(apply_plan(&cp, &fx, &req).await?.deduplicated);
    next_plans(&cp, &c1).await?;
    report(
        &cp,
        &c1,
        &result_body(&[(
            &failed.executions[0].id,
            "stop-1",
            false,
            Some("STOP_TIMEOUT"),
            Some("guest did not stop"),
        )]),
    )
    .await?;
    assert_eq!(site_vm(&cp, &fx, &vm).await?.state, "ERROR");
    let st = cp.stop().await?;
    assert!(st.success(), "SIGTERM must end the control plane with exit 0, got {st}");

    let out = cp.run_cli(["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify must exit 0 after plans and VM transitions\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut db = connect_db(cp.db(), &cp.data_dir).await?;
    let rows = sqlx::query(
        "SELECT seq, action, resource_type, resource_id, actor_type, COALESCE(actor_id, '') AS actor_id, \
         COALESCE(site_id, '') AS site_id, metadata_json FROM audit_events WHERE tenant_id = $1 ORDER BY seq",
    )
    .bind(fx.tenant_id())
    .fetch_all(&mut db)
    .await
    .context("read audit_events")?;
    struct Ev {
        action: String,
        resource_type: String,
        resource_id: String,
        actor_type: String,
        actor_id: String,
        site_id: String,
        metadata: Value,
    }
    let evs: Vec<Ev> = rows
        .iter()
        .map(|r| {
            Ok(Ev {
                action: r.try_get("action")?,
                resource_type: r.try_get("resource_type")?,
                resource_id: r.try_get("resource_id")?,
                actor_type: r.try_get("actor_type")?,
                actor_id: r.try_get("actor_id")?,
                site_id: r.try_get("site_id")?,
                metadata: serde_json::from_str(&r.try_get::<String, _>("metadata_json")?)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let actions: Vec<&str> = evs.iter().map(|e| e.action.as_str()).collect();

    let applies: Vec<&Ev> = evs.iter().filter(|e| e.action == "plan.apply").collect();
    assert_eq!(applies.len(), 2, "one plan.apply per plan: {actions:?}");
    let first = applies
        .iter()
        .find(|e| e.resource_id == plan.plan_id)
        .with_context(|| format!("no plan.apply for {}: {actions:?}", plan.plan_id))?;
    assert_eq!(first.resource_type, "plan");
    assert_eq!(first.actor_type, "USER");
    assert_eq!(first.site_id, fx.site.id);

    let transitions: Vec<(&str, &str)> = evs
        .iter()
        .filter(|e| e.action == "vm.state_change")
        .map(|e| (e.resource_id.as_str(), e.metadata["to"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(
        transitions,
        vec![
            (vm.as_str(), "STOPPED"),
            (vm.as_str(), "RUNNING"),
            (vm.as_str(), "ERROR")
        ],
        "each VM transition is audited, in order: {actions:?}"
    );
    for e in evs.iter().filter(|e| e.action == "vm.state_change") {
        assert_eq!(e.actor_type, "AGENT");
        assert_eq!(e.actor_id, a1.agent_id());
        assert_eq!(e.resource_type, "microvm");
    }
    Ok(())
}
both_backends!(plans_are_audited => plans_are_audited_sqlite, plans_are_audited_postgres);
