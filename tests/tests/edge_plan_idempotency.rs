//! Suite 3 of the acceptance plan, with the real agent: the same idempotency key with the same body returns the
//! same plan and creates nothing new (and the agent runs nothing twice: one boot per VM at the stand-in); the
//! same key with another body answers 409; two plans reusing the same operation ids for different VMs both run
//! (the agent's idempotency cache is keyed by execution, not by the operation id alone: bug 29).

use nkudo_tests::*;
use reqwest::StatusCode;
use std::time::Duration;

const PLAN_TIMEOUT: Duration = Duration::from_secs(60);

fn start(vm: &str, op: &str) -> nkudo_core::api::PlanActionSpec {
    let mut a = vm_action("START", vm);
    a.operation_id = Some(op.to_string());
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_same_body_is_one_plan_other_body_conflicts() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-idem")?;
    host.enroll(&cp, &fx).await?;
    host.spawn(&cp)?;

    let vm = unique("vm");
    let key = unique("key");
    let mut create = host.create_spec(&vm);
    create.operation_id = Some("create".into());
    let req = plan_request(&key, vec![create.clone(), start(&vm, "start")]);
    let first = apply_plan(&cp, &fx, &req).await?;
    assert!(!first.deduplicated);
    let done = wait_plan_done(&cp, &fx, &first.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(3000));

    // The same key and body again (also while the agent runs): the same plan, nothing new.
    for _ in 0..3 {
        let again = apply_plan(&cp, &fx, &req).await?;
        assert_eq!(again.plan_id, first.plan_id);
        assert!(again.deduplicated, "{again:#?}");
        let ids = |p: &nkudo_core::api::ApplyPlanResponse| {
            let mut v: Vec<String> = p.executions.iter().map(|e| e.id.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&again), ids(&first));
        assert_eq!(again.plan_status, "SUCCEEDED");
    }
    // A few heartbeats later: still two executions, one create and one boot at the VMM, one record per action.
    wait_heartbeats(&cp, &fx, 3).await?; // the agent had several chances to lease and run it again
    assert_eq!(site_executions(&cp, &fx).await?.len(), 2);
    assert_eq!(host.vmm_calls(&vm, "PUT vm.create"), 1, "{:?}", host.vmm_requests(&vm));
    assert_eq!(host.vmm_calls(&vm, "PUT vm.boot"), 1, "{:?}", host.vmm_requests(&vm));
    let st = host.state()?;
    assert_eq!(st["actions"].as_array().map(|a| a.len()), Some(2), "{st:#}");

    // The same key with another body: 409 CONFLICT, nothing created.
    let mut other = req.clone();
    other.actions[0].memory_mib = Some(512);
    let r = apply_raw(&cp, &fx.api_key, fx.site_id(), &serde_json::to_value(&other)?).await;
    expect_error(r, StatusCode::CONFLICT, "CONFLICT").await;
    assert_eq!(site_executions(&cp, &fx).await?.len(), 2);

    // Another plan reusing the operation ids `create`/`start` for another VM runs in full (no false cache hit).
    let vm2 = unique("vm");
    let mut create2 = host.create_spec(&vm2);
    create2.operation_id = Some("create".into());
    let p2 = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("key"), vec![create2, start(&vm2, "start")]),
    )
    .await?;
    let done = wait_plan_done(&cp, &fx, &p2.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(3000));
    assert_eq!(host.vmm_calls(&vm2, "PUT vm.boot"), 1, "{:?}", host.vmm_requests(&vm2));
    assert_eq!(site_vm(&cp, &fx, &vm2).await?.state, "RUNNING");
    assert_eq!(
        host.vmm_calls(&vm, "PUT vm.boot"),
        1,
        "the first VM was not booted again"
    );

    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// `apply --plan`: the local plan goes through the same executor and provider; running the same plan file again
/// replays the results from the idempotency cache (no second boot); a failing action exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_runs_a_local_plan_once() -> anyhow::Result<()> {
    let host = EdgeHost::new("edge-apply")?;
    let vm = unique("vm");
    let plan = serde_json::json!({
        "execution_id": "exec-local-1",
        "actions": [
            {"action_id": "create", "type": "MicroVMCreate", "timeout": 60, "params": {
                "vm_id": vm, "name": "local", "vcpu": 1, "memory_mib": 128,
                "kernel_path": host.kernel_path, "cmdline": "console=ttyS0",
                "rootfs_path": host.disk_image}},
            {"action_id": "start", "type": "MicroVMStart", "timeout": 60, "params": {"vm_id": vm}},
        ]
    });
    let plan_file = host.root().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec_pretty(&plan)?)?;
    let run = |h: &EdgeHost| {
        h.command(["apply", "--plan"])
            .arg(&plan_file)
            .arg("--state-dir")
            .arg(&h.state_dir)
            .arg("--runtime-dir")
            .arg(&h.runtime_dir)
            .arg("--images-dir")
            .arg(&h.images_dir)
            .arg("--cloud-hypervisor-bin")
            .arg(bin_path(MOCK_CH_BIN))
            .output()
    };
    for round in 0..2 {
        let out = run(&host)?;
        assert!(out.status.success(), "round {round}: {}", output_text(&out));
        let res: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(res["execution_id"], "exec-local-1", "{res:#}");
        let results = res["results"].as_array().cloned().unwrap_or_default();
        assert_eq!(results.len(), 2, "{res:#}");
        assert!(results.iter().all(|r| r["ok"] == true), "{res:#}");
    }
    assert_eq!(host.vmm_calls(&vm, "PUT vm.boot"), 1, "{:?}", host.vmm_requests(&vm));
    let stderr_second = String::from_utf8_lossy(&run(&host)?.stderr).to_string();
    assert!(stderr_second.contains("idempotency cache"), "{stderr_second}");

    // A plan whose action fails: exit 1, the failure in the result JSON.
    let bad = serde_json::json!({"actions": [{"type": "MicroVMStart", "params": {"vm_id": "no-such-vm"}}]});
    std::fs::write(&plan_file, serde_json::to_vec(&bad)?)?;
    let out = run(&host)?;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let res: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(res["results"][0]["ok"], false, "{res:#}");
    assert_eq!(res["results"][0]["action_id"], "action-1", "{res:#}");
    assert!(
        !res["results"][0]["error_code"].as_str().unwrap_or("").is_empty(),
        "{res:#}"
    );
    Ok(())
}
